"""The registry on real SQLite files: legacy adoption, refusal of files it must not touch,
several processes claiming at once, a write lock held by someone else, failure records.
"""

from __future__ import annotations

import hashlib
import multiprocessing
import os
import random
import re
import sqlite3
import subprocess
import sys
from pathlib import Path
from typing import Any

import apsw
import pytest

from contimg_publisher.registry import (
    SCHEMA_VERSION,
    Candidate,
    Identity,
    Published,
    Registry,
    RegistryBusy,
    RegistryError,
    truncate,
)

# The legacy schema exactly as design.md gives it, written here rather than imported so the
# test does not trust the module's own copy.
LEGACY_FULL = """
CREATE TABLE data_registry (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    data_type TEXT NOT NULL,
    data_id TEXT NOT NULL UNIQUE,
    base_path TEXT NOT NULL,
    status TEXT NOT NULL DEFAULT 'staging',
    stage_path TEXT NOT NULL,
    published_path TEXT,
    created_at REAL NOT NULL,
    staged_at REAL NOT NULL,
    published_at REAL,
    publish_mode TEXT,
    metadata_json TEXT,
    qa_status TEXT,
    validation_status TEXT,
    finalization_status TEXT DEFAULT 'pending',
    auto_publish_enabled INTEGER DEFAULT 1,
    publish_attempts INTEGER DEFAULT 0,
    publish_error TEXT,
    photometry_status TEXT,
    photometry_job_id TEXT,
    UNIQUE(data_type, data_id)
);
CREATE TABLE data_relationships (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    parent_data_id TEXT NOT NULL,
    child_data_id TEXT NOT NULL,
    relationship_type TEXT NOT NULL,
    UNIQUE(parent_data_id, child_data_id, relationship_type)
);
CREATE TABLE data_tags (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    data_id TEXT NOT NULL,
    tag TEXT NOT NULL,
    UNIQUE(data_id, tag)
);
"""
OPTIONAL = ("publish_attempts", "publish_error", "photometry_status", "photometry_job_id")
LEGACY_OLD = "\n".join(line for line in LEGACY_FULL.splitlines()
                       if not line.strip().startswith(OPTIONAL))
BASE_COLUMNS = ("id", "data_type", "data_id", "base_path", "status", "stage_path",
                "published_path", "created_at", "staged_at", "published_at", "publish_mode",
                "metadata_json", "qa_status", "validation_status", "finalization_status",
                "auto_publish_enabled")
ALL_STATUSES = ("staging", "publishing", "published", "failed", "rejected")


def _build_legacy(path: Path, with_optional: bool) -> None:
    """A registry as the older code left it: Python sqlite3, rollback journal, every status."""
    path.parent.mkdir(parents=True, exist_ok=True)
    db = sqlite3.connect(path)
    db.executescript(LEGACY_FULL if with_optional else LEGACY_OLD)
    columns = list(BASE_COLUMNS[1:]) + (list(OPTIONAL) if with_optional else [])
    t0 = 1_700_000_000.25
    for i, status in enumerate(ALL_STATUSES * 3):
        values: dict[str, Any] = {
            "data_type": "mosaic" if i % 2 else "image",
            "data_id": f"legacy_{i:03d}_{status}",
            "base_path": "/stage/dsa110-contimg",
            "status": status,
            "stage_path": f"/stage/dsa110-contimg/mosaics/2024/ü_{i}.fits",
            "published_path": (f"/data/products/mosaics/ü_{i}.fits"
                               if status == "published" else None),
            "created_at": t0 + i + 0.125,
            "staged_at": t0 + i + 0.5,
            "published_at": t0 + i + 60.75 if status == "published" else None,
            "publish_mode": ("auto", "manual", None)[i % 3],
            "metadata_json": '{"NIMAGES": 10, "OBJECT": "ü"}' if i % 4 else None,
            "qa_status": ("passed", None)[i % 2],
            "validation_status": ("ok", "warn", None)[i % 3],
            "finalization_status": ("pending", "done", None)[i % 3],
            "auto_publish_enabled": i % 2,
            "publish_attempts": i % 6,
            "publish_error": f"OSError: [Errno 28] #{i}" if i % 3 == 0 else None,
            "photometry_status": "queued" if i % 5 == 0 else None,
            "photometry_job_id": f"job-{i}" if i % 5 == 0 else None,
        }
        db.execute(f"INSERT INTO data_registry ({', '.join(columns)}) VALUES "
                   f"({', '.join('?' * len(columns))})", [values[c] for c in columns])
    # A row relying on every column default, as the oldest writer did.
    db.execute("INSERT INTO data_registry (data_type, data_id, base_path, stage_path, created_at,"
               " staged_at) VALUES ('mosaic', 'legacy_defaults', '/s', '/s/m.fits', 1.5, 2.5)")
    db.executemany("INSERT INTO data_relationships (parent_data_id, child_data_id,"
                   " relationship_type) VALUES (?, ?, ?)",
                   [("legacy_000_staging", "legacy_001_publishing", "derived_from"),
                    ("legacy_002_published", "legacy_003_failed", "supersedes")])
    db.executemany("INSERT INTO data_tags (data_id, tag) VALUES (?, ?)",
                   [("legacy_000_staging", "science"), ("legacy_000_staging", "ü-tag"),
                    ("legacy_004_rejected", "bad")])
    db.commit()
    db.close()


def _rows(path: Path, table: str, columns: str = "*") -> list[tuple[Any, ...]]:
    db = sqlite3.connect(path)
    try:
        return db.execute(f"SELECT {columns} FROM {table} ORDER BY id").fetchall()
    finally:
        db.close()


def _dump(path: Path) -> dict[str, Any]:
    """Schema, pragmas and every row of every table."""
    db = sqlite3.connect(path)
    try:
        schema = db.execute("SELECT type, name, tbl_name, sql FROM sqlite_master"
                            " ORDER BY type, name").fetchall()
        tables = [r[0] for r in db.execute(
            "SELECT name FROM sqlite_master WHERE type = 'table' ORDER BY name")]
        rows = {t: db.execute(f"SELECT * FROM {t}").fetchall() for t in tables}
        pragmas = {p: db.execute(f"PRAGMA {p}").fetchone()[0]
                   for p in ("user_version", "application_id", "journal_mode")}
        return {"schema": schema, "rows": rows, "pragmas": pragmas}
    finally:
        db.close()


def _legacy_columns(with_optional: bool) -> str:
    return ", ".join(BASE_COLUMNS + (OPTIONAL if with_optional else ()))


def _check_adopted(path: Path, with_optional: bool, before: list[tuple[Any, ...]],
                   relationships: list[tuple[Any, ...]], tags: list[tuple[Any, ...]]) -> None:
    after = _rows(path, "data_registry", _legacy_columns(with_optional))
    assert after == before
    assert _rows(path, "data_relationships") == relationships
    assert _rows(path, "data_tags") == tags
    if not with_optional:
        # Columns the older file lacked now exist with the legacy defaults.
        added = _rows(path, "data_registry", ", ".join(OPTIONAL))
        assert added == [(0, None, None, None)] * len(before)
    dump = _dump(path)
    assert dump["pragmas"]["user_version"] == SCHEMA_VERSION
    assert dump["pragmas"]["journal_mode"] == "wal"
    names = {r[1] for r in dump["schema"]}
    assert {"data_registry", "data_relationships", "data_tags", "publish_failures"} <= names


@pytest.mark.parametrize("with_optional", [True, False], ids=["publish-columns", "oldest"])
def test_legacy_adoption_through_registry_keeps_every_value(tmp_path, with_optional):
    """Older readers share the file, so adoption may only add: every legacy value stays."""
    path = tmp_path / "registry.sqlite3"
    _build_legacy(path, with_optional)
    before = _rows(path, "data_registry", _legacy_columns(with_optional))
    relationships, tags = _rows(path, "data_relationships"), _rows(path, "data_tags")
    assert {r[4] for r in before} == set(ALL_STATUSES)

    with Registry(path) as reg:
        assert reg.version() == SCHEMA_VERSION
        counts = reg.counts()
        row = reg.get("legacy_002_published")
    assert counts == {"staging": 4, "publishing": 3, "published": 3, "failed": 3,
                      "rejected": 3}
    assert row is not None and row.published_path == "/data/products/mosaics/ü_2.fits"
    _check_adopted(path, with_optional, before, relationships, tags)

    # Migrating again changes nothing at all.
    first = _dump(path)
    with Registry(path) as reg:
        assert reg.migrate() == []
    assert _dump(path) == first

    # An older writer still inserts and reads through its own column list.
    db = sqlite3.connect(path)
    db.execute("INSERT INTO data_registry (data_type, data_id, base_path, stage_path,"
               " created_at, staged_at) VALUES ('mosaic', 'old_writer', '/s', '/s/x.fits', 1, 2)")
    db.commit()
    assert db.execute("SELECT status, finalization_status, auto_publish_enabled FROM"
                      " data_registry WHERE data_id = 'old_writer'").fetchone() == (
        "staging", "pending", 1)
    db.close()


@pytest.mark.slow
@pytest.mark.parametrize("with_optional", [True, False], ids=["publish-columns", "oldest"])
def test_legacy_adoption_through_cli_migrate(make_sandbox, with_optional):
    """The operator's `migrate` adopts the same way, and a second run reports nothing to do."""
    box = make_sandbox()
    _build_legacy(box.registry, with_optional)
    before = _rows(box.registry, "data_registry", _legacy_columns(with_optional))
    relationships, tags = _rows(box.registry, "data_relationships"), _rows(box.registry,
                                                                           "data_tags")
    # Read commands refuse an unmigrated file instead of changing it behind the operator.
    listed = box.cli("list")
    assert listed.returncode == 1 and "run `contimg-publisher migrate`" in listed.stderr

    out = box.cli("migrate")
    assert out.returncode == 0, out.stderr
    assert f"migrated from schema version 0 to {SCHEMA_VERSION}" in out.stdout
    _check_adopted(box.registry, with_optional, before, relationships, tags)

    first = _dump(box.registry)
    again = box.cli("migrate")
    assert again.returncode == 0, again.stderr
    assert f"already at schema version {SCHEMA_VERSION}" in again.stdout
    assert _dump(box.registry) == first

    rows = box.registry_rows()
    assert sorted(r["data_id"] for r in rows) == sorted(r[2] for r in before)


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _siblings(path: Path) -> list[str]:
    return sorted(p.name for p in path.parent.iterdir())


@pytest.mark.parametrize("journal", ["delete", "wal"])
def test_newer_schema_is_refused_and_file_untouched(tmp_path, make_sandbox, journal):
    """A file written by a newer program must not be changed by an older one, not even its
    journal mode."""
    path = tmp_path / "registry.sqlite3"
    if journal == "wal":
        Registry(path).close()
    db = sqlite3.connect(path)
    if journal == "delete":
        db.executescript(LEGACY_FULL)
    db.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    db.commit()
    db.close()
    digest, names = _sha(path), _siblings(path)

    for migrate in (True, False):
        with pytest.raises(RegistryError) as info:
            Registry(path, migrate=migrate)
        message = str(info.value)
        assert str(path) in message and f"schema version {SCHEMA_VERSION + 1} is newer" in message
    assert _sha(path) == digest
    assert _siblings(path) == names

    box = make_sandbox("box")
    box.registry.parent.mkdir(parents=True)
    box.registry.write_bytes(path.read_bytes())
    out = box.cli("migrate")
    assert out.returncode == 1
    assert f"schema version {SCHEMA_VERSION + 1} is newer" in out.stderr
    assert _sha(box.registry) == digest


@pytest.mark.parametrize("content", [b"not a database\n" * 100, b"\x00" * 4096,
                                     b"SQLite format 2\x00" + b"x" * 1000])
def test_non_sqlite_file_is_refused_and_untouched(tmp_path, make_sandbox, content):
    """A wrong path in the config must not turn someone's file into a database."""
    path = tmp_path / "registry.sqlite3"
    path.write_bytes(content)
    names = _siblings(path)
    with pytest.raises(RegistryError) as info:
        Registry(path)
    assert "not an SQLite database" in str(info.value) and str(path) in str(info.value)
    assert path.read_bytes() == content
    assert _siblings(path) == names

    box = make_sandbox("box")
    box.registry.parent.mkdir(parents=True)
    box.registry.write_bytes(content)
    out = box.cli("migrate")
    assert out.returncode == 1 and "not an SQLite database" in out.stderr
    assert box.registry.read_bytes() == content


def test_other_application_is_refused_and_untouched(tmp_path):
    path = tmp_path / "other.sqlite3"
    db = sqlite3.connect(path)
    db.execute("PRAGMA application_id = 12345")
    db.execute("CREATE TABLE t (x)")
    db.commit()
    db.close()
    digest = _sha(path)
    with pytest.raises(RegistryError, match="another application"):
        Registry(path)
    assert _sha(path) == digest


# --- candidates and concurrency ----------------------------------------------------------------

def register_all(reg: Registry, candidates: list[Candidate]) -> list[tuple[str, Any]]:
    """register() for many products, composed in one write: one commit for all."""
    with reg.write():
        return [reg.register(c) for c in candidates]


def candidate(n: int, checksum: str | None = None) -> Candidate:
    path = f"/stage/mosaics/2026/m_{n:06d}.fits"
    return Candidate(data_id=f"m_{n:06d}", data_type="mosaic", base_path="/stage",
                     stage_path=path, stage_path_bytes=os.fsencode(path),
                     identity=Identity(1, 10_000 + n, 2880 * (n + 1), n, n),
                     checksum=checksum or f"sha256:{n:064x}", metadata={"NIMAGES": 10, "n": n})


def _claim_worker(path: str, owner: str, start: Any, out: Any) -> None:
    """Claim until nothing is due, in small random batches, reporting every claimed id."""
    rng = random.Random(owner)
    claimed: list[str] = []
    with Registry(path, busy_timeout_seconds=60) as reg:
        start.wait()
        while True:
            rows = reg.claim(owner, 600, limit=rng.randint(1, 7))
            if not rows:
                break
            assert all(r.status == "publishing" and r.lease_owner == owner for r in rows)
            claimed += [r.data_id for r in rows]
    out.put((owner, claimed))


@pytest.mark.slow
def test_concurrent_processes_claim_each_row_exactly_once(tmp_path):
    """Several publishers on one file: no row is published twice and none is lost."""
    path = tmp_path / "registry.sqlite3"
    with Registry(path) as reg:
        outcomes = register_all(reg, [candidate(n) for n in range(500)])
    assert [o for o, _ in outcomes] == ["new"] * 500

    ctx = multiprocessing.get_context("spawn")
    start, out = ctx.Event(), ctx.Queue()
    owners = [f"worker-{i}" for i in range(6)]
    procs = [ctx.Process(target=_claim_worker, args=(str(path), o, start, out)) for o in owners]
    for p in procs:
        p.start()
    start.set()
    results = dict(out.get(timeout=120) for _ in procs)
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0

    every = [d for claimed in results.values() for d in claimed]
    assert len(every) == 500 and len(set(every)) == 500
    assert set(every) == {f"m_{n:06d}" for n in range(500)}
    db = sqlite3.connect(path)
    by_owner = dict(db.execute("SELECT lease_owner, COUNT(*) FROM data_registry"
                               " WHERE status = 'publishing' GROUP BY lease_owner").fetchall())
    db.close()
    assert by_owner == {o: len(c) for o, c in results.items() if c}
    assert sum(by_owner.values()) == 500


# --- busy ----------------------------------------------------------------------------------------

HOLDER = r"""
import sys, time, apsw
conn = apsw.Connection(sys.argv[1])
conn.execute("BEGIN IMMEDIATE")
conn.execute("INSERT INTO data_tags (data_id, tag) VALUES ('holder', 'x')")
print("locked", flush=True)
if sys.argv[2] == "stdin":
    sys.stdin.readline()
    conn.execute("ROLLBACK")
else:
    time.sleep(float(sys.argv[2]))
    conn.execute("COMMIT")
print("released", flush=True)
"""


def _hold_lock(path: Path, how: str) -> subprocess.Popen[str]:
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(path), how], text=True,
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    assert proc.stdout is not None and proc.stdout.readline() == "locked\n"
    return proc


def test_write_lock_held_longer_than_busy_timeout_fails_cleanly(tmp_path):
    """The caller gets a clear error naming the file, and none of its batch is written."""
    path = tmp_path / "registry.sqlite3"
    with Registry(path, busy_timeout_seconds=0.3) as reg:
        holder = _hold_lock(path, "stdin")
        try:
            with pytest.raises(RegistryBusy) as info:
                register_all(reg, [candidate(n) for n in range(5)])
            message = str(info.value)
            assert str(path) in message and "busy timeout (0.3 s)" in message
            assert "nothing was written" in message
            assert not reg.conn.in_transaction
        finally:
            holder.communicate("go\n", timeout=30)
        assert holder.returncode == 0
        assert reg.counts() == dict.fromkeys(("staging", "publishing", "published", "failed",
                                              "rejected"), 0)
        # The same connection works again once the lock is free.
        assert [o for o, _ in register_all(reg, [candidate(n) for n in range(5)])] == ["new"] * 5
    assert len(_rows(path, "data_registry")) == 5
    assert _rows(path, "data_tags") == []


def test_write_lock_held_shorter_than_busy_timeout_waits(tmp_path):
    path = tmp_path / "registry.sqlite3"
    with Registry(path, busy_timeout_seconds=30) as reg:
        holder = _hold_lock(path, "0.5")
        outcomes = register_all(reg, [candidate(n) for n in range(5)])
        out, _ = holder.communicate(timeout=30)
    assert out == "released\n" and holder.returncode == 0
    assert [o for o, _ in outcomes] == ["new"] * 5
    assert len(_rows(path, "data_registry")) == 5
    # The holder committed first; both writes are there.
    assert [r[1:] for r in _rows(path, "data_tags")] == [("holder", "x")]


# --- failure records -----------------------------------------------------------------------------

@pytest.fixture
def reg(tmp_path):
    with Registry(tmp_path / "registry.sqlite3") as registry:
        yield registry


def _fail(reg: Registry, data_id: str, kind: str = "no_space", error: str = "disk full",
          now: float = 1000.0, max_attempts: int = 3, initial: float = 60.0,
          maximum: float = 3600.0, chars: int = 500, seed: int = 0) -> Any:
    claimed = reg.claim("me", 60, data_id=data_id, now=now)
    assert [r.data_id for r in claimed] == [data_id]
    return reg.record_failure(data_id, "me", kind, error, max_attempts, initial, maximum, chars,
                              now=now, host="host-a", pid=4242, rng=random.Random(seed))


def test_truncate_is_exact_at_the_limit():
    assert truncate("x" * 80, 80) == "x" * 80
    cut = truncate("x" * 81, 80)
    assert len(cut) == 80 and cut.endswith("…") and cut.startswith("x" * 79)
    assert truncate("abc", 1) == "…"


def test_error_text_is_truncated_at_exactly_error_max_chars(reg):
    register_all(reg, [candidate(1), candidate(2)])
    exact = "e" * 120
    out = _fail(reg, "m_000001", error=exact, chars=120)
    assert out.error == exact
    long = "Traceback " + "y" * 5000
    out = _fail(reg, "m_000002", error=long, chars=120)
    assert len(out.error) == 120 and out.error == long[:119] + "…"
    assert reg.get("m_000002").publish_error == out.error
    assert [f.error for f in reg.history("m_000002")] == [out.error]
    assert reg.history("m_000001")[0].error == exact


def test_backoff_schedule_and_failed_at_max_attempts(reg):
    """initial * 2^(attempt-1), capped, within +-10 % jitter; due exactly when scheduled."""
    reg.register(candidate(1))
    initial, maximum, attempts = 60.0, 600.0, 7
    now = 10_000.0
    for attempt in range(1, attempts):
        out = _fail(reg, "m_000001", now=now, max_attempts=attempts, initial=initial,
                    maximum=maximum, seed=attempt)
        base = min(maximum, initial * 2 ** (attempt - 1))
        delay = out.next_attempt_at - now
        assert out.status == "staging" and out.attempts == attempt and out.counted
        assert base * 0.9 <= delay <= min(maximum, base * 1.1)
        # Not due a moment before the scheduled time, due at it.
        assert reg.claim("other", 60, now=out.next_attempt_at - 0.001) == []
        got = reg.claim("other", 60, now=out.next_attempt_at)
        assert [r.data_id for r in got] == ["m_000001"]
        assert reg.requeue("m_000001", "other")
        now = out.next_attempt_at + 1
    last = _fail(reg, "m_000001", now=now, max_attempts=attempts)
    assert last.status == "failed" and last.exhausted and last.next_attempt_at is None
    row = reg.get("m_000001")
    assert row.status == "failed" and row.publish_attempts == attempts
    assert reg.claim("other", 60, now=now + 10**9) == []
    history = reg.history("m_000001")
    assert [f.attempt for f in history] == list(range(1, attempts + 1))
    assert {(f.kind, f.host, f.pid) for f in history} == {("no_space", "host-a", 4242)}


def test_jitter_spreads_retries(reg):
    register_all(reg, [candidate(n) for n in range(20)])
    delays = {round(_fail(reg, f"m_{n:06d}", seed=n).next_attempt_at - 1000.0, 6)
              for n in range(20)}
    assert len(delays) > 10 and all(54.0 <= d <= 66.0 for d in delays)


def test_history_survives_success_and_retry_makes_due_again(reg):
    """The history explains a product's past even after it was published."""
    register_all(reg, [candidate(1), candidate(2)])
    for _ in range(3):
        out = _fail(reg, "m_000001", error="EIO")
    assert out.status == "failed"
    # A failed product waits for an operator, however late it gets.
    assert [r.data_id for r in reg.claim("x", 60, limit=10, now=10**12)] == ["m_000002"]

    assert reg.retry(["m_000001", "no_such"]) == ["m_000001"]
    row = reg.get("m_000001")
    assert (row.status, row.publish_attempts, row.next_attempt_at) == ("staging", 0, None)
    got = reg.claim("me", 60, limit=10, now=1001.0)
    assert "m_000001" in [r.data_id for r in got]
    assert reg.mark_published(Published("m_000001", "/products/m1.fits", "auto"), "me",
                              now=1002.0)
    row = reg.get("m_000001")
    assert (row.status, row.published_path, row.lease_owner) == (
        "published", "/products/m1.fits", None)
    history = reg.history("m_000001")
    assert [(f.attempt, f.error) for f in history] == [(1, "EIO"), (2, "EIO"), (3, "EIO")]


def test_retry_all_failed(reg):
    register_all(reg, [candidate(n) for n in range(4)])
    for n in (0, 2):
        for _ in range(2):
            _fail(reg, f"m_{n:06d}", max_attempts=2)
    assert sorted(reg.retry(all_failed=True)) == ["m_000000", "m_000002"]
    assert reg.counts()["failed"] == 0


@pytest.mark.parametrize("kind", ["interrupted", "source_changed"])
def test_uncounted_kinds_do_not_use_an_attempt(reg, kind):
    """An interrupted copy or a file still changing says nothing about the product."""
    reg.register(candidate(1))
    _fail(reg, "m_000001", kind="no_space")
    for _ in range(5):
        out = _fail(reg, "m_000001", kind=kind, error=kind, max_attempts=3, now=5000.0)
        if kind == "source_changed":
            # It must be described again before it can be claimed; do so.
            assert reg.get("m_000001").checksum is None
            reg.register(candidate(1))
        assert out.status == "staging" and not out.counted and out.attempts == 1
        assert out.next_attempt_at is None
    row = reg.get("m_000001")
    assert row.status == "staging" and row.publish_attempts == 1
    history = reg.history("m_000001")
    assert [f.kind for f in history] == ["no_space"] + [kind] * 5
    assert len(history) == 6


def test_source_changed_row_is_not_claimed_until_described_again(reg):
    reg.register(candidate(1))
    _fail(reg, "m_000001", kind="source_changed")
    assert reg.claim("me", 60, now=10**9) == []
    assert reg.register(candidate(1, checksum="sha256:" + "f" * 64))[0] == "updated"
    assert [r.data_id for r in reg.claim("me", 60, now=10**9)] == ["m_000001"]


def test_failure_of_a_row_not_ours_changes_nothing(reg):
    reg.register(candidate(1))
    reg.claim("owner-a", 60, data_id="m_000001")
    assert reg.record_failure("m_000001", "owner-b", "other", "x", 3, 1, 10, 500) is None
    row = reg.get("m_000001")
    assert (row.status, row.lease_owner, row.publish_attempts) == ("publishing", "owner-a", 0)
    assert reg.history("m_000001") == []


def test_register_is_idempotent_and_never_resets_published(reg):
    c = candidate(1)
    assert reg.register(c)[0] == "new"
    assert reg.register(c)[0] == "unchanged"
    reg.claim("me", 60, data_id=c.data_id)
    assert reg.register(c)[0] == "busy"
    reg.mark_published(Published(c.data_id, "/p/m.fits", "auto"), "me")
    assert reg.register(c)[0] == "published"
    row = reg.get(c.data_id)
    assert (row.status, row.published_path) == ("published", "/p/m.fits")
    assert len(_rows(Path(reg.path), "data_registry")) == 1


def test_unknown_failure_kind_is_refused(reg):
    reg.register(candidate(1))
    reg.claim("me", 60, data_id="m_000001")
    with pytest.raises(ValueError, match="unknown failure kind"):
        reg.record_failure("m_000001", "me", "cosmic_ray", "x", 3, 1, 10, 500)
    assert reg.get("m_000001").publish_attempts == 0


def test_write_rolls_back_on_error(reg):
    """A write that raises leaves nothing behind (explicit BEGIN IMMEDIATE, then ROLLBACK)."""
    with pytest.raises(apsw.ConstraintError), reg.write() as cur:
        cur.execute("INSERT INTO data_tags (data_id, tag) VALUES ('a', 't')")
        cur.execute("INSERT INTO data_tags (data_id, tag) VALUES ('a', 't')")
    assert not reg.conn.in_transaction
    assert list(reg.conn.execute("SELECT * FROM data_tags")) == []


@pytest.mark.slow
def test_migration_blocked_by_a_writer_fails_cleanly_and_leaves_the_file_legacy(make_sandbox):
    """An adoption that cannot get the write lock changes nothing, so it can simply be rerun."""
    box = make_sandbox(registry={"busy_timeout_seconds": 0.3})
    _build_legacy(box.registry, with_optional=False)
    db = sqlite3.connect(box.registry)
    db.execute("PRAGMA journal_mode=WAL")
    db.close()
    before = _dump(box.registry)
    holder = _hold_lock(box.registry, "stdin")
    try:
        with pytest.raises(RegistryBusy) as info:
            Registry(box.registry, busy_timeout_seconds=0.3)
        assert str(box.registry) in str(info.value)
        out = box.cli("migrate")
        assert out.returncode == 1 and "busy timeout (0.3 s)" in out.stderr
    finally:
        holder.communicate("go\n", timeout=30)
    assert _dump(box.registry) == before
    assert box.cli("migrate").returncode == 0
    assert _dump(box.registry)["pragmas"]["user_version"] == SCHEMA_VERSION


def _migrate_worker(path: str, start: Any, out: Any) -> None:
    start.wait()
    with Registry(path, busy_timeout_seconds=60) as reg:
        out.put(reg.version())


@pytest.mark.slow
def test_concurrent_migrations_of_one_legacy_file_apply_each_step_once(tmp_path):
    """The daemon and an operator's `migrate` may start together; both must end up at the
    current version with every row kept and no step applied twice."""
    path = tmp_path / "registry.sqlite3"
    _build_legacy(path, with_optional=False)
    before = _rows(path, "data_registry", _legacy_columns(False))
    ctx = multiprocessing.get_context("spawn")
    start, out = ctx.Event(), ctx.Queue()
    procs = [ctx.Process(target=_migrate_worker, args=(str(path), start, out)) for _ in range(4)]
    for p in procs:
        p.start()
    start.set()
    versions = [out.get(timeout=120) for _ in procs]
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    assert versions == [SCHEMA_VERSION] * 4
    assert _rows(path, "data_registry", _legacy_columns(False)) == before
    columns = [r[1] for r in sqlite3.connect(path).execute("PRAGMA table_info(data_registry)")]
    assert len(columns) == len(set(columns))


def test_held_and_undescribed_rows_are_not_claimed(reg):
    """Held rows wait on purpose; legacy rows without a checksum must be described first."""
    register_all(reg, [candidate(1), candidate(2)])
    with reg.write() as cur:
        cur.execute("INSERT INTO data_registry (data_type, data_id, base_path, stage_path,"
                    " created_at, staged_at) VALUES ('mosaic', 'legacy', '/s', '/s/l.fits', 1, 1)")
    assert reg.set_hold("m_000001", True)
    got = reg.claim("me", 60, limit=10)
    assert [r.data_id for r in got] == ["m_000002"]
    assert reg.claim("me", 60, limit=10) == []
    assert reg.set_hold("m_000001", False)
    assert [r.data_id for r in reg.claim("me", 60, limit=10)] == ["m_000001"]
    assert reg.get("legacy").status == "staging"


def test_lease_renewal_belongs_to_its_owner(reg):
    reg.register(candidate(1))
    reg.claim("me", 60, now=1000.0)
    assert reg.renew_lease("m_000001", "me", 120, now=1030.0)
    assert not reg.renew_lease("m_000001", "someone-else", 999, now=1030.0)
    row = reg.get("m_000001")
    assert (row.lease_owner, row.lease_expires_at) == ("me", 1150.0)


def test_legacy_rows_past_the_attempt_limit_become_failed_only_when_asked(tmp_path):
    """`migrate` keeps legacy values; turning exhausted rows into `failed` is a separate,
    explicit operation of the daemon."""
    path = tmp_path / "registry.sqlite3"
    _build_legacy(path, with_optional=True)
    with Registry(path) as reg:
        staging = {r.data_id: r.publish_attempts for r in reg.products(status="staging")}
        exhausted = reg.mark_exhausted(3, now=5.0)
        after = reg.counts()
    assert sorted(exhausted) == sorted(d for d, n in staging.items() if n >= 3)
    assert exhausted, "the legacy fixture must hold a staging row past the limit"
    assert after["failed"] == 3 + len(exhausted)
    kept = dict(_rows(path, "data_registry", "data_id, publish_attempts"))
    assert all(kept[d] == staging[d] for d in staging)


def test_counts_agree_with_a_plain_group_by_for_any_status_value(tmp_path):
    """counts() takes `published` as a remainder, so every other value an older writer may
    have stored (unknown words, other case, numbers, blobs, NULL) must be counted apart."""
    path = tmp_path / "registry.sqlite3"
    db = sqlite3.connect(path)
    db.executescript(LEGACY_FULL.replace("status TEXT NOT NULL DEFAULT 'staging'",
                                         "status TEXT DEFAULT 'staging'"))
    values: list[Any] = (["published"] * 50 + ["staging"] * 3 + ["failed", "rejected",
                         "publishing", "finalized", "Published", "", "zzz", 7, b"\x00",
                         None, None])
    for i, status in enumerate(values):
        db.execute("INSERT INTO data_registry (data_type, data_id, base_path, status,"
                   " stage_path, created_at, staged_at) VALUES ('m', ?, '/s', ?, '/s/x', 1, 1)",
                   (f"d{i}", status))
    db.commit()
    db.close()
    with Registry(path) as reg:
        counts = reg.counts()
        plain = dict(reg.conn.execute("SELECT status, COUNT(*) FROM data_registry"
                                      " GROUP BY status"))
    assert counts == {**dict.fromkeys(ALL_STATUSES, 0), **plain}
    assert counts["published"] == 50 and counts[None] == 2
    assert counts["7"] == 1 and counts[b"\x00"] == 1  # TEXT affinity stores 7 as "7"
    assert sum(counts.values()) == len(values)


def test_counts_of_an_empty_registry_are_zero(reg):
    assert reg.counts() == dict.fromkeys(ALL_STATUSES, 0)


def test_claim_stops_a_batch_at_max_bytes_but_always_takes_one(reg):
    """Sizes are 2880 * (n + 1): 5760, 8640, 11520, ... in claim order."""
    register_all(reg, [candidate(n) for n in range(1, 6)])
    got = reg.claim("me", 60, limit=10, max_bytes=5760 + 8640)
    assert [r.data_id for r in got] == ["m_000001", "m_000002"]
    assert all(r.status == "publishing" and r.lease_owner == "me" for r in got)
    got = reg.claim("me", 60, limit=10, max_bytes=1)  # larger than the bound: taken alone
    assert [r.data_id for r in got] == ["m_000003"]
    got = reg.claim("me", 60, limit=10)
    assert [r.data_id for r in got] == ["m_000004", "m_000005"]


def test_publishes_recorded_together_skip_a_row_whose_claim_was_lost(reg):
    """mark_published composed in one commit: a row another owner holds is left as it is,
    the others are published, and a supersedes link is recorded."""
    register_all(reg, [candidate(n) for n in range(1, 4)])
    reg.claim("me", 60, limit=2)
    reg.claim("other", 60, limit=1)
    with reg.write():
        done = [reg.mark_published(item, "me") for item in (
            Published("m_000001", "/p/m1.fits", "auto", ("m1.png",)),
            Published("m_000002", "/p/m2.fits", "auto", (), supersedes="m_000001"),
            Published("m_000003", "/p/m3.fits", "auto"))]
    assert done == [True, True, False]
    assert [reg.get(f"m_00000{n}").status for n in (1, 2, 3)] == [
        "published", "published", "publishing"]
    assert reg.get("m_000001").sidecars == ["m1.png"]
    assert reg.relationships("m_000002") == [
        {"parent": "m_000002", "child": "m_000001", "type": "supersedes"}]
    assert reg.set_publish_plan("me", "m_000003", "/p/m3.fits", None) is False


def _plans(reg: Registry, call: Any) -> list[tuple[str, list[str]]]:
    """(statement, query plan lines) of every SELECT (or WITH ... SELECT) that `call` runs
    on reg's connection, captured with APSW's exec tracer and explained by SQLite itself."""
    seen: list[str] = []

    def tracer(_cursor: Any, sql: str, _bindings: Any) -> bool:
        seen.append(sql)
        return True

    reg.conn.exec_trace = tracer
    try:
        call()
    finally:
        reg.conn.exec_trace = None
    plans = []
    for sql in seen:
        if not sql.lstrip().upper().startswith(("SELECT", "WITH")):
            continue
        args = dict.fromkeys(re.findall(r"(?<![:\w]):([A-Za-z_]\w*)", sql), 0.0)
        plans.append((sql, [str(r[3]) for r in reg.conn.execute(
            "EXPLAIN QUERY PLAN " + sql, args)]))
    return plans


@pytest.mark.slow
def test_claim_and_next_due_read_only_the_due_rows_index(tmp_path: Path) -> None:
    """A long history and many held rows: the questions the main loop asks on every wake-up
    (what is due next, claim a batch) are answered from the partial indexes of due rows,
    never by a scan of the table or of every waiting row."""
    with Registry(tmp_path / "reg.sqlite3") as reg:
        with reg.write():
            for n in range(20_000):
                reg.register(candidate(n))
        with reg.write() as cur:  # history: published; waiting on hold; a few due
            cur.execute("UPDATE data_registry SET status = 'published' WHERE id <= 10000")
            cur.execute("UPDATE data_registry SET auto_publish_enabled = 0"
                        " WHERE id > 10000 AND id <= 19990")
            cur.execute("ANALYZE")
        reg.request_publish("m_012500")
        for call in (reg.next_due_at,
                     lambda: reg.claim("me", 60, limit=256, max_bytes=1 << 30)):
            plans = _plans(reg, call)
            on_table = [(sql, plan) for sql, plan in plans if "data_registry" in sql
                        and "WHERE id IN" not in sql]
            assert on_table, plans
            for sql, plan in on_table:
                assert any("USING INDEX data_registry_due_" in line for line in plan), \
                    (sql, plan)
                assert not any(line.startswith("SCAN data_registry") and "INDEX" not in line
                               for line in plan), (sql, plan)
        # What was claimed: the asked-for row first, then the ten due rows, none on hold.
        assert reg.counts()["publishing"] == 11
        held = [p.data_id for p in reg.products(status="publishing")
                if not p.auto_publish_enabled]
        assert held == ["m_012500"]
        assert reg.next_due_at() is None
