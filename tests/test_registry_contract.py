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

from contimg_publisher import paths
from contimg_publisher.registry import (
    Candidate,
    Identity,
    Planned,
    Published,
    RegistryBackend,
    RegistryUnavailable,
    open_registry,
)
from contimg_publisher.registry.postgres import SCHEMA_VERSION as PG_SCHEMA_VERSION
from contimg_publisher.registry.postgres import PostgresRegistry
from contimg_publisher.states import FailureKind
from tests import pg
from tests.pg import Server

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

@pytest.mark.slow
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


@pytest.mark.slow
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


def test_a_publish_after_failures_reads_as_the_legacy_code_left_it(opener: Opener) -> None:
    """After a success the legacy columns say what the legacy code's success said (attempts
    0, no error); the earlier failures stay in the failure history."""
    reg = opener()
    reg.register(candidate(1))
    (row,) = reg.claim("owner-1", LEASE)
    outcome = _fail(reg, row.data_id, "owner-1", row.claim_token)
    assert outcome is not None and outcome.attempts == 1
    (again,) = reg.claim("owner-1", LEASE, now=outcome.next_attempt_at + 1)  # type: ignore[operator]
    assert reg.mark_published(Published(row.data_id, "/products/m_000001.fits", "auto"),
                              "owner-1", token=again.claim_token)
    done = reg.get(row.data_id)
    assert done is not None and done.status == "published"
    assert (done.publish_attempts, done.publish_error) == (0, None)
    assert [(f.attempt, f.kind, f.error) for f in reg.history(row.data_id)] == [
        (1, "other", "boom")]


@pytest.mark.slow
def test_an_interrupted_publish_uses_no_attempt(opener: Opener) -> None:
    reg = opener()
    reg.register(candidate(1))
    (row,) = reg.claim("owner-1", LEASE)
    outcome = _fail(reg, row.data_id, None, None, kind=FailureKind.INTERRUPTED)
    assert outcome is not None and not outcome.counted and outcome.attempts == 0
    assert outcome.next_attempt_at is None
    assert [r.data_id for r in reg.claim("owner-2", LEASE)] == [row.data_id]


@pytest.mark.slow
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


def test_a_batch_registers_plans_and_publishes_as_each_one_would(opener: Opener) -> None:
    """register_many, set_publish_plans and mark_published_many: the outcomes, rows, records
    and events of the single calls, in the items' order; fenced row by row."""
    reg = opener()
    reg.register(candidate(1))
    reg.register(candidate(2, path="/stage/mosaics/other/m_000002.fits"))
    burst = [candidate(0), candidate(1), candidate(2), candidate(3), candidate(4)]
    outcomes = reg.register_many(burst)
    assert [(o, r.data_id) for o, r in outcomes] == [
        ("new", "m_000000"), ("unchanged", "m_000001"), ("conflict", "m_000002"),
        ("new", "m_000003"), ("new", "m_000004")]
    made = reg.get("m_000003")
    assert made is not None and made.status == "staging" and made.identity == \
        candidate(3).identity and made.metadata == {"NIMAGES": 10, "n": 3}
    assert made.stage_path_bytes == os.fsencode(candidate(3).stage_path)
    assert reg.register_many([]) == []
    at = reg.by_stage_paths([candidate(3).stage_path, candidate(2).stage_path, "/nowhere"])
    assert [r.data_id for r in at[candidate(3).stage_path]] == ["m_000003"]
    assert at[candidate(2).stage_path] == [] and at["/nowhere"] == []
    assert reg.by_stage_paths([]) == {}
    claimed = {r.data_id: r for r in reg.claim("owner-1", LEASE, limit=10)}
    assert set(claimed) == {"m_000000", "m_000001", "m_000002", "m_000003", "m_000004"}
    ids = ["m_000004", "m_000000", "m_000003"]
    plans = [Planned(i, f"/products/{i}.fits", f"/products/.t.{i}", ("w.fits",),
                     claimed[i].claim_token) for i in ids]
    assert reg.set_publish_plans("owner-1", plans) == set(ids)
    assert reg.set_publish_plans("intruder", plans) == set()
    planned = reg.get("m_000004")
    assert planned is not None and planned.publish_step == "planned"
    assert planned.publish_temp == "/products/.t.m_000004" and planned.sidecars == ["w.fits"]
    assert reg.set_publish_plans("owner-1", []) == set()
    items = [(Published(i, f"/products/{i}.fits", "auto", ("w.fits",),
                        "m_000001" if i == "m_000000" else None), claimed[i].claim_token)
             for i in ids]
    assert reg.mark_published_many(items, "intruder", now=5000.0) == set()
    assert reg.mark_published_many(items, "owner-1", now=5000.0) == set(ids)
    assert reg.mark_published_many(items, "owner-1", now=5000.0) == set()  # done already
    for i in ids:
        row = reg.get(i)
        assert row is not None and row.status == "published" and row.lease_owner is None
        assert row.published_path == f"/products/{i}.fits" and row.published_at == 5000.0
        assert row.sidecars == ["w.fits"] and row.publish_mode == "auto"
        (record,) = reg.publish_records(i, row.stage_path)
        assert record.published_path == f"/products/{i}.fits"
    events = [reg.events_for(i) for i in ids]
    assert all(len(e) == 1 for e in events)
    assert [e[0].seq for e in events] == sorted(e[0].seq for e in events)
    assert events[1][0].payload["supersedes"] == "m_000001"
    assert events[0][0].payload["published_path"] == "/products/m_000004.fits"
    assert reg.relationships("m_000000") == [
        {"parent": "m_000000", "child": "m_000001", "type": "supersedes"}]
    assert reg.counts()["published"] == 3 and reg.counts()["publishing"] == 2
    assert reg.mark_published_many([], "owner-1") == set()


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


@pytest.mark.slow
def test_two_connections_see_each_others_commits(opener: Opener) -> None:
    a, b = opener(), opener()
    a.register(candidate(1))
    row = b.get("m_000001")
    assert row is not None and b.counts()["staging"] == 1
    (claimed,) = b.claim("owner-b", LEASE)
    assert a.claim("owner-a", LEASE) == []
    assert a.get("m_000001") is not None
    assert claimed.data_id == "m_000001"


@pytest.mark.slow
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


@pytest.mark.slow
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


def _raw_value(reg: RegistryBackend, sql: str) -> Any:
    """One value, read as other code (the pipeline's API) reads it, on either backend."""
    if isinstance(reg, PostgresRegistry):
        with reg.write() as conn:
            row = conn.execute(sql).fetchone()
            return None if row is None else next(iter(row.values()))
    row = reg.conn.execute(sql).fetchone()  # type: ignore[attr-defined]
    return None if row is None else row[0]


def test_a_products_own_record_gates_it_and_follows_its_publish_on_both_backends(
        opener: Opener) -> None:
    """[products.record]: the table is found once the pipeline creates it; a row's verdict
    lets its product go, holds it or keeps it waiting, each with its reason; the commit that
    records the publish points the row at the published path."""
    from contimg_publisher.qa import Record
    from contimg_publisher.registry import RegistryError
    record = Record("mosaic", "mosaics", "path", (("qa_status", ("PASS", "WARN")),),
                    (("qa_status", ("FAIL",)),), "wait")
    reg = opener()
    reg.set_qa_gate([], [record])
    ids = [candidate(n).data_id for n in range(4)]
    for n in range(4):
        reg.register(candidate(n))
    no_table = ("record: waits for table mosaics (not in the registry database yet: the "
                "pipeline creates it when it first runs)")
    assert reg.qa_holds(ids) == {i: no_table for i in ids}
    assert reg.claim("o", LEASE, limit=5) == []
    _raw(reg, "CREATE TABLE mosaics (id INTEGER PRIMARY KEY, path TEXT UNIQUE NOT NULL,"
              " qa_status TEXT CHECK (qa_status IN ('PASS', 'WARN', 'FAIL')))")
    for n, verdict in ((0, "'PASS'"), (1, "'FAIL'"), (2, "NULL")):
        _raw(reg, f"INSERT INTO mosaics (id, path, qa_status) VALUES ({n},"
                  f" '{candidate(n).stage_path}', {verdict})")
    assert reg.qa_holds(ids) == {
        ids[1]: "record: mosaics.qa_status is 'FAIL'",
        ids[2]: "record: waits for mosaics.qa_status one of 'PASS', 'WARN' (now NULL)",
        ids[3]: f"record: waits for a row of mosaics with path = '{candidate(3).stage_path}'"}
    assert [p.data_id for p, _why in reg.held(["mosaic"])] == ids[1:]
    (row,) = reg.claim("o", LEASE, limit=5)
    assert row.data_id == ids[0]
    assert reg.mark_published(Published(row.data_id, "/products/m_000000.fits", "auto"), "o",
                              token=row.claim_token)
    assert _raw_value(reg, "SELECT path FROM mosaics WHERE id = 0") == "/products/m_000000.fits"
    assert _raw_value(reg, "SELECT path FROM mosaics WHERE id = 1") == candidate(1).stage_path
    # A stale row already naming the published path: the publish is still recorded, and the
    # pipeline's rows are left as they are (a unique path column cannot hold it twice).
    _raw(reg, "INSERT INTO mosaics (id, path) VALUES (9, '/products/m_000002.fits')")
    assert reg.request_publish(ids[2])
    (row,) = reg.claim("o", LEASE)
    assert reg.mark_published(Published(row.data_id, "/products/m_000002.fits", "auto"), "o",
                              token=row.claim_token)
    assert _raw_value(reg, "SELECT path FROM mosaics WHERE id = 2") == candidate(2).stage_path
    assert _raw_value(reg, "SELECT path FROM mosaics WHERE id = 9") == "/products/m_000002.fits"
    # A column the rule names and the table lacks: refused, naming it; the gate is kept.
    bad = Record("mosaic", "mosaics", "path", (("verdict", ("PASS",)),), (), "wait")
    with pytest.raises(RegistryError, match="table 'mosaics' has no column 'verdict'"):
        reg.set_qa_gate([], [bad])
    assert reg.qa_holds([ids[1]]) == {ids[1]: "record: mosaics.qa_status is 'FAIL'"}
    with pytest.raises(RegistryError, match="one of this program's own tables"):
        reg.set_qa_gate([], [Record("mosaic", "publish_log", "stage_path", (), (), "wait")])


@pytest.mark.slow
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


# --- the outbox, the audit, rebuild and quarantine, on both backends -----------------------

def _publish(reg: RegistryBackend, n: int, supersedes: str | None = None) -> str:
    """Register, claim and publish candidate n; returns its data_id."""
    reg.register(candidate(n))
    (row,) = reg.claim("owner-1", LEASE, data_id=f"m_{n:06d}")
    assert reg.mark_published(Published(row.data_id, f"/products/mosaics/m_{n:06d}.fits",
                                        "auto", (f"m_{n:06d}.weights.fits",), supersedes),
                              "owner-1", token=row.claim_token)
    return row.data_id


@pytest.mark.slow
def test_each_publish_writes_one_event_in_its_own_commit(opener: Opener,
                                                         request: pytest.FixtureRequest
                                                         ) -> None:
    reg = opener(node="node-e")
    first = _publish(reg, 1)
    (event,) = reg.events_for(first)
    row = reg.get(first)
    assert row is not None
    assert (event.type, event.data_id) == ("published", first)
    body = event.to_json()
    assert body["event_id"] == event.event_id and body["sequence"] == event.seq
    assert (body["published_path"], body["checksum"], body["size_bytes"], body["sidecars"]) \
        == (row.published_path, row.checksum, row.size_bytes, row.sidecars)
    assert body["metadata"] == {"NIMAGES": 10, "n": 1} and body["publish_mode"] == "auto"
    assert body["published_at"] == row.published_at
    if "postgres" in request.node.callspec.id:
        assert body["node"] == "node-e"  # the node whose daemon published it
    # A publish rolled back takes its event with it.
    reg.register(candidate(2))
    (claimed,) = reg.claim("owner-1", LEASE)
    with pytest.raises(RuntimeError), reg.write():
        assert reg.mark_published(Published(claimed.data_id, "/products/m2.fits", "auto"),
                                  "owner-1", token=claimed.claim_token)
        assert len(reg.events_for(claimed.data_id)) == 1  # inside the transaction
        raise RuntimeError("the commit never happens")
    assert reg.events_for(claimed.data_id) == []
    still = reg.get(claimed.data_id)
    assert still is not None and still.status == "publishing"
    # A publish an older program finished is told once; a restored row is not told again.
    assert reg.confirm_published(claimed.data_id, "/products/m2.fits", 5760,
                                 "sha256:" + "2" * 64, {"n": 2})
    (confirmed,) = reg.events_for(claimed.data_id)
    assert confirmed.seq > event.seq and confirmed.payload["checksum"] == "sha256:" + "2" * 64
    assert reg.last_event_seq() == confirmed.seq


@pytest.mark.slow
def test_a_sinks_cursor_keeps_order_through_failures_dead_events_and_redelivery(
        opener: Opener) -> None:
    reg = opener()
    assert reg.add_sinks(["webhook"]) == ["webhook"]
    assert reg.add_sinks(["webhook"]) == []  # one seen before keeps its cursor
    ids = [_publish(reg, n) for n in range(3)]
    seqs = [e.seq for d in ids for e in reg.events_for(d)]
    assert seqs == sorted(seqs) and len(seqs) == 3
    head = reg.outbox_head("webhook")
    assert head is not None and head.seq == seqs[0]
    assert reg.record_delivery_failure("webhook", seqs[0], "HTTP 500 " + "x" * 900, 40) == (
        1, False)
    (state,) = reg.sink_states(["webhook"])
    assert (state.registered, state.undelivered, state.attempts, state.head) == (
        True, 3, 1, seqs[0])
    assert state.last_error is not None and len(state.last_error) == 40
    assert state.oldest_undelivered_at is not None
    assert reg.record_delivered("webhook", seqs[0]) == 2  # the attempt that took it counts
    assert reg.record_delivered("webhook", seqs[0]) == 0  # already past it
    head = reg.outbox_head("webhook")
    assert head is not None and head.seq == seqs[1]
    assert reg.record_delivery_failure("webhook", seqs[1], "down", 100, max_attempts=2) == (
        1, False)
    assert reg.record_delivery_failure("webhook", seqs[1], "down", 100, max_attempts=2) == (
        2, True)
    head = reg.outbox_head("webhook")
    assert head is not None and head.seq == seqs[2]  # the dead one no longer blocks
    (state,) = reg.sink_states(["webhook"])
    assert (state.undelivered, state.dead, state.attempts, state.last_error) == (1, 1, 0, None)
    listed = {e.seq: st["webhook"] for e, st in reg.events(["webhook"])}
    assert {k: v["state"] for k, v in listed.items()} == {seqs[1]: "dead", seqs[2]: "pending"}
    assert listed[seqs[1]]["attempts"] == 2 and listed[seqs[1]]["error"] == "down"
    everything = reg.events(["webhook"], everything=True)
    assert [(e.seq, st["webhook"]["state"]) for e, st in everything] == [
        (seqs[0], "delivered"), (seqs[1], "dead"), (seqs[2], "pending")]
    assert everything[0][1]["webhook"]["attempts"] == 2
    assert [e.seq for e, _ in reg.events(["webhook"], everything=True, after=seqs[0])] == \
        seqs[1:]
    assert reg.redeliver_dead(["webhook", "command"]) == {"webhook": 2}
    head = reg.outbox_head("webhook")
    assert head is not None and head.seq == seqs[1]
    assert reg.sink_states(["webhook"])[0].dead == 0
    # A sink configured later hears of publishes from then on, not the history.
    assert reg.sink_states(["command"])[0].registered is False
    assert reg.add_sinks(["webhook", "command"]) == ["command"]
    assert reg.outbox_head("command") is None
    later = _publish(reg, 9)
    head = reg.outbox_head("command")
    assert head is not None and head.data_id == later
    assert reg.outbox_head("nobody") is None


@pytest.mark.slow
def test_audit_findings_open_once_stay_open_and_resolve_with_the_state(opener: Opener) -> None:
    from contimg_publisher.registry import Finding
    reg = opener()
    a = Finding("checksum_changed", "/products/mosaics/a.fits", "other bytes", "a")
    b = Finding("dark_file", "/products/mosaics/stray.fits", "no row records it")
    t0 = reg.clock()
    new = reg.observe_findings([a, b], now=t0, state={"pass_started": t0, "cursor": 7})
    assert [(f.kind, f.path, f.data_id, f.first_seen) for f in new] == [
        (a.kind, a.path, "a", t0), (b.kind, b.path, None, t0)]
    assert reg.audit_state() == {"pass_started": t0, "cursor": 7}
    again = reg.observe_findings([Finding(a.kind, a.path, "still other bytes")], now=t0 + 5)
    assert again == []  # seen again: not new, not logged twice
    counts = reg.finding_counts()
    assert counts["checksum_changed"] == 1 and counts["dark_file"] == 1
    assert sum(counts.values()) == 2 and "missing" in counts
    open_ = {f.path: f for f in reg.findings()}
    assert open_[a.path].last_seen == t0 + 5 and open_[a.path].detail == "still other bytes"
    assert open_[a.path].data_id == "a"  # kept when not given again
    resolved = reg.resolve_findings(t0 + 1, now=t0 + 6, state={
        "pass_started": None, "cursor": 0, "last_pass_finished": t0 + 6,
        "last_pass_bytes": 12345, "note": "é"})
    assert [(f.path, f.resolved_at) for f in resolved] == [(b.path, t0 + 6)]
    assert [f.path for f in reg.findings()] == [a.path]
    assert len(reg.findings(open_only=False)) == 2 and len(reg.findings(limit=1)) == 1
    state = reg.audit_state()
    assert state == {"pass_started": None, "cursor": 0, "last_pass_finished": t0 + 6,
                     "last_pass_bytes": 12345, "note": "é"}
    assert isinstance(state["last_pass_bytes"], int)
    # Found again after it was resolved: a new finding, its history kept.
    (reopened,) = reg.observe_findings([b], now=t0 + 10)
    assert reopened.first_seen == t0 + 10 and len(reg.findings(open_only=False)) == 3
    reg.save_audit_state({"cursor": 42})
    assert reg.audit_state()["cursor"] == 42


@pytest.mark.slow
def test_rebuild_inserts_a_row_once_and_the_audit_sees_it_recorded(opener: Opener) -> None:
    from contimg_publisher.registry import Rebuilt
    reg = opener()
    item = Rebuilt("r_1", "mosaic", "/stage", "/stage/mosaics/r_1.fits",
                   b"/stage/mosaics/r_1.fits", "/products/mosaics/2026/r_1.fits",
                   1_700_000_000.5, 2880, "sha256:" + "e" * 64, {"OBJECT": "M31"},
                   ("r_1.weights.fits",))
    assert not reg.is_recorded(item.published_path)
    assert reg.insert_rebuilt(item) == "created"
    assert reg.insert_rebuilt(item) == "recorded"
    taken = Rebuilt(**{**item.__dict__, "published_path": "/products/mosaics/other.fits"})
    assert reg.insert_rebuilt(taken) == "id_taken"
    row = reg.get("r_1")
    assert row is not None and row.status == "published" and row.publish_mode == "rebuilt"
    assert (row.published_at, row.size_bytes, row.checksum, row.metadata, row.sidecars) == (
        1_700_000_000.5, 2880, item.checksum, {"OBJECT": "M31"}, ["r_1.weights.fits"])
    assert row.stage_path_bytes == item.stage_path_bytes
    (record,) = reg.publish_records("r_1", item.stage_path)
    assert record.published_path == item.published_path and record.publish_mode == "rebuilt"
    assert reg.is_recorded(item.published_path)
    assert reg.events_for("r_1") == []  # nothing new was published
    published = _publish(reg, 3)
    top = reg.recorded_in("/products/mosaics")
    assert top.names == {"m_000003.fits", "m_000003.weights.fits"} and top.folders == {"2026"}
    inner = reg.recorded_in("/products/mosaics/2026/")
    assert inner.names == {"r_1.fits", "r_1.weights.fits"} and inner.folders == frozenset()
    assert reg.recorded_in("/products/mosaics/20").names == frozenset()
    assert [r.data_id for r in reg.published_after(0, 10)] == ["r_1", published]
    first = reg.get("r_1")
    assert first is not None
    assert [r.data_id for r in reg.published_after(first.id, 10)] == [published]
    assert [r.data_id for r in reg.published_after(0, 10, "/products/mosaics/2026/")] == [
        "r_1"]


@pytest.mark.slow
def test_quarantine_is_recorded_and_the_file_leaves_the_unclaimed_list(opener: Opener) -> None:
    from contimg_publisher.registry import Quarantined
    reg = opener()
    raw = b"/stage/mosaics/junk-\xff.txt"
    shown = paths.display(raw)  # the display form every path column holds
    reg.replace_unclaimed([(shown, raw, "matches no product rule", 1.0, 9),
                           ("/stage/mosaics/kept.txt", b"/stage/mosaics/kept.txt",
                            "matches no product rule", 1.0, 3)])
    reg.reject("bad_1", "mosaic", "/stage", "/stage/mosaics/bad_1.fits",
               b"/stage/mosaics/bad_1.fits", "not FITS", None, 500, now=100.0)
    assert [r.data_id for r in reg.rejected_before(200.0)] == ["bad_1"]
    assert reg.rejected_before(50.0) == []
    item = Quarantined("unclaimed", None, shown, "/quarantine/junk.txt",
                       "matches no product rule", 9, "rename", 1_700_000_123.25)
    reg.record_quarantine(item, raw)
    assert [u.path for u in reg.unclaimed()] == ["/stage/mosaics/kept.txt"]
    other = Quarantined("rejected", "bad_1", "/stage/mosaics/bad_1.fits", "/q/bad_1.fits",
                        "not FITS", None, "copy", 1_700_000_200.0)
    reg.record_quarantine(other, b"/stage/mosaics/bad_1.fits")
    assert reg.quarantined() == [other, item]
    assert reg.quarantined(limit=1) == [other]


@pytest.mark.slow
def test_a_duty_is_held_by_one_daemon_until_it_resigns(opener: Opener,
                                                       request: pytest.FixtureRequest) -> None:
    a, b = opener(node="node-a"), opener(node="node-b")
    assert a.lead("outbox", "daemon-a", 60)
    assert a.lead("outbox", "daemon-a", 60)  # renewed
    if "sqlite" in request.node.callspec.id:
        assert b.lead("outbox", "daemon-b", 60)  # one daemon per file: nobody to share with
        return
    assert not b.lead("outbox", "daemon-b", 60)
    assert b.lead("audit", "daemon-b", 60)  # another duty, another holder
    assert not a.lead("audit", "daemon-a", 60)
    b.resign("outbox", "daemon-b")  # not its duty: changes nothing
    assert not b.lead("outbox", "daemon-b", 60)
    a.resign("outbox", "daemon-a")
    assert b.lead("outbox", "daemon-b", 60)
    assert not a.lead("outbox", "daemon-a", 60)


# --- what a shared server adds (PostgreSQL only) --------------------------------------------

@pytest.fixture
def server(pg_server: Server) -> Server:
    return pg_server


def _pg(server: Server, node: str = "node-a", **kwargs: Any) -> PostgresRegistry:
    reg = open_registry(server.uri, kwargs.pop("busy_timeout_seconds", 10.0), node=node,
                        **kwargs)
    assert isinstance(reg, PostgresRegistry)
    return reg


@pytest.mark.slow
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


@pytest.mark.slow
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


@pytest.mark.slow
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


@pytest.mark.slow
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


@pytest.mark.slow
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


@pytest.mark.slow
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


@pytest.mark.slow
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


@pytest.mark.slow
def test_a_heartbeat_that_stopped_is_flagged_stale(server: Server) -> None:
    with _pg(server, node="node-a") as a, _pg(server, node="node-b") as b:
        a.heartbeat("a:1:1:1", 1.0, "0.1.0")
        b.heartbeat("b:2:2:2", 2.0, "0.1.0")
        server.psql("UPDATE heartbeats SET last_seen = last_seen - 300 WHERE node = 'node-b'")
        by_node = {h.node: h for h in a.heartbeats()}
        assert not by_node["node-a"].stale
        assert by_node["node-b"].stale and by_node["node-b"].age_seconds >= 300


@pytest.mark.slow
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
        assert reg.version() == PG_SCHEMA_VERSION
        assert [p.data_id for p in reg.products()] == ["m_000001"]
        assert reg.reserve_name("/products/images/a.image", "m_000001", "owner-1") is None
    assert server.psql("SELECT data_id FROM name_reservations") == "m_000001"


@pytest.mark.slow
def test_a_duty_whose_lease_lapsed_passes_to_another_daemon(server: Server) -> None:
    with _pg(server, node="node-a") as a, _pg(server, node="node-b") as b:
        assert a.lead("audit", "daemon-a", 1.0)
        assert not b.lead("audit", "daemon-b", 1.0)
        time.sleep(1.3)  # daemon-a stopped renewing (killed, cut off)
        assert b.lead("audit", "daemon-b", 60)
        assert not a.lead("audit", "daemon-a", 60)
        rows = server.psql("SELECT duty, owner, node FROM duties")
        assert rows == "audit|daemon-b|node-b"


@pytest.mark.slow
def test_events_of_two_nodes_are_numbered_in_commit_order(server: Server) -> None:
    """A publish whose transaction is still open holds the outbox's order: another node's
    publish waits for its commit, so a sink's cursor can never pass an event that was not
    committed yet."""
    with _pg(server, node="node-a") as a, _pg(server, node="node-b") as b:
        a.register(candidate(1))
        b.register(candidate(2))
        (ra,) = a.claim("owner-a", LEASE)
        (rb,) = b.claim("owner-b", LEASE)
        b_done = threading.Event()

        def publish_b() -> None:
            assert b.mark_published(Published(rb.data_id, "/p/m2.fits", "auto"), "owner-b",
                                    token=rb.claim_token)
            b_done.set()

        with a.write():
            assert a.mark_published(Published(ra.data_id, "/p/m1.fits", "auto"), "owner-a",
                                    token=ra.claim_token)
            thread = threading.Thread(target=publish_b)
            thread.start()
            waiting = ""
            for _ in range(100):
                waiting = server.psql("SELECT count(*) FROM pg_stat_activity"
                                      " WHERE wait_event_type = 'Lock'"
                                      " AND wait_event = 'advisory'")
                if waiting == "1":
                    break
                time.sleep(0.05)
            assert waiting == "1", "node-b's publish did not wait for node-a's commit"
            assert not b_done.is_set()
        thread.join(10)
        assert b_done.is_set()
        (ea,) = a.events_for(ra.data_id)
        (eb,) = a.events_for(rb.data_id)
        assert ea.seq < eb.seq
        assert (ea.payload["node"], eb.payload["node"]) == ("node-a", "node-b")
        assert server.psql("SELECT node FROM outbox ORDER BY id") == "node-a\nnode-b"


def test_schema_7_is_migrated_to_8_with_the_outbox_and_audit_tables(server: Server) -> None:
    with _pg(server) as reg:
        _publish(reg, 1)
    server.psql("DROP TABLE outbox, outbox_sinks, outbox_deliveries, duties, audit_findings,"
                " audit_state, quarantine_log; UPDATE contimg_schema SET version = 7")
    with _pg(server, migrate=False) as old:
        assert old.version() == 7
    with _pg(server) as reg:
        assert reg.version() == PG_SCHEMA_VERSION == 8
        assert reg.events_for("m_000001") == []  # nothing published before is sent
        assert reg.finding_counts()["missing"] == 0
        assert _publish(reg, 2) == "m_000002" and len(reg.events_for("m_000002")) == 1


@pytest.mark.slow
def test_a_publish_its_client_stopped_driving_does_not_hold_other_nodes_back(
        server: Server) -> None:
    """node-a's transaction holds the outbox's order, then its client goes silent before
    the COMMIT (cut off, stopped): the server ends it, node-b's publish goes through, and
    node-a's publish is not recorded (its commit fails: nothing half-written)."""
    with _pg(server, node="node-a", busy_timeout_seconds=1.0) as a, \
            _pg(server, node="node-b") as b:
        a.register(candidate(1))
        b.register(candidate(2))
        (ra,) = a.claim("owner-a", LEASE)
        (rb,) = b.claim("owner-b", LEASE)
        took: list[float] = []

        def publish_b() -> None:
            start = time.monotonic()
            assert b.mark_published(Published(rb.data_id, "/p/m2.fits", "auto"), "owner-b",
                                    token=rb.claim_token)
            took.append(time.monotonic() - start)

        thread = threading.Thread(target=publish_b)
        with pytest.raises(RegistryUnavailable), a.write():
            assert a.mark_published(Published(ra.data_id, "/p/m1.fits", "auto"), "owner-a",
                                    token=ra.claim_token)
            thread.start()
            thread.join(20)  # the client drives nothing meanwhile
            assert took, "node-b's publish never went through"
        assert 4.0 <= took[0] < 15.0, took  # it waited for the server to end node-a's
        still = b.get(ra.data_id)
        assert still is not None and still.status == "publishing"
        assert b.events_for(ra.data_id) == [] and len(b.events_for(rb.data_id)) == 1
        # node-a's pool reconnects; its next publish is recorded.
        assert a.mark_published(Published(ra.data_id, "/p/m1.fits", "auto"), "owner-a",
                                token=ra.claim_token)
        assert len(a.events_for(ra.data_id)) == 1

