"""The real daemon against a real PostgreSQL registry (tests/pg.py): it publishes real
files, its main loop keeps a heartbeat that `status` lists per node, and two daemons with
their own staging folders and one products folder each publish their own products, once.
What is checked is read from the disk and from the server, not only from the daemon's word.
"""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

import pytest

from contimg_publisher import lock, reconcile
from contimg_publisher.registry import Candidate, Identity, open_registry
from contimg_publisher.registry.postgres import SCHEMA_VERSION as PG_SCHEMA_VERSION
from contimg_publisher.transfer import DELAY_ENV
from tests.helpers import Sandbox, log_events, start_daemon, stop, wait_for, write_fits
from tests.pg import Server
from tests.test_integrity import IMAGE_RULES, _image, tree
from tests.test_publish import temps


def _node_sandbox(root: Path, server: Server, node: str, products: Path | None = None
                  ) -> Sandbox:
    root.mkdir(parents=True, exist_ok=True)
    return Sandbox(root, products_root=products,
                   paths={"registry": server.uri, "lock_file": str(root / "publisher.lock")},
                   node={"name": node}, metrics={"enabled": False})


def _archive(products: Path) -> dict[str, bytes]:
    return {str(p.relative_to(products)): p.read_bytes()
            for p in sorted(products.rglob("*")) if p.is_file()}


def _rows(server: Server) -> list[tuple[str, ...]]:
    out = server.psql("SELECT data_id, status, node, published_path FROM data_registry"
                      " ORDER BY data_id")
    return [tuple(line.split("|")) for line in out.splitlines()]


@pytest.mark.slow
def test_the_daemon_publishes_into_a_postgresql_registry(tmp_path: Path,
                                                         pg_server: Server) -> None:
    box = _node_sandbox(tmp_path / "a", pg_server, "node-a")
    sources = {f"m_{i}.fits": write_fits(box.mosaics / f"m_{i}.fits", pixels=32, seed=i)
               for i in range(3)}
    proc = start_daemon(box)
    try:
        wait_for(lambda: sorted(_archive(box.products)) == sorted(
            f"mosaics/{n}" for n in sources), 60, what="three mosaics published")
        wait_for(lambda: pg_server.psql("SELECT count(*) FROM heartbeats") == "1", 30,
                 what="the daemon's heartbeat")
        status = box.cli("status", "--json")
        data = json.loads(status.stdout)
        assert [n["node"] for n in data["nodes"]] == ["node-a"], data["nodes"]
        assert data["nodes"][0]["stale"] is False
        assert data["counts"]["published"] == 3
        assert "postgresql://" in data["registry"]
    finally:
        assert stop(proc) == 0
    archived = _archive(box.products)
    assert archived == {f"mosaics/{n}": data for n, data in sources.items()}
    assert list(box.mosaics.iterdir()) == [], "staging still holds published mosaics"
    rows = _rows(pg_server)
    assert [(r[0], r[1], r[2]) for r in rows] == [
        (f"m_{i}", "published", "node-a") for i in range(3)]
    assert pg_server.psql("SELECT count(*) FROM publish_log") == "3"
    assert pg_server.psql("SELECT count(*) FROM heartbeats") == "0", "a clean stop ends it"
    events = [e.get("event") for e in log_events(box)]
    assert events.count("published") == 3


@pytest.mark.slow
def test_two_daemons_share_one_archive_and_each_publishes_its_own_once(
        tmp_path: Path, pg_server: Server) -> None:
    a = _node_sandbox(tmp_path / "a", pg_server, "node-a")
    b = _node_sandbox(tmp_path / "b", pg_server, "node-b", products=a.products)
    want: dict[str, bytes] = {}
    for box, tag in ((a, "a"), (b, "b")):
        for i in range(4):
            want[f"mosaics/{tag}_{i}.fits"] = write_fits(box.mosaics / f"{tag}_{i}.fits",
                                                         pixels=48, seed=hash((tag, i)) % 1000)
    procs = [start_daemon(a), start_daemon(b)]
    try:
        wait_for(lambda: sorted(_archive(a.products)) == sorted(want), 90,
                 what="eight mosaics published from two staging folders")
        # More arrive while both run.
        for box, tag in ((a, "a"), (b, "b")):
            want[f"mosaics/{tag}_late.fits"] = write_fits(box.mosaics / f"{tag}_late.fits",
                                                          pixels=40, seed=7 if tag == "a" else 8)
        wait_for(lambda: sorted(_archive(a.products)) == sorted(want), 90,
                 what="the late mosaics published")
        wait_for(lambda: pg_server.psql("SELECT count(*) FROM heartbeats") == "2", 30,
                 what="both daemons' heartbeats")
        nodes = {n["node"] for n in json.loads(a.cli("status", "--json").stdout)["nodes"]}
        assert nodes == {"node-a", "node-b"}
    finally:
        codes = [stop(p) for p in procs]
    assert codes == [0, 0]
    assert _archive(a.products) == want  # each once, byte for byte, no temporary names left
    assert list(a.mosaics.iterdir()) == [] and list(b.mosaics.iterdir()) == []
    rows = _rows(pg_server)
    assert len(rows) == len(want)
    for data_id, status, node, published in rows:
        assert status == "published"
        assert node == f"node-{data_id[0]}", (data_id, node)
        assert published.endswith(f"/mosaics/{data_id}.fits")
    assert pg_server.psql("SELECT count(*) FROM publish_log") == str(len(want))
    published_events = {box.root.name: [e["data_id"] for e in log_events(box)
                                        if e.get("event") == "published"] for box in (a, b)}
    assert sorted(published_events["a"]) == sorted(d for d, *_ in rows if d.startswith("a"))
    assert sorted(published_events["b"]) == sorted(d for d, *_ in rows if d.startswith("b"))


@pytest.mark.slow
def test_a_server_restart_pauses_the_daemon_and_it_resumes_by_itself(
        tmp_path: Path, pg_server: Server) -> None:
    box = _node_sandbox(tmp_path / "a", pg_server, "node-a")
    want = {f"mosaics/m_{i}.fits": write_fits(box.mosaics / f"m_{i}.fits", pixels=32, seed=i)
            for i in range(2)}
    proc = start_daemon(box)
    try:
        wait_for(lambda: sorted(_archive(box.products)) == sorted(want), 60,
                 what="the first two published")
        pg_server.stop("immediate")
        for i in range(2, 4):
            want[f"mosaics/m_{i}.fits"] = write_fits(box.mosaics / f"m_{i}.fits", pixels=32,
                                                     seed=i)
        wait_for(lambda: "registry_unavailable" in [e.get("event") for e in log_events(box)],
                 60, what="the daemon to pause on the stopped server")
        assert proc.poll() is None, "the daemon exited instead of pausing"
        time.sleep(1.0)
        assert sorted(_archive(box.products)) == sorted(want)[:2], "published while paused"
        pg_server.start()
        wait_for(lambda: sorted(_archive(box.products)) == sorted(want), 90,
                 what="the rest published once the server is back")
        wait_for(lambda: "registry_available" in [e.get("event") for e in log_events(box)],
                 30, what="registry_available")
    finally:
        assert stop(proc) == 0
    assert _archive(box.products) == want
    assert [r[1] for r in _rows(pg_server)] == ["published"] * 4
    assert pg_server.psql("SELECT count(*) FROM publish_log") == "4"


@pytest.mark.slow
def test_two_nodes_publishing_one_name_get_two_versions(tmp_path: Path,
                                                         pg_server: Server) -> None:
    a = _node_sandbox(tmp_path / "a", pg_server, "node-a")
    b = _node_sandbox(tmp_path / "b", pg_server, "node-b", products=a.products)
    data_a = write_fits(a.mosaics / "nightly_20260101.fits", pixels=32, seed=1)
    data_b = write_fits(b.mosaics / "nightly_20260101.fits", pixels=32, seed=2)
    procs = [start_daemon(a), start_daemon(b)]
    try:
        wait_for(lambda: len(_archive(a.products)) == 2, 90, what="both published")
    finally:
        codes = [stop(p) for p in procs]
    assert codes == [0, 0]
    archived = _archive(a.products)
    assert sorted(archived.values()) == sorted([data_a, data_b]), sorted(archived)
    assert "mosaics/nightly_20260101.fits" in archived, sorted(archived)
    rows = _rows(pg_server)
    assert sorted(r[2] for r in rows) == ["node-a", "node-b"]
    assert all(r[1] == "published" for r in rows)
    assert len({r[3] for r in rows}) == 2


@pytest.mark.slow
def test_two_nodes_copying_one_file_name_at_once_get_two_versions_no_attempt_counted(
        tmp_path: Path, pg_server: Server, tmpfs_products: Path) -> None:
    """Two mosaics of one name copied at once (slowed) into one products area: both
    choose the free name, the no-replace rename gives it to one, and the other's lost
    race is an `interrupted` attempt, not counted and due again at once, that publishes
    version 2; each file whole and byte-identical, recorded once."""
    a = _node_sandbox(tmp_path / "a", pg_server, "node-a", products=tmpfs_products)
    b = _node_sandbox(tmp_path / "b", pg_server, "node-b", products=tmpfs_products)
    for box in (a, b):  # a backoff far longer than the test: only an uncounted retry is due
        box.update(publish={"backoff_initial_seconds": 600, "backoff_max_seconds": 600})
    data = {box.root.name: write_fits(box.mosaics / "nightly_20260102.fits", pixels=64,
                                      seed=i) for i, box in enumerate((a, b))}
    open_registry(pg_server.uri).close()
    procs = [start_daemon(box, extra_env={DELAY_ENV: "1.5"}) for box in (a, b)]
    try:
        wait_for(lambda: pg_server.psql("SELECT count(*) FROM data_registry"
                                        " WHERE status = 'published'") == "2", 120,
                 what="both mosaics published")
    finally:
        codes = [stop(p) for p in procs]
    assert codes == [0, 0]
    assert sorted(_archive(tmpfs_products)) == ["mosaics/nightly_20260102.fits",
                                                "mosaics/nightly_20260102.v2.fits"]
    for _data_id, _status, node, published in _rows(pg_server):
        assert Path(published).read_bytes() == data[node[-1]], (node, published)
    assert pg_server.psql("SELECT count(*), count(DISTINCT data_id) FROM publish_log") == "2|2"
    assert pg_server.psql("SELECT sum(publish_attempts) FROM data_registry") == "0"
    failures = pg_server.psql("SELECT kind, error FROM publish_failures").splitlines()
    assert len(failures) == 1, failures  # the copies overlapped: one lost the rename
    assert failures[0].startswith("interrupted|") and "taken by another publish" in failures[0]


@pytest.mark.slow
def test_two_nodes_publishing_one_folder_name_at_once_get_two_versions(
        tmp_path: Path, pg_server: Server, tmpfs_products: Path) -> None:
    """Two folder products of one name, copied at once (slowed: a second per file) by two
    nodes into one products area: the name is reserved in the registry before either
    copy, so the second node takes version 2 at once, with no failed rename and no
    attempt counted; each folder is complete and byte-identical under its own name,
    recorded once, and the reservations name what was published."""
    a = _node_sandbox(tmp_path / "a", pg_server, "node-a", products=tmpfs_products)
    b = _node_sandbox(tmp_path / "b", pg_server, "node-b", products=tmpfs_products)
    staged = {}
    for box in (a, b):
        box.update(products=IMAGE_RULES)
        staged[box.root.name] = _image(box, "field.image")
    assert staged["a"] != staged["b"]
    open_registry(pg_server.uri).close()  # the schema, so the wait below can ask for rows
    procs = [start_daemon(box, extra_env={DELAY_ENV: "1.0"}) for box in (a, b)]
    try:
        wait_for(lambda: pg_server.psql("SELECT count(*) FROM data_registry"
                                        " WHERE status = 'published'") == "2", 120,
                 what="both folders published")
    finally:
        codes = [stop(p) for p in procs]
    assert codes == [0, 0]
    images = tmpfs_products / "images"
    assert sorted(p.name for p in images.iterdir()) == ["field.image", "field.v2.image"]
    assert temps(tmpfs_products) == []
    rows = _rows(pg_server)
    assert sorted(r[2] for r in rows) == ["node-a", "node-b"]
    assert all(r[1] == "published" for r in rows)
    for _data_id, _status, node, published in rows:  # each node's own folder, whole
        assert tree(Path(published)) == staged[node[-1]], (node, published)
    for box in (a, b):
        assert list((box.stage / "images").iterdir()) == [], "staging still holds a folder"
    assert pg_server.psql("SELECT count(*), count(DISTINCT data_id) FROM publish_log") == "2|2"
    assert pg_server.psql("SELECT count(*) FROM publish_failures") == "0", \
        "a node lost the race at its rename instead of at the reservation"
    reserved = pg_server.psql("SELECT r.data_id, r.published_path FROM name_reservations r"
                              " ORDER BY 1")
    assert reserved == "\n".join(f"{r[0]}|{r[3]}" for r in sorted(rows))
    # The copies overlapped: one node met the other's reservation while nothing was there.
    met = [e for box in (a, b) for e in log_events(box) if e.get("event") == "name_reserved"]
    assert len(met) == 1, met
    assert met[0]["existing"] == str(images / "field.image")
    assert met[0]["published_path"] == str(images / "field.v2.image")


def test_reconciliation_releases_a_folder_name_whose_claim_died(tmp_path: Path,
                                                                pg_server: Server) -> None:
    """A publish killed after reserving its folder's name holds it no longer once this
    node reconciles: its row goes back to waiting and the name is free for any product;
    a reservation of a live process's claim stays (a second daemon of this node)."""
    box = _node_sandbox(tmp_path / "a", pg_server, "node-a")
    box.update(products=IMAGE_RULES)
    cfg = box.config()
    gone = subprocess.Popen(["true"])
    gone.wait()
    dead, live = lock.owner_id(gone.pid), lock.owner_id()
    images = f"{cfg.products_root}/images"
    with open_registry(cfg) as reg:
        for n, owner in ((1, dead), (2, live)):
            path = f"{cfg.stage_root}/images/f{n}.image"
            reg.register(Candidate(
                data_id=f"f{n}", data_type="image", base_path=str(cfg.stage_root),
                stage_path=path, stage_path_bytes=path.encode(),
                identity=Identity(1, n, 10, n, n), checksum=f"sha256:{n:064x}", metadata={}))
            row = reg.claim(owner, 600, data_id=f"f{n}")[0]
            assert reg.reserve_name(f"{images}/f.v{n}.image", row.data_id, owner,
                                    token=row.claim_token) is None
        results = reconcile.reconcile(cfg, reg, "this-run", sweep=False)
        assert [(r.data_id, r.status) for r in results] == [("f1", "requeued")]
        assert [(r.data_id, r.owner) for r in reg.reservations()] == [("f2", live)]
        assert reg.reserve_name(f"{images}/f.v1.image", "other", "x") is None  # free again
        assert reg.get("f2").status == "publishing"  # type: ignore[union-attr]


@pytest.mark.slow
def test_status_page_metrics_and_status_show_every_node_and_flag_a_silent_one(
        tmp_path: Path, pg_server: Server) -> None:
    import urllib.request

    from tests.test_observability import free_port
    port = free_port()
    box = _node_sandbox(tmp_path / "a", pg_server, "node-a")
    box.update(metrics={"enabled": True, "listen": f"127.0.0.1:{port}"})
    open_registry(pg_server.uri).close()  # the schema, as the first daemon would make it
    # A node whose daemon was killed: its heartbeat row stays, and stops being renewed.
    pg_server.psql("INSERT INTO heartbeats VALUES ('gone:9:9:9', 'node-z', 'hostz', 9, 1.0,"
                   " extract(epoch from now()) - 600, '0.1.0')")
    proc = start_daemon(box)
    try:
        wait_for(lambda: pg_server.psql("SELECT count(*) FROM heartbeats") == "2", 30,
                 what="the daemon's heartbeat")

        def get(path: str) -> str:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as r:
                return r.read().decode()
        page = wait_for(lambda: _try(get, "/"), 30, what="the status page")
        assert "<h2>Nodes</h2>" in page and "node-a" in page and "node-z" in page
        assert "(no heartbeat)" in page and "node node-z: its daemon (pid 9 on hostz)" in page
        metrics = get("/metrics")
        assert 'contimg_publisher_node_stale{host="hostz",node="node-z",pid="9"} 1.0' in metrics
        assert 'node="node-a"' in metrics
        status = box.cli("status", "--json")
        data = json.loads(status.stdout)
        assert status.returncode == 1, "a silent node needs attention"
        assert {n["node"]: n["stale"] for n in data["nodes"]} == {"node-a": False,
                                                                   "node-z": True}
        assert any("node node-z" in p for p in data["problems"])
        text = box.cli("status").stdout
        assert "node       node-z: pid 9 on hostz" in text and "(STOPPED? no heartbeat)" in text
    finally:
        assert stop(proc) == 0


def _try(get, path: str) -> str | None:  # noqa: ANN001 - a local helper of one test
    try:
        return get(path)
    except OSError:
        return None


@pytest.mark.slow
def test_started_while_the_server_is_down_it_waits_and_resumes_by_itself(
        tmp_path: Path, pg_server: Server) -> None:
    """A node booting before its registry server (the first connection and the migration
    both fail): no exit, which under Restart=on-failure would be a restart loop; one
    registry_unavailable with the connection's own reason, and none of the pool's
    per-attempt lines; no READY, systemd's start timeout extended; once the server is up
    the daemon migrates, becomes ready and publishes, without a restart."""
    from tests.test_service import NotifySocket
    box = _node_sandbox(tmp_path / "a", pg_server, "node-a")
    box.update(registry={"busy_timeout_seconds": 2})
    waiting = write_fits(box.mosaics / "waiting.fits", pixels=32, seed=5)
    pg_server.stop()
    notify = NotifySocket(tmp_path / "notify.sock")
    proc = start_daemon(box, notify_path=notify.path)
    try:
        wait_for(lambda: "registry_unavailable" in [e.get("event") for e in log_events(box)],
                 30, what="the pause on a stopped server")
        time.sleep(8)  # several retries (after 1, 2 and 4 s)
        assert proc.poll() is None, f"the daemon exited ({proc.returncode})"
        [report] = [e for e in log_events(box) if e.get("event") == "registry_unavailable"]
        assert "No such file or directory" in report["error"], report  # the attempt's reason
        assert "PostgreSQL server" in report["action"], report
        assert "registry_still_unavailable" not in [e.get("event") for e in log_events(box)]
        assert "error connecting" not in (box.root / "daemon.log").read_text()
        assert not notify.with_key("READY")
        assert notify.with_key("EXTEND_TIMEOUT_USEC")
        assert notify.with_key("STATUS")[-1][1]["STATUS"].startswith(
            "paused: registry unavailable: ")
        assert not _archive(box.products)
        pg_server.start()
        notify.wait("READY", "1", timeout=60)
        wait_for(lambda: _archive(box.products) == {"mosaics/waiting.fits": waiting}, 60,
                 what="the waiting product published")
        assert [e.get("event") for e in log_events(box)].count("registry_available") == 1
    finally:
        code = stop(proc)
        notify.close()
    assert code == 0
    assert pg_server.psql("SELECT version FROM contimg_schema") == str(PG_SCHEMA_VERSION)
    assert [r[:3] for r in _rows(pg_server)] == [("waiting", "published", "node-a")]
    assert list(box.mosaics.iterdir()) == []


@pytest.mark.slow
def test_a_migration_held_up_by_another_node_pauses_the_start_until_it_is_done(
        tmp_path: Path, pg_server: Server) -> None:
    """Another node holds the migration lock (a long migration of its own): this daemon's
    start pauses on it like on a server that is down, then migrates and publishes."""
    import psycopg

    from contimg_publisher.registry.postgres import MIGRATE_LOCK
    box = _node_sandbox(tmp_path / "a", pg_server, "node-a")
    box.update(registry={"busy_timeout_seconds": 1})
    waiting = write_fits(box.mosaics / "waiting.fits", pixels=32, seed=6)
    with psycopg.connect(pg_server.uri, autocommit=True) as holder:
        holder.execute("SELECT pg_advisory_lock(%s)", (MIGRATE_LOCK,))
        proc = start_daemon(box)
        try:
            wait_for(lambda: "registry_unavailable" in [e.get("event")
                                                        for e in log_events(box)],
                     30, what="the pause on the migration lock")
            [report] = [e for e in log_events(box) if e.get("event") == "registry_unavailable"]
            assert "the migration's" in report["error"], report
            assert proc.poll() is None
            assert pg_server.psql("SELECT to_regclass('contimg_schema') IS NULL") == "t"
            holder.execute("SELECT pg_advisory_unlock(%s)", (MIGRATE_LOCK,))
            wait_for(lambda: _archive(box.products) == {"mosaics/waiting.fits": waiting}, 60,
                     what="the waiting product published once the lock is released")
        finally:
            code = stop(proc)
    assert code == 0
    assert pg_server.psql("SELECT version FROM contimg_schema") == str(PG_SCHEMA_VERSION)


@pytest.mark.slow
def test_two_nodes_deliver_each_event_once_and_one_audits_the_shared_archive(
        tmp_path: Path, pg_server: Server) -> None:
    """Two daemons on two nodes, one webhook consumer and one archive: every publish of
    either node reaches the consumer exactly once, in the order of the shared outbox, sent
    by whichever daemon holds the delivery duty; a flipped byte in the archive is found by
    the one daemon that audits it, once, and its finding is on the server for both."""
    from tests.test_events import Receiver
    receiver = Receiver()
    try:
        a = _node_sandbox(tmp_path / "a", pg_server, "node-a")
        b = _node_sandbox(tmp_path / "b", pg_server, "node-b", products=a.products)
        for box in (a, b):
            box.update(notify={"url": receiver.url, "retry_initial_seconds": 0.2,
                               "retry_max_seconds": 1},
                       audit={"interval_seconds": 1.0, "bytes_per_second": 0})
        want: dict[str, bytes] = {}
        for box, tag in ((a, "a"), (b, "b")):
            for i in range(3):
                want[f"mosaics/{tag}_{i}.fits"] = write_fits(
                    box.mosaics / f"{tag}_{i}.fits", pixels=32, seed=(7 if tag == "a" else 70) + i)
        procs = [start_daemon(a), start_daemon(b)]
        try:
            wait_for(lambda: sorted(_archive(a.products)) == sorted(want), 90,
                     what="six mosaics published from two nodes")
            wait_for(lambda: len(receiver.seen) == len(want), 60,
                     what="every event received")
            # One more from each node while both run, then every event is done for the sink.
            for box, tag in ((a, "a"), (b, "b")):
                want[f"mosaics/{tag}_late.fits"] = write_fits(
                    box.mosaics / f"{tag}_late.fits", pixels=40, seed=3 if tag == "a" else 4)
            wait_for(lambda: len(receiver.seen) == len(want), 90,
                     what="the late events received")
            wait_for(lambda: pg_server.psql(
                "SELECT delivered_through = (SELECT MAX(id) FROM outbox) FROM outbox_sinks"
                " WHERE sink = 'webhook'") == "t", 30, what="the sink's cursor at the end")
            time.sleep(3.0)  # the standing-by daemon's passes would show a second delivery

            target = a.products / "mosaics" / "b_1.fits"
            original = target.read_bytes()
            flipped = bytearray(original)
            flipped[-100] ^= 0xFF
            target.write_bytes(bytes(flipped))
            wait_for(lambda: pg_server.psql(
                "SELECT count(*) FROM audit_findings WHERE resolved_at IS NULL") == "1", 60,
                what="the flipped byte found by the audit")
            status = json.loads(b.cli("status", "--json").stdout)
            assert [f["path"] for f in status["audit"]["findings"]] == [str(target)]
            target.write_bytes(original)
            wait_for(lambda: pg_server.psql(
                "SELECT count(*) FROM audit_findings WHERE resolved_at IS NULL") == "0", 60,
                what="the finding resolved once the bytes are back")
            # Who held each duty while both ran (the first to stop hands its duties over).
            running = {box.root.name: log_events(box) for box in (a, b)}
            duty = {name: [e["leading"] for e in events if e.get("event") == "outbox_duty"]
                    for name, events in running.items()}
            audit_duty = {name: [e["leading"] for e in events
                                 if e.get("event") == "audit_duty"]
                          for name, events in running.items()}
        finally:
            codes = [stop(p) for p in procs]
        assert codes == [0, 0]

        # Each event was sent once: no request repeated a key, none failed.
        keys = [r["key"] for r in receiver.requests]
        assert len(keys) == len(want) and len(set(keys)) == len(want), receiver.requests
        outbox = [tuple(line.split("|")) for line in pg_server.psql(
            "SELECT event_id, data_id, node FROM outbox ORDER BY id").splitlines()]
        assert [e for e, _d, _n in outbox] == keys  # in the shared outbox's order
        for event_id, data_id, node in outbox:
            body = receiver.seen[event_id]
            assert body["data_id"] == data_id and body["node"] == node
            assert node == f"node-{data_id[0]}", (data_id, node)
        assert sorted(d for _e, d, _n in outbox) == sorted(
            p.removeprefix("mosaics/").removesuffix(".fits") for p in want)

        logs = {box.root.name: log_events(box) for box in (a, b)}
        delivered = {name: [e["event_id"] for e in events if e.get("event") ==
                            "event_delivered"] for name, events in logs.items()}
        assert sorted(delivered["a"] + delivered["b"]) == sorted(keys)
        assert sorted(duty.values()) == [[False], [True]], duty
        leader = "a" if duty["a"] == [True] else "b"
        assert len(delivered[leader]) == len(keys)  # the other sent nothing

        assert sorted(audit_duty.values()) == [[False], [True]], audit_duty
        found = [(name, e["path"]) for name, events in logs.items() for e in events
                 if e.get("event") == "audit_finding"]
        auditor = "a" if audit_duty["a"] == [True] else "b"
        assert found == [(auditor, str(target))]  # logged once, by the one auditing
        assert pg_server.psql("SELECT kind, path, data_id FROM audit_findings") == \
            f"checksum_changed|{target}|b_1"
        assert pg_server.psql("SELECT count(*) FROM duties") == "0", "a clean stop resigns"
        # The commands read the shared outbox and archive from either node.
        listed = json.loads(b.cli("events", "--all", "--json", check=True).stdout)
        assert [e["event_id"] for e in listed] == keys
        assert {e["deliveries"]["webhook"]["state"] for e in listed} == {"delivered"}, listed
        assert json.loads(a.cli("events", "--json", check=True).stdout) == []
        audited = a.cli("audit", "--json")
        assert audited.returncode == 0, audited.stdout + audited.stderr
        assert json.loads(audited.stdout)["checked"] == len(want)
    finally:
        receiver.close()


@pytest.mark.slow
def test_a_batch_longer_than_its_lease_keeps_every_rows_lease(
        tmp_path: Path, pg_server: Server, tmpfs_products: Path) -> None:
    """One claim takes the whole backlog; its copies (slowed to a second each) outlast the
    lease several times over. No row of the batch waiting its turn may lapse meanwhile:
    another daemon of this node would claim it again and copy it for nothing."""
    box = _node_sandbox(tmp_path / "a", pg_server, "node-a", tmpfs_products)  # copies
    box.update(publish={"lease_seconds": 3}, detect={"settle_seconds": 0.0})
    staged = {f"m_{i}": write_fits(box.mosaics / f"m_{i}.fits", pixels=32, seed=i)
              for i in range(8)}
    proc = start_daemon(box, extra_env={DELAY_ENV: "1.0"})
    lapsed: list[str] = []
    try:
        wait_for(lambda: "started" in [e.get("event") for e in log_events(box)], 60,
                 what="the daemon started (its schema made)")
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            lapsed += pg_server.psql(
                "SELECT data_id FROM data_registry WHERE status = 'publishing'"
                " AND lease_expires_at < extract(epoch from now())").split()
            if pg_server.psql("SELECT count(*) FROM data_registry"
                              " WHERE status = 'published'") == str(len(staged)):
                break
            time.sleep(0.2)
    finally:
        assert stop(proc) == 0
    assert not lapsed, f"leases lapsed in the batch: {sorted(set(lapsed))}"
    assert _archive(box.products) == {f"mosaics/{name}.fits": data
                                      for name, data in staged.items()}
    claimed = [e for e in log_events(box) if e.get("event") == "published"]
    assert len(claimed) == len(staged)
    assert pg_server.psql("SELECT count(*) FROM publish_failures") == "0"
