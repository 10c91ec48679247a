"""A node cut off from the registry: its daemon runs in a network namespace of its own,
reaching the PostgreSQL server over a veth link, and the link goes down while it
publishes. Within its lease (and the copy already in flight) it stops publishing, while
the daemon keeps running; once the link is back it finishes, and nothing is published
twice. A lease lost in the middle of a copy: the copy is abandoned, and another daemon
of the node takes the claims over. And each kind of registry call over the dead link
gives up within its bound. Read from the archive on disk and from the server.
"""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.helpers import (
    PYTHON,
    REPO,
    MakeSandbox,
    log_events,
    skip_with,
    start_daemon,
    stop,
    wait_for,
)
from tests.pg import Server
from tests.test_publish import (
    archive_files,
    sha256,
    stage,
    temps,
)
from tests.test_service import NotifySocket

NS, HOST_IF, NS_IF = "ct15part", "ct15h", "ct15n"
HOST_IP, NS_IP, NET = "10.215.15.1", "10.215.15.2", "10.215.15.0/24"
LEASE = 5.0
PRODUCTS = 24


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["ip", *args], check=check, capture_output=True, text=True)


@pytest.fixture
def netns(as_root: None) -> Iterator[str]:
    """A namespace whose only way out is a veth link to this one's HOST_IP."""
    added = _ip("netns", "add", NS, check=False)
    if added.returncode != 0:
        skip_with(f"cannot create a network namespace here (ip netns add): {added.stderr}")
    try:
        _ip("link", "add", HOST_IF, "type", "veth", "peer", "name", NS_IF)
        _ip("link", "set", NS_IF, "netns", NS)
        _ip("addr", "add", f"{HOST_IP}/24", "dev", HOST_IF)
        _ip("link", "set", HOST_IF, "up")
        _ip("-n", NS, "addr", "add", f"{NS_IP}/24", "dev", NS_IF)
        _ip("-n", NS, "link", "set", NS_IF, "up")
        _ip("-n", NS, "link", "set", "lo", "up")
        yield NS
    finally:
        _ip("link", "del", HOST_IF, check=False)
        _ip("netns", "del", NS, check=False)


def _final(products: Path) -> dict[str, bytes]:
    """What stands under final names (a copy in flight, under its temporary name, aside)."""
    return {name: data for name, data in archive_files(products / "mosaics").items()
            if not Path(name).name.startswith(".contimg-tmp.")}


def _published(server: Server) -> int:
    try:
        return int(server.psql("SELECT count(*) FROM data_registry"
                               " WHERE status = 'published'"))
    except subprocess.CalledProcessError:  # before the daemon made the schema
        return 0


@pytest.mark.slow
def test_a_node_cut_off_stops_within_its_lease_and_publishes_nothing_twice(
        tmp_path: Path, make_sandbox: MakeSandbox, pg_server: Server, netns: str,
        tmpfs_products: Path) -> None:
    uri = pg_server.listen_on(HOST_IP, 5432, NET)
    box = make_sandbox(products_root=tmpfs_products,
                       paths={"registry": uri, "lock_file": str(tmp_path / "p.lock")},
                       node={"name": "node-cut"}, metrics={"enabled": False},
                       registry={"busy_timeout_seconds": 3},
                       detect={"settle_seconds": 0.0, "rescan_seconds": 300},
                       publish={"lease_seconds": LEASE, "reconcile_seconds": 3})
    expected = {f"m_{i:02d}.fits": sha256(stage(box, f"m_{i:02d}.fits", pixels=700, seed=i))
                for i in range(PRODUCTS)}
    notify = NotifySocket(tmp_path / "notify.sock")
    # systemd's watchdog at 4 s: the loop pings every 2 s, and must go on doing so.
    proc = start_daemon(box, prefix=("ip", "netns", "exec", netns), notify_path=notify.path,
                        watchdog_usec=4_000_000,
                        extra_env={"CONTIMG_PUBLISHER_TEST_COPY_DELAY": "0.3"})
    try:
        # One batch holds them all; its products reach their final names one by one.
        wait_for(lambda: len(_final(box.products)) >= 2, 60,
                 what="the first products placed")
        _ip("link", "set", HOST_IF, "down")
        cut = time.monotonic()
        # What was in flight may still reach its final name; then nothing more.
        time.sleep(LEASE + 3)
        frozen = _final(box.products)
        time.sleep(10)
        # The main loop's registry calls over the dead link give up within their bound,
        # so the watchdog pings go on through the cut, never a lease apart.
        pings = [t for t, _m in notify.with_key("WATCHDOG") if t >= cut - 2]
        gaps = [b - a for a, b in zip([cut, *pings], pings, strict=False)]
        print(f"watchdog pings during the cut: {len(pings)}, longest gap {max(gaps):.1f} s")
        assert pings and max(gaps) < LEASE, gaps
        assert time.monotonic() - pings[-1] < LEASE
        assert _final(box.products) == frozen, \
            "a product reached the archive long after the node lost the registry"
        assert len(frozen) < PRODUCTS, "everything was published before the cut"
        assert proc.poll() is None, "the daemon exited instead of pausing"
        # Its statements over the dead link give up within their bound (pgconn.Limits).
        wait_for(lambda: "registry_unavailable" in [e.get("event") for e in log_events(box)],
                 60, what="the daemon to pause on the unreachable registry")
        assert _final(box.products) == frozen
        print(f"cut off for {time.monotonic() - cut:.0f} s with {len(frozen)} published")
        _ip("link", "set", HOST_IF, "up")
        wait_for(lambda: _published(pg_server) == PRODUCTS and not temps(box.products), 120,
                 interval=0.5, what="every product published once the link is back")
    finally:
        code = stop(proc)
        notify.close()
    assert code == 0
    found = archive_files(box.products / "mosaics")
    assert {name: sha256(data) for name, data in found.items()} == expected  # once each
    assert list(box.mosaics.rglob("*.fits")) == []
    assert pg_server.psql("SELECT count(*), count(DISTINCT data_id) FROM publish_log") == \
        f"{PRODUCTS}|{PRODUCTS}"
    assert set(pg_server.psql("SELECT DISTINCT status FROM data_registry").split()) == \
        {"published"}


@pytest.mark.slow
def test_no_registry_call_blocks_past_its_bound_on_a_dead_link(
        pg_server: Server, netns: str) -> None:
    """Each kind of call the daemon's loop and publish thread make, over a link that went
    down: each gives up with RegistryUnavailable within its bound (a fraction of the lease),
    not after TCP's own half a minute."""
    uri = pg_server.listen_on(HOST_IP, 5432, NET)
    busy = 3.0
    proc = subprocess.Popen(
        ["ip", "netns", "exec", netns, PYTHON, str(REPO / "tests/support/pg_dead_link_client.py"),
         uri, str(busy), str(LEASE)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True, cwd=REPO)
    try:
        assert proc.stdout is not None and proc.stdin is not None
        first = json.loads(proc.stdout.readline() or "{}")
        assert first.get("ready"), proc.stderr.read() if proc.stderr else ""
        limits = first["limits"]
        assert limits["call_seconds"] <= LEASE / 4 + 1e-9
        assert _sessions(pg_server, "idle in transaction") == 1
        _ip("link", "set", HOST_IF, "down")
        cut = time.monotonic()
        # The server ends the transaction the vanished client left open, and its locks go.
        wait_for(lambda: _sessions(pg_server, "idle in transaction") == 0,
                 limits["idle_in_transaction_seconds"] + 5, interval=0.2,
                 what="the server to end the cut-off client's open transaction")
        ended = time.monotonic() - cut
        pg_server.psql("SET lock_timeout = '1s'; UPDATE heartbeats SET version = 'taken'"
                       " WHERE owner = 'cut:1:1:1'")
        proc.stdin.write("go\n")
        proc.stdin.flush()
        results = [json.loads(line) for line in proc.stdout]
        assert proc.wait(timeout=60) == 0, proc.stderr.read() if proc.stderr else ""
    finally:
        if proc.poll() is None:
            proc.kill()
        _ip("link", "set", HOST_IF, "up", check=False)
    print(f"dead link: open transaction ended by the server after {ended:.1f} s;",
          ", ".join(f"{r['call']} {r['seconds']} s" for r in results))
    assert [r["call"] for r in results] == ["commit", "clock", "heartbeat", "next_due_at",
                                            "claim", "probe"]
    # A pooled connection's check, then one connection attempt: well under half a lease.
    bound = limits["call_seconds"] + limits["statement_seconds"] + 1.0
    for r in results:
        assert r["error"] is not None and r["error"].startswith("RegistryUnavailable"), r
        assert r["seconds"] <= bound < LEASE, r
    assert pg_server.psql("SELECT version FROM heartbeats WHERE owner = 'cut:1:1:1'") == \
        "taken", "the cut-off client's commit must not have happened"


def _sessions(server: Server, state: str) -> int:
    return int(server.psql("SELECT count(*) FROM pg_stat_activity"
                           f" WHERE application_name LIKE '%node-cut' AND state = '{state}'"))


BIG_PIXELS = 2880  # 2880 x 2880 float32: about 33 MB, four of the copy's chunks
BIG_PRODUCTS = 3


@pytest.mark.slow
def test_a_lease_lost_mid_copy_is_abandoned_and_another_daemon_takes_the_claims(
        tmp_path: Path, make_sandbox: MakeSandbox, pg_server: Server, netns: str,
        tmpfs_products: Path) -> None:
    """The node's daemon is cut off in the middle of a slow copy: its lease renewals fail
    until a whole lease has gone by, and it says `lease_lost` for the product in hand,
    whose copy stops (no temporary file, nothing under its final name, the staged file
    kept) and whose rows it commits nothing for. Another daemon of the same node, on the
    host, takes the expired claims and publishes everything; when the link is back the
    first one finds its claims gone and publishes nothing again."""
    uri = pg_server.listen_on(HOST_IP, 5432, NET)
    common: dict[str, Any] = {
        "node": {"name": "node-cut"}, "metrics": {"enabled": False},
        "registry": {"busy_timeout_seconds": 3},
        "detect": {"settle_seconds": 0.0, "rescan_seconds": 300},
        "publish": {"lease_seconds": LEASE, "reconcile_seconds": 3}}
    box = make_sandbox("cut", products_root=tmpfs_products,
                       paths={"registry": uri, "lock_file": str(tmp_path / "cut.lock")},
                       **common)
    expected = {f"b_{i}.fits": stage(box, f"b_{i}.fits", pixels=BIG_PIXELS, seed=i)
                for i in range(BIG_PRODUCTS)}
    # Two seconds per chunk: each copy takes longer than a lease.
    cut_off = start_daemon(box, prefix=("ip", "netns", "exec", netns),
                           extra_env={"CONTIMG_PUBLISHER_TEST_COPY_DELAY": "2.0"})
    other = None
    try:
        wait_for(lambda: temps(box.products), 60, what="the first copy under way")
        _ip("link", "set", HOST_IF, "down")
        lost = wait_for(lambda: [e for e in log_events(box) if e.get("event") == "lease_lost"],
                        LEASE + 15, interval=0.2, what="lease_lost")
        event = lost[0]
        assert len(lost) == 1, lost
        assert event["data_id"] in {Path(n).stem for n in expected}, event
        assert "could not be renewed" in event["reason"] and event["error"], event
        assert event["seconds_since_renewal"] >= LEASE, event
        assert event["stage_path"] == str(box.mosaics / f"{event['data_id']}.fits")
        # The copy in flight stopped and left nothing; the staged file is untouched.
        wait_for(lambda: not temps(box.products), 10, what="the abandoned copy's temp removed")
        name = f"{event['data_id']}.fits"
        assert name not in _final(box.products)
        assert (box.mosaics / name).read_bytes() == expected[name]
        # Nothing the cut-off daemon did reached the server after the cut.
        assert pg_server.psql("SELECT count(*) FROM publish_log") == "0"
        wait_for(lambda: pg_server.psql(
            "SELECT count(*) FROM data_registry WHERE status = 'publishing'"
            " AND lease_expires_at > extract(epoch from now())") == "0", LEASE + 5,
            what="every lease of the cut-off daemon expired")
        owners = set(pg_server.psql("SELECT DISTINCT lease_owner FROM data_registry"
                                    " WHERE status = 'publishing'").split())
        assert len(owners) == 1, owners
        # Another daemon of the same node, which can reach the server, takes over.
        box2 = make_sandbox("other", products_root=tmpfs_products,
                            paths={"registry": pg_server.uri, "stage_root": str(box.stage),
                                   "lock_file": str(tmp_path / "other.lock")}, **common)
        other = start_daemon(box2)
        wait_for(lambda: _published(pg_server) == BIG_PRODUCTS and not temps(box.products),
                 120, interval=0.5, what="the other daemon to publish every product")
        assert cut_off.poll() is None, "the cut-off daemon exited instead of pausing"
        _ip("link", "set", HOST_IF, "up")
        wait_for(lambda: "registry_available" in [e.get("event") for e in log_events(box)],
                 60, what="the cut-off daemon to reach the registry again")
        time.sleep(5)  # its abandoned batch resolved, a reconciliation pass or two
    finally:
        _ip("link", "set", HOST_IF, "up", check=False)
        codes = [stop(p) for p in (cut_off, other) if p is not None]
    assert codes == [0] * len(codes)
    found = archive_files(box.products / "mosaics")
    assert {n: sha256(d) for n, d in found.items()} == \
        {n: sha256(d) for n, d in expected.items()}  # once each, byte for byte
    assert list(box.mosaics.rglob("*.fits")) == []
    assert pg_server.psql("SELECT count(*), count(DISTINCT data_id) FROM publish_log") == \
        f"{BIG_PRODUCTS}|{BIG_PRODUCTS}"
    assert set(pg_server.psql("SELECT DISTINCT status FROM data_registry").split()) == \
        {"published"}
    # Every product published once, by the daemon that took the claims over.
    first = [e for e in log_events(box) if e.get("event") == "published" or
             (e.get("event") == "reconciled" and e.get("outcome") == "published")]
    assert first == [], first
    taken = [e["data_id"] for e in log_events(box2) if e.get("event") == "published" or
             (e.get("event") == "reconciled" and e.get("outcome") == "published")]
    assert sorted(taken) == sorted(Path(n).stem for n in expected)
