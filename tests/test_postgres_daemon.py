"""The real daemon against a real PostgreSQL registry (tests/pg.py): it publishes real
files, its main loop keeps a heartbeat that `status` lists per node, and two daemons with
their own staging folders and one products folder each publish their own products, once.
What is checked is read from the disk and from the server, not only from the daemon's word.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from contimg_publisher.registry import open_registry
from tests.helpers import Sandbox, log_events, start_daemon, stop, wait_for, write_fits
from tests.pg import Server, pg_server, pg_template  # noqa: F401 - fixtures


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


def test_the_daemon_publishes_into_a_postgresql_registry(tmp_path: Path,
                                                         pg_server: Server) -> None:  # noqa: F811
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


def test_two_daemons_share_one_archive_and_each_publishes_its_own_once(
        tmp_path: Path, pg_server: Server) -> None:  # noqa: F811
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


def test_a_server_restart_pauses_the_daemon_and_it_resumes_by_itself(
        tmp_path: Path, pg_server: Server) -> None:  # noqa: F811
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


def test_two_nodes_publishing_one_name_get_two_versions(tmp_path: Path,
                                                         pg_server: Server) -> None:  # noqa: F811
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


def test_status_page_metrics_and_status_show_every_node_and_flag_a_silent_one(
        tmp_path: Path, pg_server: Server) -> None:  # noqa: F811
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


def test_two_nodes_deliver_each_event_once_and_one_audits_the_shared_archive(
        tmp_path: Path, pg_server: Server) -> None:  # noqa: F811
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
