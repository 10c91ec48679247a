"""One contract, two backends: the registry's semantics as the rest of the program relies on
them, run against the SQLite file and against a real PostgreSQL server (tests/pg.py), then
what only a shared server must add: claims that never share a row (SKIP LOCKED), leases
on the server's clock, fenced writes after a claim, claims of this node's rows only, and a
server that goes away and comes back.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from contimg_publisher.registry import (
    Candidate,
    Identity,
    Published,
    RegistryBackend,
    RegistryUnavailable,
    open_registry,
)
from contimg_publisher.registry.postgres import PostgresRegistry
from contimg_publisher.states import FailureKind
from tests import pg
from tests.pg import Server, pg_server, pg_template  # noqa: F401 - fixtures

LEASE = 600.0
BACKOFF = (60.0, 3600.0)


def candidate(n: int, checksum: str | None = None, path: str | None = None) -> Candidate:
    path = path or f"/stage/mosaics/2026/m_{n:06d}.fits"
    return Candidate(data_id=f"m_{n:06d}", data_type="mosaic", base_path="/stage",
                     stage_path=path, stage_path_bytes=os.fsencode(path),
                     identity=Identity(1, 10_000 + n, 2880 * (n + 1), n, n),
                     checksum=checksum or f"sha256:{n:064x}", metadata={"NIMAGES": 10, "n": n})


Opener = Callable[..., RegistryBackend]


@pytest.fixture(params=["sqlite", "postgres"])
def opener(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Opener]:
    """Opens registries on one backend's store (the same file, or the same database)."""
    if request.param == "sqlite":
        target: str = str(tmp_path / "registry.sqlite3")
    else:
        server: Server = request.getfixturevalue("pg_server")
        target = server.uri
    opened: list[RegistryBackend] = []

    def open_one(node: str = "node-a", **kwargs: Any) -> RegistryBackend:
        reg = open_registry(target, kwargs.pop("busy_timeout_seconds", 10.0), node=node,
                            **kwargs)
        opened.append(reg)
        return reg

    yield open_one
    for reg in opened:
        reg.close()


def _fail(reg: RegistryBackend, data_id: str, owner: str | None, token: str | None,
          kind: str = FailureKind.OTHER, max_attempts: int = 3) -> Any:
    return reg.record_failure(data_id, owner, kind, "boom", max_attempts, *BACKOFF, 500,
                              token=token)


# --- the contract, on both backends ---------------------------------------------------------

def test_register_tells_new_unchanged_updated_and_conflict(opener: Opener) -> None:
    reg = opener()
    assert reg.register(candidate(1))[0] == "new"
    assert reg.register(candidate(1))[0] == "unchanged"
    outcome, row = reg.register(candidate(1, checksum="sha256:" + "ab" * 32))
    assert outcome == "updated" and row.checksum == "sha256:" + "ab" * 32
    assert reg.register(candidate(1, path="/stage/mosaics/other/m_000001.fits"))[0] == "conflict"
    row = reg.get("m_000001")
    assert row is not None and row.status == "staging" and row.metadata == {"NIMAGES": 10,
                                                                           "n": 1}
    assert row.identity == candidate(1).identity
    assert row.stage_path_bytes == os.fsencode(candidate(1).stage_path)
    assert reg.by_stage_path(candidate(1).stage_path)[0].data_id == "m_000001"
    assert candidate(1).stage_path in reg.stage_index()


def test_claim_takes_due_rows_in_order_under_a_lease(opener: Opener) -> None:
    reg = opener()
    with reg.write():  # one commit for the burst, on both backends
        for n in range(3):
            reg.register(candidate(n), now=1000.0 + n)
    before = reg.clock()
    first = reg.claim("owner-1", LEASE, limit=2)
    after = reg.clock()
    assert [r.data_id for r in first] == ["m_000000", "m_000001"]
    for r in first:
        assert r.status == "publishing" and r.lease_owner == "owner-1"
        assert r.lease_expires_at is not None
        assert before + LEASE - 1 <= r.lease_expires_at <= after + LEASE + 1
    assert [r.data_id for r in reg.claim("owner-2", LEASE, limit=5)] == ["m_000002"]
    assert reg.claim("owner-2", LEASE) == []
    assert reg.next_due_at() is None
    assert {r.data_id for r in reg.publishing()} == {"m_000000", "m_000001", "m_000002"}
    assert reg.counts()["publishing"] == 3


def test_publish_records_the_row_the_log_and_the_counts(opener: Opener) -> None:
    reg = opener()
    reg.register(candidate(7))
    (row,) = reg.claim("owner-1", LEASE)
    assert reg.set_publish_plan("owner-1", row.data_id, "/products/m_000007.fits",
                                "/products/.contimg-tmp.m_000007.fits.7", ["m.weights.fits"],
                                token=row.claim_token)
    planned = reg.get(row.data_id)
    assert planned is not None and planned.publish_step == "planned"
    assert planned.publish_temp == "/products/.contimg-tmp.m_000007.fits.7"
    assert reg.renew_lease(row.data_id, "owner-1", LEASE, token=row.claim_token)
    assert reg.mark_published(Published(row.data_id, "/products/m_000007.fits", "auto",
                                        ("m.weights.fits",)), "owner-1", token=row.claim_token)
    done = reg.get(row.data_id)
    assert done is not None and done.status == "published"
    assert done.published_path == "/products/m_000007.fits" and done.lease_owner is None
    assert done.sidecars == ["m.weights.fits"] and done.publish_mode == "auto"
    (record,) = reg.publish_records(row.data_id, row.stage_path)
    assert record.published_path == "/products/m_000007.fits"
    assert record.checksum == candidate(7).checksum
    assert reg.counts()["published"] == 1 and reg.counts()["staging"] == 0
    assert reg.published_at(row.stage_path)
    assert reg.by_published_path("/products/m_000007.fits") is not None
    assert reg.register(candidate(7))[0] == "published"  # the staged copy is a leftover


def test_failures_back_off_then_fail_and_retry_makes_them_due(opener: Opener) -> None:
    reg = opener()
    reg.register(candidate(1))
    (row,) = reg.claim("owner-1", LEASE)
    now = reg.clock()
    outcome = _fail(reg, row.data_id, "owner-1", row.claim_token, max_attempts=2)
    assert outcome is not None and outcome.status == "staging" and outcome.attempts == 1
    assert outcome.next_attempt_at is not None
    assert now + BACKOFF[0] * 0.85 <= outcome.next_attempt_at <= now + BACKOFF[0] * 1.15 + 5
    assert reg.next_due_at() == pytest.approx(outcome.next_attempt_at)
    assert reg.claim("owner-1", LEASE) == []  # not due yet
    (again,) = reg.claim("owner-1", LEASE, now=outcome.next_attempt_at + 1)
    outcome = _fail(reg, again.data_id, "owner-1", again.claim_token, max_attempts=2)
    assert outcome is not None and outcome.exhausted and outcome.status == "failed"
    assert reg.next_due_at() is None
    history = reg.history(row.data_id)
    assert [(f.attempt, f.kind, f.error) for f in history] == [(1, "other", "boom"),
                                                               (2, "other", "boom")]
    assert reg.failures_since(now - 60) == 2
    assert reg.counts()["failed"] == 1
    assert [r.data_id for r in reg.by_status("failed")] == [row.data_id]
    assert reg.retry(all_failed=True) == [row.data_id]
    retried = reg.get(row.data_id)
    assert retried is not None and retried.status == "staging"
    assert retried.publish_attempts == 0
    assert [r.data_id for r in reg.claim("owner-1", LEASE)] == [row.data_id]


def test_an_interrupted_publish_uses_no_attempt(opener: Opener) -> None:
    reg = opener()
    reg.register(candidate(1))
    (row,) = reg.claim("owner-1", LEASE)
    outcome = _fail(reg, row.data_id, None, None, kind=FailureKind.INTERRUPTED)
    assert outcome is not None and not outcome.counted and outcome.attempts == 0
    assert outcome.next_attempt_at is None
    assert [r.data_id for r in reg.claim("owner-2", LEASE)] == [row.data_id]


def test_hold_keeps_a_product_from_claims_and_a_request_passes_it(opener: Opener) -> None:
    reg = opener()
    reg.register(candidate(1))
    reg.register(candidate(2))
    assert reg.set_hold("m_000001", True)
    assert [r.data_id for r in reg.claim("owner-1", LEASE, limit=5)] == ["m_000002"]
    assert [p.data_id for p, _why in reg.held(["mosaic"])] == ["m_000001"]
    assert reg.request_publish("m_000001")
    assert reg.held(["mosaic"]) == []
    (row,) = reg.claim("owner-1", LEASE)
    assert row.data_id == "m_000001"
    assert reg.mark_published(Published(row.data_id, "/p/m1.fits", "auto"), "owner-1",
                              token=row.claim_token)
    done = reg.get("m_000001")
    assert done is not None and done.publish_mode == "manual"
    assert reg.set_hold("m_000002", False)


def test_requeue_gives_a_claim_back_due_now(opener: Opener) -> None:
    reg = opener()
    reg.register(candidate(1))
    (row,) = reg.claim("owner-1", LEASE)
    assert reg.requeue(row.data_id, "owner-1", token=row.claim_token)
    back = reg.get(row.data_id)
    assert back is not None and back.status == "staging" and back.publish_attempts == 0
    assert back.lease_owner is None and back.lease_expires_at is None
    assert reg.next_due_at() == 0.0
    assert reg.requeue(row.data_id, "owner-1", token=row.claim_token) is False


def test_another_owners_writes_change_nothing(opener: Opener) -> None:
    reg = opener()
    reg.register(candidate(1))
    (row,) = reg.claim("owner-1", LEASE)
    assert not reg.set_publish_plan("intruder", row.data_id, "/p/x", "/p/.t", [])
    assert not reg.renew_lease(row.data_id, "intruder", LEASE)
    assert not reg.record_checksum(row.data_id, "intruder", "sha256:" + "0" * 64, None)
    assert not reg.mark_published(Published(row.data_id, "/p/x", "auto"), "intruder")
    assert _fail(reg, row.data_id, "intruder", None) is None
    assert not reg.requeue(row.data_id, "intruder")
    assert not reg.reject_claimed(row.data_id, "intruder", "bad", 500)
    still = reg.get(row.data_id)
    assert still is not None and still.status == "publishing"
    assert still.lease_owner == "owner-1" and still.publish_step == "claimed"


def test_two_connections_see_each_others_commits(opener: Opener) -> None:
    a, b = opener(), opener()
    a.register(candidate(1))
    row = b.get("m_000001")
    assert row is not None and b.counts()["staging"] == 1
    (claimed,) = b.claim("owner-b", LEASE)
    assert a.claim("owner-a", LEASE) == []
    assert a.get("m_000001") is not None
    assert claimed.data_id == "m_000001"


def test_a_write_around_many_calls_is_one_transaction(opener: Opener) -> None:
    reg = opener()
    with pytest.raises(RuntimeError), reg.write():
        reg.register(candidate(1))
        reg.register(candidate(2))
        raise RuntimeError("rolled back")
    assert reg.get("m_000001") is None and reg.get("m_000002") is None
    with reg.write():
        reg.register(candidate(1))
        with pytest.raises(RuntimeError), reg.write():  # a savepoint: only it is undone
            reg.register(candidate(2))
            raise RuntimeError("inner")
    assert reg.get("m_000001") is not None and reg.get("m_000002") is None


def _raw(reg: RegistryBackend, sql: str) -> None:
    """A statement other code (the pipeline's own writers) makes, on either backend."""
    if isinstance(reg, PostgresRegistry):
        with reg.write() as conn:
            conn.execute(sql)
    else:
        reg.conn.execute(sql)  # type: ignore[attr-defined]


def test_the_qa_gate_holds_and_says_why_alike_on_both_backends(opener: Opener) -> None:
    from contimg_publisher.qa import Condition
    reg = opener()
    reg.set_qa_gate([Condition("mosaic", "qa_status", ("passed", "100%"), True)])
    for n in range(3):
        reg.register(candidate(n))
    _raw(reg, "UPDATE data_registry SET qa_status = 'passed' WHERE data_id = 'm_000000'")
    _raw(reg, "UPDATE data_registry SET qa_status = '100%' WHERE data_id = 'm_000001'")
    assert [r.data_id for r in reg.claim("o", LEASE, limit=5)] == ["m_000000", "m_000001"]
    assert reg.qa_holds(["m_000000", "m_000001", "m_000002"]) == {
        "m_000002": "QA gate: waits for qa_status one of 'passed', '100%' (now NULL)"}
    assert [(p.data_id, why) for p, why in reg.held(["mosaic"])] == [
        ("m_000002", "QA gate: waits for qa_status one of 'passed', '100%' (now NULL)")]
    assert reg.next_due_at() is None and reg.oldest_unheld_waiting() is None
    assert reg.request_publish("m_000002")  # an operator's request passes the gate
    assert [r.data_id for r in reg.claim("o", LEASE)] == ["m_000002"]


def test_heartbeats_list_a_running_daemon_until_its_clean_stop(opener: Opener,
                                                                request: pytest.FixtureRequest
                                                                ) -> None:
    reg = opener(node="node-h")
    reg.heartbeat("host:1:2:3", 1_700_000_000.0, "0.1.0")
    reg.heartbeat("host:1:2:3", 1_700_000_000.0, "0.1.0")  # renewed, not a second row
    beats = reg.heartbeats()
    if "sqlite" in request.node.callspec.id:
        assert beats == []  # one host, one daemon: the lock file names it
        return
    (beat,) = beats
    assert (beat.owner, beat.node, beat.pid, beat.version) == ("host:1:2:3", "node-h",
                                                               os.getpid(), "0.1.0")
    assert beat.started == 1_700_000_000.0 and 0 <= beat.age_seconds < 5 and not beat.stale
    assert beat.to_json()["stale"] is False
    reg.end_heartbeat("host:1:2:3")
    assert reg.heartbeats() == []


# --- what a shared server adds (PostgreSQL only) --------------------------------------------

@pytest.fixture
def server(pg_server: Server) -> Server:  # noqa: F811 - the fixture of tests/pg.py
    return pg_server


def _pg(server: Server, node: str = "node-a", **kwargs: Any) -> PostgresRegistry:
    reg = open_registry(server.uri, kwargs.pop("busy_timeout_seconds", 10.0), node=node,
                        **kwargs)
    assert isinstance(reg, PostgresRegistry)
    return reg


def test_concurrent_claims_never_take_the_same_row(server: Server) -> None:
    with _pg(server) as setup, setup.write():
        for n in range(300):
            setup.register(candidate(n))
    start = threading.Barrier(4)
    claimed: dict[str, list[str]] = {}

    def worker(owner: str) -> None:
        got: list[str] = []
        with _pg(server) as reg:
            start.wait()
            while rows := reg.claim(owner, LEASE, limit=3):
                got += [r.data_id for r in rows]
        claimed[owner] = got

    threads = [threading.Thread(target=worker, args=(f"owner-{i}",)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    every = [d for got in claimed.values() for d in got]
    assert len(every) == len(set(every)) == 300, "a row was claimed twice, or one was missed"
    assert sum(1 for got in claimed.values() if got) >= 2, claimed.keys()


def test_a_claim_skips_rows_another_transaction_holds_without_waiting(server: Server) -> None:
    a, b = _pg(server), _pg(server, busy_timeout_seconds=30)
    try:
        for n in range(4):
            a.register(candidate(n))
        with a.write():
            held = a.claim("owner-a", LEASE, limit=2)  # locked until this block commits
            started = time.monotonic()
            taken = b.claim("owner-b", LEASE, limit=4)
            waited = time.monotonic() - started
        assert [r.data_id for r in held] == ["m_000000", "m_000001"]
        assert [r.data_id for r in taken] == ["m_000002", "m_000003"]
        assert waited < 2.0, f"the second claim waited {waited:.1f} s for the first's rows"
    finally:
        a.close()
        b.close()


def test_lease_expiry_is_the_servers_clock_not_the_clients(server: Server) -> None:
    with _pg(server) as reg:
        reg.register(candidate(1))
        server_now = float(server.psql("SELECT extract(epoch from now())"))
        # The client's idea of the time (a day behind) decides what is due, never the lease.
        (row,) = reg.claim("owner-1", 30.0, now=time.time() + 86400)
        assert row.lease_expires_at is not None
        assert server_now + 30 - 2 <= row.lease_expires_at <= server_now + 30 + 5
        stored = float(server.psql(
            "SELECT lease_expires_at - extract(epoch from now()) FROM data_registry"))
        assert 25 < stored <= 30
        assert reg.renew_lease(row.data_id, "owner-1", 90.0, now=0.0, token=row.claim_token)
        renewed = reg.get(row.data_id)
        assert renewed is not None and renewed.lease_expires_at is not None
        assert renewed.lease_expires_at >= server_now + 90 - 2


def test_an_expired_claim_taken_again_fences_the_old_owners_writes(server: Server) -> None:
    a, b = _pg(server), _pg(server)
    try:
        a.register(candidate(1))
        (mine,) = a.claim("owner-a", 0.5)
        deadline = time.monotonic() + 10
        while b.clock() <= (mine.lease_expires_at or 0) and time.monotonic() < deadline:
            time.sleep(0.1)
        # Node A stalled past its lease: B's reconciliation gives the row back, and B claims.
        assert _fail(b, mine.data_id, None, None, kind=FailureKind.INTERRUPTED) is not None
        (theirs,) = b.claim("owner-b", LEASE)
        assert theirs.claim_token and theirs.claim_token != mine.claim_token
        # Every write A still makes for its old claim affects no row.
        assert not a.set_publish_plan("owner-a", mine.data_id, "/p/x", "/p/.t", [],
                                      token=mine.claim_token)
        assert not a.renew_lease(mine.data_id, "owner-a", LEASE, token=mine.claim_token)
        assert not a.mark_published(Published(mine.data_id, "/p/x", "auto"), "owner-a",
                                    token=mine.claim_token)
        assert _fail(a, mine.data_id, "owner-a", mine.claim_token) is None
        assert not a.requeue(mine.data_id, "owner-a", token=mine.claim_token)
        row = b.get(mine.data_id)
        assert row is not None and row.status == "publishing"
        assert row.lease_owner == "owner-b" and row.claim_token == theirs.claim_token
        assert server.psql("SELECT count(*) FROM publish_log") == "0"
        # The token fences even the same owner: A's own new claim outlives its old one.
        assert b.requeue(theirs.data_id, "owner-b", token=theirs.claim_token)
        (again,) = a.claim("owner-a", LEASE)
        assert not a.mark_published(Published(mine.data_id, "/p/x", "auto"), "owner-a",
                                    token=mine.claim_token)
        assert a.mark_published(Published(mine.data_id, "/p/x", "auto"), "owner-a",
                                token=again.claim_token)
        assert server.psql("SELECT count(*) FROM publish_log") == "1"
    finally:
        a.close()
        b.close()


def test_a_node_claims_and_rescans_only_its_own_rows(server: Server) -> None:
    a, b = _pg(server, node="node-a"), _pg(server, node="node-b")
    try:
        a.register(candidate(1))
        b.register(candidate(2, path="/stage/mosaics/2026/m_000002.fits"))
        assert b.register(candidate(1))[0] == "conflict"  # node A's product, same path
        assert [r.data_id for r in b.claim("owner-b", LEASE, limit=5)] == ["m_000002"]
        assert b.claim("owner-b", LEASE, data_id="m_000001") == []
        assert candidate(1).stage_path not in b.stage_index()
        assert b.by_stage_path(candidate(1).stage_path) == []
        assert [r.data_id for r in a.claim("owner-a", LEASE, limit=5)] == ["m_000001"]
        assert {r.data_id for r in a.publishing()} == {"m_000001"}
        assert a.counts()["publishing"] == b.counts()["publishing"] == 2  # operators see all
        node_of = dict(line.split("|") for line in server.psql(
            "SELECT data_id, node FROM data_registry ORDER BY data_id").splitlines())
        assert node_of == {"m_000001": "node-a", "m_000002": "node-b"}
    finally:
        a.close()
        b.close()


def test_a_server_that_goes_away_is_unavailable_then_used_again(server: Server) -> None:
    with _pg(server, busy_timeout_seconds=2) as reg:
        reg.register(candidate(1))
        server.stop("immediate")
        with pytest.raises(RegistryUnavailable):
            reg.get("m_000001")
        with pytest.raises(RegistryUnavailable):
            reg.probe()
        with pytest.raises(RegistryUnavailable):
            reg.register(candidate(2))
        server.start()
        deadline = time.monotonic() + 30
        while True:
            try:
                reg.probe()
                break
            except RegistryUnavailable:
                assert time.monotonic() < deadline, "never reconnected"
                time.sleep(0.2)
        assert reg.register(candidate(2))[0] == "new"
        assert {r.data_id for r in reg.products()} == {"m_000001", "m_000002"}


def test_schema_version_is_recorded_and_a_newer_one_refused(server: Server) -> None:
    from contimg_publisher.registry import RegistryError
    with _pg(server) as reg:
        assert reg.version() == reg.schema_version  # PostgreSQL's schema: its own numbers
        assert reg.migrate() == []
        newer = reg.schema_version + 1
    server.psql(f"UPDATE contimg_schema SET version = {newer}")
    with pytest.raises(RegistryError, match="newer than this program"):
        _pg(server)


def test_fixture_reason_when_unavailable() -> None:
    """The server fixture's own check: here it either finds a way to run or says why."""
    reason = pg.unavailable()
    assert reason is None or "postgres" in reason.lower()


def test_a_heartbeat_that_stopped_is_flagged_stale(server: Server) -> None:
    with _pg(server, node="node-a") as a, _pg(server, node="node-b") as b:
        a.heartbeat("a:1:1:1", 1.0, "0.1.0")
        b.heartbeat("b:2:2:2", 2.0, "0.1.0")
        server.psql("UPDATE heartbeats SET last_seen = last_seen - 300 WHERE node = 'node-b'")
        by_node = {h.node: h for h in a.heartbeats()}
        assert not by_node["node-a"].stale
        assert by_node["node-b"].stale and by_node["node-b"].age_seconds >= 300


def test_two_nodes_registering_one_data_id_at_once_get_new_and_conflict(
        server: Server) -> None:
    a, b = _pg(server, node="node-a"), _pg(server, node="node-b")
    outcome: list[str] = []
    try:
        with a.write():
            assert a.register(candidate(1))[0] == "new"  # not committed yet
            other = threading.Thread(target=lambda: outcome.append(b.register(candidate(1))[0]))
            other.start()
            time.sleep(0.5)  # B's insert waits on A's uncommitted key
        other.join(30)
        assert outcome == ["conflict"]  # the caller takes another id (the detector: .vN)
        row = a.get("m_000001")
        assert row is not None and row.node == "node-a"
    finally:
        a.close()
        b.close()


# --- folder-name reservations ------------------------------------------------------------

def test_sqlite_grants_every_reservation_and_records_none(tmp_path: Path) -> None:
    """Single host, single writer (the lock file): nothing to arbitrate."""
    reg = open_registry(str(tmp_path / "registry.sqlite3"))
    try:
        assert reg.reserve_name("/products/images/a.image", "a", "owner-1") is None
        assert reg.reserve_name("/products/images/a.image", "b", "owner-2") is None
        assert reg.reservations() == []
        assert reg.release_name("/products/images/a.image", "a") is False
    finally:
        reg.close()


def test_one_name_reserved_by_many_nodes_at_once_goes_to_exactly_one(server: Server) -> None:
    path = "/products/images/field.image"
    start = threading.Barrier(6)
    got: dict[str, str | None] = {}

    def reserve(i: int) -> None:
        with _pg(server, node=f"node-{i}") as reg:
            start.wait()
            got[f"p{i}"] = reg.reserve_name(path, f"p{i}", f"owner-{i}", token=f"t{i}")

    threads = [threading.Thread(target=reserve, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    winners = [d for d, holder in got.items() if holder is None]
    assert len(got) == 6 and len(winners) == 1, got
    assert {holder for d, holder in got.items() if d not in winners} == set(winners)
    assert server.psql("SELECT data_id, claim_token FROM name_reservations") == \
        f"{winners[0]}|t{winners[0][1:]}"


def test_a_reservation_passes_to_the_same_products_next_claim_and_is_released(
        server: Server) -> None:
    a, b = _pg(server, node="node-a"), _pg(server, node="node-b")
    try:
        a.register(candidate(1))
        first = a.claim("owner-1", LEASE)[0]
        path = "/products/images/m.image"
        assert a.reserve_name(path, first.data_id, "owner-1", token=first.claim_token) is None
        assert b.reserve_name(path, "other", "owner-b", token="x") == first.data_id
        assert [r.claim_token for r in a.reservations()] == [first.claim_token]
        assert b.reservations() == []  # node-b's own only
        a.requeue(first.data_id, "owner-1", token=first.claim_token)
        again = a.claim("owner-2", LEASE)[0]
        assert a.reserve_name(path, again.data_id, "owner-2", token=again.claim_token) is None
        # The old claim's release changes nothing: the reservation is the new claim's now.
        assert a.release_name(path, first.data_id, token=first.claim_token) is False
        assert [r.owner for r in a.reservations()] == ["owner-2"]
        assert a.mark_published(Published(first.data_id, path, "auto"), "owner-2",
                                token=again.claim_token)
        assert a.reservations() == []  # settled: published under the reserved name
        assert server.psql("SELECT count(*) FROM name_reservations") == "1"  # kept
        assert b.reserve_name(path, "other", "owner-b") == first.data_id
        assert a.release_name(path, first.data_id) is True
        assert b.reserve_name(path, "other", "owner-b") is None
    finally:
        a.close()
        b.close()


def test_a_schema_6_database_gains_the_reservations_table_and_keeps_its_rows(
        server: Server) -> None:
    with _pg(server) as reg:
        reg.register(candidate(1))
    server.psql("DROP TABLE name_reservations; UPDATE contimg_schema SET version = 6")
    with _pg(server, migrate=False) as old:
        assert old.version() == 6
    with _pg(server) as reg:  # opening migrates
        assert reg.version() == 7
        assert [p.data_id for p in reg.products()] == ["m_000001"]
        assert reg.reserve_name("/products/images/a.image", "m_000001", "owner-1") is None
    assert server.psql("SELECT data_id FROM name_reservations") == "m_000001"
