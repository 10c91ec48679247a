"""The SQLite backend of the registry: the embedded default, which needs no server.

The file is an SQLite database shared with older pipeline code that reads the
legacy `data_registry`, `data_relationships` and `data_tags` tables, so those
are adopted in place and only ever extended: nothing is dropped or renamed,
and legacy columns keep their meaning.

Each thread opens its own `Registry` (one APSW connection). Every write goes
through `Registry.write()`, an explicit `BEGIN IMMEDIATE` transaction, so no
statement depends on an implicit transaction.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import socket
import stat
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any, cast

import apsw

from contimg_publisher import fsguard, paths, treewalk
from contimg_publisher.qa import Condition, Record
from contimg_publisher.registry import records as records_sql
from contimg_publisher.registry.model import (
    EVENT_COLUMNS,
    EVENT_PUBLISHED,
    FAILURE_KINDS,
    FINDING_KINDS,
    HELD_BY_OPERATOR,
    STATUSES,
    Candidate,
    Event,
    Failure,
    FailureOutcome,
    Finding,
    Heartbeat,
    Identity,
    Product,
    Published,
    PublishRecord,
    Quarantined,
    Rebuilt,
    Recorded,
    RegistryBusy,
    RegistryError,
    RegistryGone,
    RegistryUnavailable,
    Reservation,
    SinkState,
    Unclaimed,
    _product,
    _same_bytes,
    _same_file,
    backoff_delay,
    checksum_known,
    delivery_states,
    event_of,
    folder_range,
    published_payload,
    qa_hold_sql,
    recorded_under,
    truncate,
)
from contimg_publisher.states import Delivery, FailureKind, Status

# This backend's schema, in its own steps (PostgreSQL numbers its own: model.py).
SCHEMA_VERSION = 8

APPLICATION_ID = 0x43494D50  # "CIMP"
PROBE_PATH = "\0contimg-publisher probe"  # never a file's name: no path holds a NUL

# This program's tables: never a product's own record ([products.record]).
TABLES = ("data_registry", "data_relationships", "data_tags", "publish_failures",
          "unclaimed_files", "publish_log", "audit_findings", "audit_state", "quarantine_log",
          "outbox", "outbox_sinks", "outbox_deliveries")

# What SQLite says when the file (or its -wal/-shm) cannot take a write.
_UNAVAILABLE = (apsw.FullError, apsw.IOError, apsw.ReadOnlyError, apsw.CantOpenError)

# Every form "the registry cannot be used now" takes: ours, or SQLite's own from a read
# made outside write() (an I/O error, a lock held through recovery). See unavailable().
TRANSIENT: tuple[type[Exception], ...] = (RegistryUnavailable, *_UNAVAILABLE, apsw.BusyError)


def unavailable(exc: Exception, path: str) -> RegistryUnavailable:
    """One of TRANSIENT as a RegistryUnavailable, with its reason."""
    if isinstance(exc, RegistryUnavailable):
        return exc
    return RegistryUnavailable(f"registry {path}: cannot be used now "
                               f"({type(exc).__name__}: {exc})")



LEGACY_DDL = """
CREATE TABLE IF NOT EXISTS data_registry (
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
CREATE TABLE IF NOT EXISTS data_relationships (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    parent_data_id TEXT NOT NULL,
    child_data_id TEXT NOT NULL,
    relationship_type TEXT NOT NULL,
    UNIQUE(parent_data_id, child_data_id, relationship_type)
);
CREATE TABLE IF NOT EXISTS data_tags (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    data_id TEXT NOT NULL,
    tag TEXT NOT NULL,
    UNIQUE(data_id, tag)
);
"""

# Columns older databases may lack; added with the legacy defaults.
LEGACY_OPTIONAL_COLUMNS = {
    "publish_attempts": "INTEGER DEFAULT 0",
    "publish_error": "TEXT",
    "photometry_status": "TEXT",
    "photometry_job_id": "TEXT",
}

NEW_COLUMNS = {
    "next_attempt_at": "REAL",          # NULL: due now
    "lease_owner": "TEXT",
    "lease_expires_at": "REAL",
    "size_bytes": "INTEGER",
    "checksum": "TEXT",                 # "algorithm:hex"; NULL until described; see PENDING
    "stage_path_bytes": "BLOB",         # exact bytes of stage_path (names need not be UTF-8)
    "stage_dev": "INTEGER",
    "stage_ino": "INTEGER",
    "stage_mtime_ns": "INTEGER",
    "stage_ctime_ns": "INTEGER",
    "publish_target": "TEXT",           # final name chosen by the publish in flight
    "publish_temp": "TEXT",             # its temporary name, for reconciliation
    "sidecars_json": "TEXT",            # names of sidecars published with the product
    "publish_requested_at": "REAL",     # an operator asked for a publish now (`publish`)
    "updated_at": "REAL",
}

SCHEMA_V2 = """
CREATE TABLE IF NOT EXISTS publish_failures (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    data_id TEXT NOT NULL,
    attempt INTEGER NOT NULL,
    kind TEXT NOT NULL,
    error TEXT NOT NULL,
    at REAL NOT NULL,
    host TEXT NOT NULL,
    pid INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS publish_failures_by_product ON publish_failures(data_id, at);
CREATE INDEX IF NOT EXISTS publish_failures_by_time ON publish_failures(at);
CREATE INDEX IF NOT EXISTS data_registry_by_status
    ON data_registry(status, next_attempt_at, staged_at);
CREATE INDEX IF NOT EXISTS data_registry_by_type_status ON data_registry(data_type, status);
CREATE INDEX IF NOT EXISTS data_registry_by_stage_path ON data_registry(stage_path);
CREATE INDEX IF NOT EXISTS data_registry_by_published_path ON data_registry(published_path);
CREATE INDEX IF NOT EXISTS data_registry_by_published_at ON data_registry(published_at);
"""


SCHEMA_V4 = """
CREATE TABLE IF NOT EXISTS unclaimed_files (
    path TEXT PRIMARY KEY,
    path_bytes BLOB NOT NULL,
    reason TEXT NOT NULL,
    first_seen REAL NOT NULL,
    changed_at REAL NOT NULL,
    size_bytes INTEGER
);
CREATE INDEX IF NOT EXISTS unclaimed_files_by_change ON unclaimed_files(changed_at);
"""

# Rows the daemon may claim: waiting, described, and either published automatically or asked
# for. Each half has a partial index holding only its rows, ordered as claims take them, so
# the next-due question and a claim read a few index entries however many rows wait on hold
# or were published long ago. The queries name their index (INDEXED BY): a plan that cannot
# use it is an error, not a silent scan. The same text is in the index and in the queries,
# as SQLite requires to match a partial index.
DUE_AUTO = ("status = 'staging' AND checksum IS NOT NULL"
            " AND COALESCE(auto_publish_enabled, 1) = 1")
DUE_REQUESTED = ("status = 'staging' AND checksum IS NOT NULL"
                 " AND publish_requested_at IS NOT NULL")
DUE_ORDER = "COALESCE(next_attempt_at, 0), staged_at, id"

SCHEMA_V5 = f"""
CREATE INDEX IF NOT EXISTS data_registry_due_auto ON data_registry({DUE_ORDER})
    WHERE {DUE_AUTO};
CREATE INDEX IF NOT EXISTS data_registry_due_requested ON data_registry({DUE_ORDER})
    WHERE {DUE_REQUESTED};
"""


# publish_log: this program's own record of every publish, in a table no legacy writer
# touches. The legacy code re-registers a product with INSERT OR REPLACE, which resets every
# column of its row; the record still names the archived copy and its checksum, so the row
# can be described again from disk instead of being taken for a product that vanished.
SCHEMA_V6 = """
CREATE TABLE IF NOT EXISTS publish_log (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    data_id TEXT NOT NULL,
    data_type TEXT NOT NULL,
    stage_path TEXT NOT NULL,
    published_path TEXT NOT NULL,
    size_bytes INTEGER,
    checksum TEXT,
    sidecars_json TEXT,
    header_json TEXT,
    publish_mode TEXT,
    published_at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS publish_log_by_product ON publish_log(data_id);
CREATE INDEX IF NOT EXISTS publish_log_by_stage_path ON publish_log(stage_path);
"""

# Step 8: the fixity audit's findings and progress, and the record of files moved out of
# staging into the quarantine folder (tables of their own: no legacy reader sees them). An
# open finding is one per (kind, path); a resolved one keeps its history. publish_log gains
# an index on published_path: the audit asks, folder by folder, what is recorded there.
SCHEMA_V8 = """
CREATE TABLE IF NOT EXISTS audit_findings (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    kind TEXT NOT NULL,
    path TEXT NOT NULL,
    data_id TEXT,
    detail TEXT NOT NULL,
    first_seen REAL NOT NULL,
    last_seen REAL NOT NULL,
    resolved_at REAL
);
CREATE UNIQUE INDEX IF NOT EXISTS audit_findings_open ON audit_findings(kind, path)
    WHERE resolved_at IS NULL;
CREATE TABLE IF NOT EXISTS audit_state (
    key TEXT PRIMARY KEY,
    value
);
CREATE TABLE IF NOT EXISTS quarantine_log (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    kind TEXT NOT NULL,
    data_id TEXT,
    original_path TEXT NOT NULL,
    original_path_bytes BLOB NOT NULL,
    quarantine_path TEXT NOT NULL,
    reason TEXT NOT NULL,
    size_bytes INTEGER,
    how TEXT NOT NULL,
    moved_at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS publish_log_by_published_path ON publish_log(published_path);
"""

# Copies a row's publish into publish_log (the row was just made `published`).
_LOG_PUBLISH = (
    "INSERT INTO publish_log (data_id, data_type, stage_path, published_path, size_bytes,"
    " checksum, sidecars_json, header_json, publish_mode, published_at)"
    " SELECT data_id, data_type, stage_path, published_path, size_bytes, checksum,"
    " sidecars_json, header_json, publish_mode, published_at FROM data_registry"
    " WHERE data_id = ? AND status = 'published'")


# What a `published` event says of its row (Registry._emit_published).
_EVENT_COLUMNS = f"SELECT {EVENT_COLUMNS} FROM data_registry WHERE data_id = ?"


# The outbox: one event per publish, written in the transaction that makes the row
# `published`, so a crash can lose neither the event nor the publish without the other.
# `id` is the delivery order; `event_id` the stable id a consumer deduplicates by. Each sink
# (outbox_sinks) has one cursor: every event up to `delivered_through` is done for it
# (delivered, or given up on), so "what is undelivered" is a range of rowids, however long
# the outbox grows. outbox_deliveries keeps how each event ended for each sink.
SCHEMA_V7 = """
CREATE TABLE IF NOT EXISTS outbox (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    event_id TEXT NOT NULL UNIQUE,
    type TEXT NOT NULL,
    data_id TEXT NOT NULL,
    payload_json TEXT NOT NULL,
    created_at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS outbox_by_product ON outbox(data_id);
CREATE TABLE IF NOT EXISTS outbox_sinks (
    sink TEXT PRIMARY KEY,
    delivered_through INTEGER NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    last_error TEXT,
    last_attempt_at REAL,
    added_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS outbox_deliveries (
    event INTEGER NOT NULL,
    sink TEXT NOT NULL,
    outcome TEXT NOT NULL,
    attempts INTEGER NOT NULL,
    at REAL NOT NULL,
    error TEXT,
    PRIMARY KEY (event, sink)
);
"""


def _check_path(path: str) -> None:
    """Refuse what cannot be a registry file, by its metadata alone.

    The file is never opened outside SQLite: closing any descriptor of a file drops every
    POSIX lock this process holds on it, SQLite's included, and another process's
    connection would then take the database for unused and delete the WAL under ours.
    SQLite itself refuses a file that is not a database (NotADBError) before writing to it.
    """
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return
    except OSError as exc:
        raise RegistryError(f"registry {path}: cannot reach it ({exc.strerror})") from None
    if stat.S_ISDIR(st.st_mode):
        raise RegistryError(f"registry {path}: is a directory, not an SQLite file")
    if not stat.S_ISREG(st.st_mode):
        raise RegistryError(f"registry {path}: not a regular file")
    if not os.access(path, os.R_OK):
        raise RegistryError(f"registry {path}: cannot read it (permission denied)")


def _create_empty(path: str) -> None:
    """A registry that does not exist yet is created empty here, with mode 0666 less the
    umask, before SQLite opens it: SQLite would create it 0644 whatever the umask, and its
    -wal and -shm take the database file's mode, so a registry shared with the pipeline's
    user (a group-shared folder, UMask=0002) must be group-writable from the start. No
    connection of this process can have a file open that did not exist."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o666)
    except FileExistsError:
        return
    os.close(fd)


class Registry:
    """One APSW connection to the registry file; open one per thread.

    The outbox and the fixity audit (schema steps 7 and 8) exist on this backend only.

    Claims are fenced by their owner (host, pid, start time: one process) and the single-
    writer lock; a claim's `token` (RegistryBackend) is accepted and not needed here: a
    file on one host has no node whose lease could run out under another's."""

    schema_version = SCHEMA_VERSION
    shared = False  # one host: see RegistryBackend.shared

    def __init__(self, path: str | os.PathLike[str], busy_timeout_seconds: float = 10.0,
                 migrate: bool = True, create: bool = True, guard_reads: bool = True) -> None:
        self.path = os.fspath(path)
        self.location = self.path
        self.busy_timeout_seconds = busy_timeout_seconds
        self.guard_reads = guard_reads
        self._depth = 0  # write() nesting: 0 outside a transaction
        self._counts: tuple[tuple[Any, int], dict[str, int]] | None = None  # see counts()
        # set_qa_gate(): no gate until the rules are known
        self._gate = "NULL"
        self._conditions: tuple[Condition, ...] = ()
        self._records: tuple[Record, ...] = ()
        self._found: records_sql.Found = {}
        _check_path(self.path)
        if not create and not os.path.exists(self.path):
            raise RegistryError(f"registry {self.path}: no such file")
        parent = os.path.dirname(os.path.abspath(self.path))
        try:
            os.makedirs(parent, exist_ok=True)
            _create_empty(self.path)
            self._conn = apsw.Connection(self.path)
        except (OSError, apsw.Error) as exc:
            raise RegistryError(f"registry {self.path}: cannot open ({exc})") from None
        self._conn.set_busy_timeout(int(busy_timeout_seconds * 1000))
        try:
            # Before anything writes (switching to WAL rewrites the header): a file from a newer
            # program or another application is left byte for byte as it was.
            self._check_version()
            mode = self._switch_to_wal()
        except RegistryError:
            self.close()
            raise
        except apsw.NotADBError:
            self.close()
            raise RegistryError(f"registry {self.path}: not an SQLite database (left untouched)"
                                ) from None
        except apsw.BusyError:
            self.close()
            raise RegistryBusy(f"registry {self.path}: locked by another process "
                               f"(waited {busy_timeout_seconds:g} s)") from None
        if str(mode).lower() != "wal":
            self.close()
            raise RegistryError(f"registry {self.path}: cannot switch to WAL mode ({mode})")
        # FULL: in WAL mode a commit is then fsynced before COMMIT returns, so a row that says
        # "published" survives a power cut before the staged source is removed. NORMAL would
        # only promise consistency, and could roll such a commit back after a crash.
        self.conn.execute("PRAGMA synchronous=FULL")
        self.conn.execute("PRAGMA foreign_keys=ON")
        # The file SQLite has open now (it read the header just before): the path must keep
        # leading to it. A stat, never an open: see _check_path().
        st = os.stat(self.path)
        self.file_id = (st.st_dev, st.st_ino)
        try:
            if migrate:
                self.migrate()
            else:
                self._check_version()
        except BaseException:
            self.close()  # a failed open leaves no connection (and no lock) behind
            raise

    def _switch_to_wal(self) -> str:
        """PRAGMA journal_mode=WAL, asked again until the busy timeout has passed. On a file
        still in rollback mode (a new registry) two processes switching at once deadlock on
        the upgrade to an exclusive lock, and SQLite answers the loser BUSY at once, without
        its busy handler: waiting and asking again is the way through."""
        deadline = time.monotonic() + self.busy_timeout_seconds
        while True:
            try:
                return str(self._scalar("PRAGMA journal_mode=WAL"))
            except apsw.BusyError:
                if time.monotonic() >= deadline:
                    raise
                time.sleep(0.01)

    @property
    def conn(self) -> apsw.Connection:
        """The connection, once the WAL index has been found safe to touch (guard()): every
        statement outside a transaction starts one, so asking here covers them all."""
        if not self._conn.in_transaction and self.guard_reads:
            # Every time (a statx, about 4 us): a guard reused for a while left a window in
            # which a chattr +i just after another process's commit met the next read's
            # read mark, and the daemon died of SIGBUS.
            self.guard()
        return self._conn

    def guard(self, write: bool = False) -> None:
        """RegistryUnavailable when a transaction could only end in SIGBUS or an error: the
        memory-mapped -shm (every read writes a read mark into it) or, for a write, any of
        the three files, made immutable or append-only, or on a filesystem gone read-only.
        See fsguard. Asked by name (a stat), so SQLite's locks are kept."""
        names = (self.path, self.path + "-wal", self.path + "-shm") if write else \
            (self.path + "-shm",)
        for name in names:
            why = fsguard.why_unwritable(name)
            if why is not None:
                raise RegistryUnavailable(
                    f"registry {self.path}: cannot be {'written' if write else 'read'} now: "
                    f"{os.path.basename(name)} is {why}; nothing was recorded")

    def close(self) -> None:
        """Close; when the files cannot be written, without the checkpoint the last
        connection of a process makes on closing (it writes the -shm: SIGBUS)."""
        try:
            self.guard(write=True)
        except RegistryUnavailable:
            with contextlib.suppress(apsw.Error):
                self._conn.config(apsw.SQLITE_DBCONFIG_NO_CKPT_ON_CLOSE, 1)
        self._conn.close()

    def probe(self) -> None:
        """A real write that leaves nothing behind (a row added and removed in one
        transaction, so pages reach the WAL and the commit is fsynced): whether the
        registry takes commits again. RegistryUnavailable when it does not."""
        with self.write() as cur:
            cur.execute("INSERT OR REPLACE INTO unclaimed_files (path, path_bytes, reason,"
                        " first_seen, changed_at) VALUES (?, x'', 'probe', 0, 0)",
                        (PROBE_PATH,))
            cur.execute("DELETE FROM unclaimed_files WHERE path = ?", (PROBE_PATH,))

    def set_qa_gate(self, conditions: Sequence[Condition], records: Sequence[Record] = ()
                    ) -> None:
        """The QA gate claims, due times and hold reasons apply from now on (qa.conditions
        and qa.records of the configured rules). RegistryError, the gate unchanged, when a
        record's table exists without a column its rule names, or is one of ours."""
        records = tuple(records)
        found = self._record_tables(records)
        wrong = records_sql.problems(records, found, TABLES)
        if wrong:
            raise RegistryError(f"registry {self.path}: {'; '.join(wrong)}")
        self._conditions, self._records = tuple(conditions), records
        self._build_gate(found)

    def _build_gate(self, found: records_sql.Found) -> None:
        self._found = found
        self._gate = qa_hold_sql(self._conditions, record_whens=[
            w for r in self._records for w in records_sql.gate_whens(r, found, "quote")])

    @property
    def _qa_hold(self) -> str:
        """The gate's SQL expression. While a record's table does not exist yet, whether it
        does now is asked every time (a catalogue read): its products wait for it, and go
        as soon as the pipeline has created it."""
        if any(self._found.get(r.table) is None for r in self._records):
            found = self._record_tables(self._records)
            if found != self._found:
                self._build_gate(found)
        return self._gate

    def _record_tables(self, records: Sequence[Record]) -> dict[str, frozenset[str] | None]:
        """The columns of each record's table in this database (None: no such table)."""
        out: dict[str, frozenset[str] | None] = {}
        for r in records:
            columns = frozenset(row[0] for row in self.conn.execute(
                "SELECT name FROM pragma_table_info(?)", (r.table,)))
            out[r.table] = columns or None
        return out

    def _point_record(self, cur: apsw.Cursor, key: str, value: Any, published_path: str
                      ) -> None:
        """In the caller's transaction (the one that records the publish): the product's
        own record ([products.record]) names the published path instead of the staged one,
        so the pipeline's `SELECT path` names a file that exists once this commits."""
        if not self._records:
            return
        row = _one(cur, f"SELECT data_type, stage_path FROM data_registry WHERE {key} = ?",
                   (value,))
        for r in self._records:
            if row is not None and r.data_type == row["data_type"] and \
                    self._record_tables([r])[r.table] is not None:
                cur.execute(records_sql.update_sql(r, "?"),
                            (published_path, row["stage_path"], published_path))

    def clock(self) -> float:
        """The clock leases are measured by: this host's (an SQLite file has one host)."""
        return time.time()

    def check_identity(self) -> None:
        """RegistryGone unless the configured path still leads to the file this connection
        has open (asked before claims and before every commit that lets a source go)."""
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            raise RegistryGone(f"registry {self.path}: deleted while in use; its records "
                               "since then are lost with it") from None
        if (st.st_dev, st.st_ino) != self.file_id:
            raise RegistryGone(f"registry {self.path}: replaced by another file while in use "
                               "(an older copy restored?); this process's records are in the "
                               "file it had open") from None

    def __enter__(self) -> Registry:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- transactions -------------------------------------------------------------------------

    @contextmanager
    def write(self) -> Iterator[apsw.Cursor]:
        """One explicit BEGIN IMMEDIATE transaction: committed on success, rolled back on error.

        Writes compose: a write inside another is a SAVEPOINT of the outer transaction, so
        one method records one row and a caller that wraps many calls in a write() of its
        own gets them all in one durable commit (one fsync for a burst)."""
        cursor = self.conn.cursor()
        if self._depth:
            savepoint = f"contimg_{self._depth}"
            cursor.execute(f"SAVEPOINT {savepoint}")
            self._depth += 1
            try:
                yield cursor
            except BaseException:
                with contextlib.suppress(apsw.Error):  # the outer write rolls back anyway
                    cursor.execute(f"ROLLBACK TO {savepoint}")
                    cursor.execute(f"RELEASE {savepoint}")
                raise
            finally:
                self._depth -= 1
            cursor.execute(f"RELEASE {savepoint}")
            return
        try:
            self.guard(write=True)
            cursor.execute("BEGIN IMMEDIATE")
        except _UNAVAILABLE as exc:
            raise self._unavailable(exc) from None
        except apsw.BusyError:
            raise RegistryBusy(
                f"registry {self.path}: locked by another process for longer than the busy "
                f"timeout ({self.busy_timeout_seconds:g} s); nothing was written") from None
        self._depth = 1
        try:
            yield cursor
        except _UNAVAILABLE as exc:
            self._rollback(cursor)
            raise self._unavailable(exc) from None
        except BaseException:
            self._rollback(cursor)
            raise
        finally:
            self._depth = 0
        try:
            self.guard(write=True)  # made immutable during the transaction: no commit
        except RegistryUnavailable:
            self._rollback(cursor)
            raise
        try:
            cursor.execute("COMMIT")
        except apsw.BusyError:
            self._rollback(cursor)
            raise RegistryBusy(f"registry {self.path}: commit blocked by another process; "
                               "rolled back") from None
        except _UNAVAILABLE as exc:
            self._rollback(cursor)
            raise self._unavailable(exc) from None

    def _rollback(self, cursor: apsw.Cursor) -> None:
        if self._conn.in_transaction:
            with contextlib.suppress(apsw.Error):
                cursor.execute("ROLLBACK")

    def _unavailable(self, exc: apsw.Error) -> RegistryUnavailable:
        return RegistryUnavailable(f"registry {self.path}: cannot be written now "
                                   f"({type(exc).__name__}: {exc}); nothing was recorded")

    @contextmanager
    def read(self) -> Iterator[apsw.Cursor]:
        """A consistent snapshot for several SELECTs."""
        cursor = self.conn.cursor()
        cursor.execute("BEGIN")
        try:
            yield cursor
        finally:
            cursor.execute("COMMIT")

    def _scalar(self, sql: str, args: Sequence[Any] = ()) -> Any:
        row = self.conn.execute(sql, args).fetchone()
        return None if row is None else row[0]

    # --- schema -------------------------------------------------------------------------------

    def version(self) -> int:
        return int(self._scalar("PRAGMA user_version"))

    def _check_version(self) -> None:
        version = self.version()
        if version > SCHEMA_VERSION:
            raise RegistryError(
                f"registry {self.path}: schema version {version} is newer than this program "
                f"understands ({SCHEMA_VERSION}); upgrade contimg-publisher")
        app = int(self._scalar("PRAGMA application_id"))
        if app not in (0, APPLICATION_ID):
            raise RegistryError(f"registry {self.path}: belongs to another application "
                                f"(application_id {app:#x}); left untouched")

    def _columns(self, cursor: apsw.Cursor, table: str) -> set[str]:
        return {row[1] for row in cursor.execute(f"PRAGMA table_info({table})")}

    def migrate(self) -> list[int]:
        """Bring the file to SCHEMA_VERSION, one transaction per step; returns steps applied."""
        self._check_version()
        applied = []
        for target, step in ((1, self._migrate_legacy), (2, self._migrate_v2),
                             (3, self._migrate_v3), (4, self._migrate_v4),
                             (5, self._migrate_v5), (6, self._migrate_v6),
                             (7, self._migrate_v7), (8, self._migrate_v8)):
            with self.write() as cur:
                # Re-read inside the write lock: another process may have migrated meanwhile.
                row = cur.execute("PRAGMA user_version").fetchone()
                assert row is not None  # a PRAGMA that reads a value returns one row
                if int(row[0]) >= target:
                    continue
                step(cur)
                cur.execute(f"PRAGMA application_id={APPLICATION_ID}")
                cur.execute(f"PRAGMA user_version={target}")
                applied.append(target)
        return applied

    def _migrate_legacy(self, cur: apsw.Cursor) -> None:
        """Create the legacy tables where absent; add the legacy columns older files lack."""
        cur.execute(LEGACY_DDL)
        have = self._columns(cur, "data_registry")
        for name, decl in LEGACY_OPTIONAL_COLUMNS.items():
            if name not in have:
                cur.execute(f"ALTER TABLE data_registry ADD COLUMN {name} {decl}")

    def _migrate_v3(self, cur: apsw.Cursor) -> None:
        """header_json: the FITS header metadata, apart from the legacy metadata_json that
        older tools wrote and read (a legacy row's metadata_json is never replaced)."""
        if "header_json" not in self._columns(cur, "data_registry"):
            cur.execute("ALTER TABLE data_registry ADD COLUMN header_json TEXT")

    def _migrate_v4(self, cur: apsw.Cursor) -> None:
        """unclaimed_files: what the last rescan found in product folders that no product
        owns (a table of its own: no legacy reader sees it); publish_step: how far the
        publish in flight has come (states.Step), so reconciliation reads it rather than
        guessing from which columns are NULL."""
        cur.execute(SCHEMA_V4)
        if "publish_step" not in self._columns(cur, "data_registry"):
            cur.execute("ALTER TABLE data_registry ADD COLUMN publish_step TEXT")

    def _migrate_v5(self, cur: apsw.Cursor) -> None:
        """Partial indexes of the rows that can be claimed (DUE_AUTO, DUE_REQUESTED)."""
        cur.execute(SCHEMA_V5)

    def _migrate_v6(self, cur: apsw.Cursor) -> None:
        """publish_log (see SCHEMA_V6), filled from the rows already published by this
        program (those with a checksum), so their re-registration is recognised too."""
        cur.execute(SCHEMA_V6)
        cur.execute(
            "INSERT INTO publish_log (data_id, data_type, stage_path, published_path,"
            " size_bytes, checksum, sidecars_json, header_json, publish_mode, published_at)"
            " SELECT data_id, data_type, stage_path, published_path, size_bytes, checksum,"
            " sidecars_json, header_json, publish_mode, COALESCE(published_at, 0)"
            " FROM data_registry WHERE status = 'published' AND published_path IS NOT NULL"
            " AND checksum IS NOT NULL")

    def _migrate_v7(self, cur: apsw.Cursor) -> None:
        """The outbox (see SCHEMA_V7). Nothing published before is put in it: those
        products were handled by whatever ran then, and an upgrade must not send every
        consumer the whole history of the archive."""
        cur.execute(SCHEMA_V7)

    def _migrate_v8(self, cur: apsw.Cursor) -> None:
        """audit_findings, audit_state, quarantine_log (see SCHEMA_V8)."""
        cur.execute(SCHEMA_V8)

    def _migrate_v2(self, cur: apsw.Cursor) -> None:
        have = self._columns(cur, "data_registry")
        for name, decl in NEW_COLUMNS.items():
            if name not in have:
                cur.execute(f"ALTER TABLE data_registry ADD COLUMN {name} {decl}")
        cur.execute(SCHEMA_V2)

    # --- rows ---------------------------------------------------------------------------------

    def _products(self, sql: str, args: Sequence[Any] = ()) -> list[Product]:
        cursor = self.conn.cursor()
        cursor.execute(sql, args)
        try:
            names = [d[0] for d in cursor.getdescription()]
        except apsw.ExecutionCompleteError:
            return []
        return [_product(dict(zip(names, row, strict=True))) for row in cursor]

    def get(self, data_id: str) -> Product | None:
        rows = self._products("SELECT * FROM data_registry WHERE data_id = ?", (data_id,))
        return rows[0] if rows else None

    def by_stage_path(self, stage_path: str) -> list[Product]:
        return self._products("SELECT * FROM data_registry WHERE stage_path = ? ORDER BY id",
                              (stage_path,))

    def by_published_path(self, published_path: str) -> Product | None:
        rows = self._products(
            "SELECT * FROM data_registry WHERE published_path = ? AND status = 'published' "
            "ORDER BY id DESC LIMIT 1", (published_path,))
        return rows[0] if rows else None

    def products(self, status: str | None = None, data_type: str | None = None,
                 limit: int | None = None, newest_first: bool = True) -> list[Product]:
        where: list[str] = []
        args: list[str | int] = []
        if status:
            where.append("status = ?")
            args.append(status)
        if data_type:
            where.append("data_type = ?")
            args.append(data_type)
        sql = "SELECT * FROM data_registry"
        if where:
            sql += " WHERE " + " AND ".join(where)
        sql += f" ORDER BY id {'DESC' if newest_first else 'ASC'}"
        if limit is not None:
            sql += " LIMIT ?"
            args.append(limit)
        return self._products(sql, args)

    def stage_index(self) -> dict[str, tuple[str, Identity | None]]:
        """stage_path -> (status, identity) of every row not yet published, for fast rescans.

        Published rows stay out: a long-lived registry is nearly all of them, and a staged
        file at a published row's path is examined like any other (as a leftover, or a new
        version). The status index gives the other rows without visiting the published."""
        out: dict[str, tuple[str, Identity | None]] = {}
        for path, status, dev, ino, size, mtime, ctime in self.conn.execute(
                "SELECT stage_path, status, stage_dev, stage_ino, size_bytes, stage_mtime_ns,"
                " stage_ctime_ns FROM data_registry WHERE status < 'published'"
                " OR status > 'published' OR status IS NULL"):
            ident = Identity(dev, ino, size, mtime, ctime) if ino is not None else None
            out[path] = (status, ident)
        return out

    def waiting_at(self, stage_path: str) -> bool:
        """Whether a row staged at this path waits (staging or failed): one index probe, asked
        for every file that leaves the staging area, most of them just published."""
        return bool(self._scalar("SELECT EXISTS (SELECT 1 FROM data_registry"
                                 " WHERE stage_path = ? AND status IN ('staging', 'failed'))",
                                 (stage_path,)))

    def published_at(self, stage_path: str) -> bool:
        """Whether a row staged at this path was published."""
        return bool(self._scalar("SELECT EXISTS (SELECT 1 FROM data_registry"
                                 " WHERE stage_path = ? AND status = 'published')",
                                 (stage_path,)))

    def history(self, data_id: str) -> list[Failure]:
        return [Failure(*row) for row in self.conn.execute(
            "SELECT data_id, attempt, kind, error, at, host, pid FROM publish_failures "
            "WHERE data_id = ? ORDER BY at, id", (data_id,))]

    def relationships(self, data_id: str) -> list[dict[str, str]]:
        return [{"parent": p, "child": c, "type": t} for p, c, t in self.conn.execute(
            "SELECT parent_data_id, child_data_id, relationship_type FROM data_relationships "
            "WHERE parent_data_id = ? OR child_data_id = ? ORDER BY id", (data_id, data_id))]

    def counts(self) -> dict[str, int]:
        """Rows per status. Nearly every row of a long-lived registry is `published`, so the
        other statuses are counted through the status index and `published` is what remains
        of COUNT(*), which SQLite answers from b-tree pages without visiting rows: a few ms
        at a million rows instead of a scan. One statement, so one consistent snapshot.

        Still, COUNT(*) reads every page of the smallest index (about 0.1 s at a million
        rows when those pages are not cached), and the daemon asks every few seconds for
        STATUS= and each scrape: the answer is kept until a commit changes the file, by this
        connection (total_changes) or any other (PRAGMA data_version)."""
        stamp = (self._scalar("PRAGMA data_version"), self.conn.total_changes())
        if self._counts is not None and self._counts[0] == stamp:
            return dict(self._counts[1])
        counts: dict[str, int] = dict.fromkeys(STATUSES, 0)
        rest = 0
        for part, status, n in self.conn.execute(
                "SELECT 0, status, COUNT(*) FROM data_registry WHERE status < 'published'"
                " GROUP BY status"
                " UNION ALL SELECT 0, status, COUNT(*) FROM data_registry"
                " WHERE status > 'published' GROUP BY status"
                " UNION ALL SELECT 0, NULL, COUNT(*) FROM data_registry WHERE status IS NULL"
                " UNION ALL SELECT 1, NULL, (SELECT COUNT(*) FROM data_registry)"):
            if part:
                rest = n
            elif status is not None or n:
                counts[status] = n
        counts["published"] = rest - sum(counts.values())
        self._counts = (stamp, dict(counts))
        return counts

    def counts_by_type(self) -> dict[tuple[str, str], int]:
        return {(t, s): n for t, s, n in self.conn.execute(
            "SELECT data_type, status, COUNT(*) FROM data_registry GROUP BY data_type, status")}

    def oldest_waiting(self) -> Product | None:
        rows = self._products("SELECT * FROM data_registry WHERE status = 'staging' "
                              "ORDER BY staged_at LIMIT 1")
        return rows[0] if rows else None

    def failures_since(self, since: float) -> int:
        return int(self._scalar("SELECT COUNT(*) FROM publish_failures WHERE at >= ?", (since,)))

    def published_since(self, since: float) -> int:
        return int(self._scalar(
            "SELECT COUNT(*) FROM data_registry WHERE published_at >= ?", (since,)))

    def last_published(self) -> Product | None:
        rows = self._products("SELECT * FROM data_registry WHERE published_at IS NOT NULL "
                              "ORDER BY published_at DESC LIMIT 1")
        return rows[0] if rows else None

    def next_due_at(self) -> float | None:
        """When the earliest waiting product becomes due (None: nothing waits)."""
        row = self.conn.execute(
            "SELECT MIN(due) FROM ("
            " SELECT due FROM (SELECT COALESCE(next_attempt_at, 0) AS due"
            f" FROM data_registry INDEXED BY data_registry_due_auto WHERE {DUE_AUTO}"
            f" AND {self._qa_hold} IS NULL ORDER BY {DUE_ORDER} LIMIT 1)"
            " UNION ALL SELECT MIN(COALESCE(next_attempt_at, 0))"
            f" FROM data_registry INDEXED BY data_registry_due_requested"
            f" WHERE {DUE_REQUESTED})").fetchone()
        assert row is not None  # an aggregate without GROUP BY returns one row
        return None if row[0] is None else float(row[0])

    def publishing(self, every_node: bool = False) -> list[Product]:
        return self._products("SELECT * FROM data_registry WHERE status = 'publishing'")

    # --- writes -------------------------------------------------------------------------------

    def register(self, c: Candidate, now: float | None = None) -> tuple[str, Product]:
        """Record a finished product; idempotent.

        Returns (outcome, row): "new", "updated" (content changed: waits again), "unchanged",
        "busy" (a publish holds it), "published" (the same content was already published
        from this path: the staged copy is a leftover), "conflict" (the data_id belongs to
        another path or other content; the caller picks another id), "foreign" (another
        writer registered this path as another type; nothing is changed).
        """
        now = time.time() if now is None else now
        with self.write() as cur:
            return self._register(cur, c, now)

    def _find(self, cur: apsw.Cursor, data_id: str, stage_path: str) -> dict[str, Any] | None:
        """The row of the product staged at `stage_path` that would take `data_id`: the row
        of that id when it is at that path, else the unpublished row at that path (a
        product registered by other code under another id, such as the full path that the
        legacy register_pipeline_data uses), else the row of that id, elsewhere."""
        row = _one(cur, "SELECT * FROM data_registry WHERE data_id = ?", (data_id,))
        if row is not None and row["stage_path"] == stage_path:
            return row
        at_path = _one(cur, "SELECT * FROM data_registry WHERE stage_path = ?"
                       " AND status != 'published' ORDER BY id DESC LIMIT 1", (stage_path,))
        return at_path if at_path is not None else row

    def _register(self, cur: apsw.Cursor, c: Candidate, now: float) -> tuple[str, Product]:
        row = self._find(cur, c.data_id, c.stage_path)
        if row is not None and row["stage_path"] == c.stage_path and \
                row["data_type"] != c.data_type:
            # Registered at this path by another writer as another type: not ours to change.
            return "foreign", _product(row)
        if row is None:
            header = json.dumps(c.metadata, sort_keys=True)
            row = _one(
                cur,
                "INSERT INTO data_registry (data_type, data_id, base_path, status, stage_path,"
                " created_at, staged_at, metadata_json, header_json, auto_publish_enabled,"
                " publish_attempts, size_bytes, checksum, stage_path_bytes, stage_dev,"
                " stage_ino, stage_mtime_ns, stage_ctime_ns, updated_at)"
                " VALUES (?, ?, ?, 'staging', ?, ?, ?, ?, ?, 1, 0, ?, ?, ?, ?, ?, ?, ?, ?)"
                " RETURNING *",
                (c.data_type, c.data_id, c.base_path, c.stage_path, now, now, header, header,
                 c.identity.size, c.checksum,
                 c.stage_path_bytes, c.identity.dev, c.identity.ino, c.identity.mtime_ns,
                 c.identity.ctime_ns, now))
            outcome = "new"
        elif row["stage_path"] != c.stage_path:
            outcome = "conflict"
        elif row["status"] == Status.PUBLISHING:
            outcome = "busy"
        elif row["status"] == Status.PUBLISHED:
            outcome = "published" if _same_bytes(row, c) else "conflict"
        elif (_same_file(row, c) and row["status"] != Status.REJECTED and
              row["checksum"] is not None and
              (row["checksum"] == c.checksum or not checksum_known(c.checksum))):
            # A description without a digest leaves the one the row has.
            outcome = "unchanged"
        else:
            # New content, or a rejected file that was rewritten: it waits again with a
            # fresh attempt budget. A legacy row described for the first time keeps its
            # status and attempts (a `failed` one still waits for an operator). Earlier
            # failures stay in publish_failures.
            fresh = row["checksum"] is not None and not _same_bytes(row, c)
            header = json.dumps(c.metadata, sort_keys=True)
            row = _one(
                cur,
                "UPDATE data_registry SET status = CASE WHEN status = 'failed' AND NOT ?"
                "   THEN 'failed' ELSE 'staging' END, size_bytes = ?, checksum = ?,"
                " metadata_json = CASE WHEN metadata_json IS NULL OR header_json IS NOT NULL"
                "   THEN ? ELSE metadata_json END, header_json = ?,"
                " stage_path_bytes = ?, stage_dev = ?, stage_ino = ?,"
                " stage_mtime_ns = ?, stage_ctime_ns = ?, next_attempt_at = NULL,"
                " staged_at = CASE WHEN ? THEN ? ELSE staged_at END,"
                " publish_attempts = CASE WHEN ? OR status = 'rejected' THEN 0"
                "   ELSE publish_attempts END,"
                " publish_error = CASE WHEN status = 'rejected' THEN NULL"
                "   ELSE publish_error END,"
                " updated_at = ? WHERE id = ? RETURNING *",
                (fresh, c.identity.size, c.checksum, header, header, c.stage_path_bytes,
                 c.identity.dev, c.identity.ino, c.identity.mtime_ns,
                 c.identity.ctime_ns, fresh, now, fresh, now, row["id"]))
            outcome = "updated"
        assert row is not None
        return outcome, _product(row)

    def reject(self, data_id: str, data_type: str, base_path: str, stage_path: str,
               stage_path_bytes: bytes, reason: str, identity: Identity | None,
               error_max_chars: int, now: float | None = None) -> tuple[str, Product | None]:
        """Record bad input with the reason; never touches a published or publishing row.

        Returns ("new" | "updated" | "unchanged" | "skipped", row).
        """
        now = time.time() if now is None else now
        reason = truncate(reason, error_max_chars)
        ident = identity or Identity(None, None, None, None, None)  # type: ignore[arg-type]
        with self.write() as cur:
            row = self._find(cur, data_id, stage_path)
            if row is None:
                cur.execute(
                    "INSERT INTO data_registry (data_type, data_id, base_path, status, stage_path,"
                    " created_at, staged_at, auto_publish_enabled, publish_attempts,"
                    " publish_error, stage_path_bytes, size_bytes, stage_dev, stage_ino,"
                    " stage_mtime_ns, stage_ctime_ns, updated_at)"
                    " VALUES (?, ?, ?, 'rejected', ?, ?, ?, 1, 0, ?, ?, ?, ?, ?, ?, ?, ?)",
                    (data_type, data_id, base_path, stage_path, now, now, reason,
                     stage_path_bytes, ident.size, ident.dev, ident.ino, ident.mtime_ns,
                     ident.ctime_ns, now))
                outcome = "new"
            elif row["status"] in (Status.PUBLISHED, Status.PUBLISHING) or \
                    row["stage_path"] != stage_path or row["data_type"] != data_type:
                return "skipped", _product(row)
            elif (row["status"] == Status.REJECTED and row["publish_error"] == reason
                  and row["stage_ino"] == ident.ino and row["stage_mtime_ns"] == ident.mtime_ns):
                return "unchanged", _product(row)
            else:
                cur.execute(
                    "UPDATE data_registry SET status = 'rejected', publish_error = ?,"
                    " checksum = NULL, size_bytes = ?, stage_dev = ?, stage_ino = ?,"
                    " stage_mtime_ns = ?, stage_ctime_ns = ?, next_attempt_at = NULL,"
                    " updated_at = ? WHERE id = ?",
                    (reason, ident.size, ident.dev, ident.ino, ident.mtime_ns, ident.ctime_ns,
                     now, row["id"]))
                outcome = "updated"
            row = _one(cur, "SELECT * FROM data_registry WHERE data_id = ?" if row is None
                       else "SELECT * FROM data_registry WHERE id = ?",
                       (data_id,) if row is None else (row["id"],))
            assert row is not None  # inserted or updated just above
            product = _product(row)
        return outcome, product

    def claim(self, owner: str, lease_seconds: float, limit: int = 1, now: float | None = None,
              data_id: str | None = None, max_bytes: int | None = None) -> list[Product]:
        """Move due rows to `publishing` under a lease held by `owner`.

        With data_id (a manual publish), that row is claimed whether due, held or failed,
        as long as nobody holds a live lease on it. `max_bytes` stops a batch once its rows
        add up to that size (the first row is always taken), so that a batch of large
        products does not hold claims for long.
        """
        now = time.time() if now is None else now
        with self.write() as cur:
            if data_id is None:
                due: list[tuple[int, int]] = []
                # Asked-for rows first, then the rest in the order they became due.
                # The QA gate holds back automatic publishing only; an operator's request
                # passes it (publish --override-qa).
                for index, where in (("data_registry_due_requested", DUE_REQUESTED),
                                     ("data_registry_due_auto",
                                      f"{DUE_AUTO} AND {self._qa_hold} IS NULL")):
                    due += cast("list[tuple[int, int]]", cur.execute(
                        "SELECT id, COALESCE(size_bytes, 0) FROM data_registry"
                        f" INDEXED BY {index} WHERE {where}"
                        " AND COALESCE(next_attempt_at, 0) <= ?"
                        f" ORDER BY {DUE_ORDER} LIMIT ?", (now, limit)).fetchall())
                ids: list[int] = []
                total = 0
                for row_id, size in due:
                    if row_id in ids:
                        continue  # asked for and due anyway: listed by both
                    if len(ids) >= limit or (
                            ids and max_bytes is not None and total + size > max_bytes):
                        break
                    ids.append(row_id)
                    total += size
            else:
                ids = [r[0] for r in cur.execute(
                    "SELECT id FROM data_registry WHERE data_id = ?"
                    " AND status IN ('staging', 'failed') AND checksum IS NOT NULL",
                    (data_id,))]
            for row_id in ids:
                cur.execute(
                    "UPDATE data_registry SET status = 'publishing', lease_owner = ?,"
                    " lease_expires_at = ?, publish_target = NULL, publish_temp = NULL,"
                    " publish_step = 'claimed',"
                    " updated_at = ? WHERE id = ?", (owner, now + lease_seconds, now, row_id))
            if not ids:
                return []
            cur.execute("SELECT * FROM data_registry WHERE id IN"
                        f" ({','.join('?' * len(ids))})", ids)
            names = [d[0] for d in cur.getdescription()]
            by_id = {r["id"]: r for r in (dict(zip(names, row, strict=True)) for row in cur)}
        return [_product(by_id[i]) for i in ids]

    def renew_lease(self, data_id: str, owner: str, lease_seconds: float,
                    now: float | None = None, token: str | None = None) -> bool:
        now = time.time() if now is None else now
        with self.write() as cur:
            cur.execute("UPDATE data_registry SET lease_expires_at = ? WHERE data_id = ?"
                        " AND status = 'publishing' AND lease_owner = ?",
                        (now + lease_seconds, data_id, owner))
            return self.conn.changes() > 0

    def set_publish_plan(self, owner: str, data_id: str, target: str, temp: str | None,
                         sidecars: Sequence[str] = (), token: str | None = None) -> bool:
        """Record the final name, the temporary name and the sidecars' final names a publish
        is about to write (reconciliation, and the next attempt after a crash, read them);
        False when `owner` no longer holds the claim."""
        with self.write() as cur:
            cur.execute("UPDATE data_registry SET publish_target = ?, publish_temp = ?,"
                        " publish_step = 'planned', sidecars_json = ?"
                        " WHERE data_id = ? AND status = 'publishing' AND lease_owner = ?",
                        (target, temp, json.dumps(list(sidecars)), data_id, owner))
            return self.conn.changes() > 0

    def record_checksum(self, data_id: str, owner: str, checksum: str,
                        fits_checksums: str | None, now: float | None = None,
                        token: str | None = None) -> bool:
        """The digest the publish's copy computed for a row registered without one, and
        how its FITS checksums came out ("verified", "absent"), recorded before the product
        can reach its final name (reconciliation verifies that name against it). False
        when `owner` no longer holds the claim."""
        now = time.time() if now is None else now
        with self.write() as cur:
            cur.execute(
                "UPDATE data_registry SET checksum = ?,"
                " metadata_json = CASE WHEN ? IS NOT NULL AND metadata_json = header_json"
                "   THEN json_set(metadata_json, '$.fits_checksums', ?) ELSE metadata_json END,"
                " header_json = CASE WHEN ? IS NOT NULL AND header_json IS NOT NULL"
                "   THEN json_set(header_json, '$.fits_checksums', ?) ELSE header_json END,"
                " updated_at = ?"
                " WHERE data_id = ? AND status = 'publishing' AND lease_owner = ?",
                (checksum, fits_checksums, fits_checksums, fits_checksums, fits_checksums, now,
                 data_id, owner))
            return self.conn.changes() > 0

    def reject_claimed(self, data_id: str, owner: str, reason: str, error_max_chars: int,
                       now: float | None = None, host: str | None = None,
                       pid: int | None = None, token: str | None = None) -> bool:
        """A claimed product the publish found is not publishable (a FITS checksum that
        fails in the copy's read): `rejected` with the reason, like a rejection at
        registration, the attempt kept in the history. False when not `owner`'s claim."""
        now = time.time() if now is None else now
        text = truncate(reason, error_max_chars)
        with self.write() as cur:
            row = _one(cur, "SELECT id, publish_attempts FROM data_registry WHERE data_id = ?"
                       " AND status = 'publishing' AND lease_owner = ?", (data_id, owner))
            if row is None:
                return False
            attempts = int(row["publish_attempts"] or 0) + 1
            cur.execute(
                "UPDATE data_registry SET status = 'rejected', publish_error = ?,"
                " publish_attempts = ?, checksum = NULL, next_attempt_at = NULL,"
                " lease_owner = NULL, lease_expires_at = NULL, publish_target = NULL,"
                " publish_temp = NULL, publish_step = NULL, publish_requested_at = NULL,"
                " updated_at = ? WHERE id = ?", (text, attempts, now, row["id"]))
            cur.execute(
                "INSERT INTO publish_failures (data_id, attempt, kind, error, at, host, pid)"
                " VALUES (?, ?, ?, ?, ?, ?, ?)",
                (data_id, attempts, FailureKind.VERIFY_MISMATCH, text, now,
                 host or socket.gethostname(), pid or os.getpid()))
        return True

    def mark_published(self, item: Published, owner: str | None,
                       now: float | None = None, token: str | None = None) -> bool:
        """Durably record a publish; with owner None the lease is not checked (reconciliation).
        False when the row's claim is no longer `owner`'s (it is left as it is).

        The legacy columns then read as the legacy code left them after a success
        (publish_attempts 0, publish_error NULL); every earlier failure stays in the
        failure history (publish_failures), which `show` lists.
        """
        now = time.time() if now is None else now
        with self.write() as cur:
            cur.execute(
                "UPDATE data_registry SET status = 'published', published_path = ?,"
                " published_at = ?, sidecars_json = ?, lease_owner = NULL,"
                " publish_mode = CASE WHEN publish_requested_at IS NOT NULL THEN 'manual'"
                "   ELSE ? END, publish_requested_at = NULL,"
                " lease_expires_at = NULL, publish_temp = NULL,"
                " publish_step = NULL, next_attempt_at = NULL,"
                # Legacy readers take a set publish_error or a count for a failing
                # product; the failure history keeps every attempt and its text.
                " publish_error = NULL, publish_attempts = 0,"
                " finalization_status = COALESCE(finalization_status, 'pending'),"
                " updated_at = ? WHERE data_id = ? AND status = 'publishing'"
                " AND (? IS NULL OR lease_owner = ?)",
                (item.published_path, now, json.dumps(list(item.sidecars)),
                 item.publish_mode, now, item.data_id, owner, owner))
            if self.conn.changes() == 0:
                return False
            self._point_record(cur, "data_id", item.data_id, item.published_path)
            cur.execute(_LOG_PUBLISH, (item.data_id,))
            if item.supersedes:
                cur.execute(
                    "INSERT OR IGNORE INTO data_relationships (parent_data_id,"
                    " child_data_id, relationship_type) VALUES (?, ?, 'supersedes')",
                    (item.data_id, item.supersedes))
            self._emit_published(cur, item.data_id, item.supersedes, now)
        return True

    def confirm_published(self, data_id: str, published_path: str, size_bytes: int,
                          checksum: str, metadata: dict[str, Any],
                          now: float | None = None) -> bool:
        """A publish an older program finished on disk but never recorded: the row becomes
        `published` with the copy's description; legacy values already set are kept."""
        now = time.time() if now is None else now
        with self.write() as cur:
            cur.execute(
                "UPDATE data_registry SET status = 'published', published_path = ?,"
                " published_at = COALESCE(published_at, ?), size_bytes = ?, checksum = ?,"
                " metadata_json = COALESCE(metadata_json, ?), header_json = ?,"
                " lease_owner = NULL,"
                " lease_expires_at = NULL, publish_temp = NULL,"
                " publish_step = NULL, next_attempt_at = NULL, publish_error = NULL,"
                " publish_attempts = 0,"
                " publish_mode = COALESCE(publish_mode, 'auto'), updated_at = ?"
                " WHERE data_id = ? AND status = 'publishing'",
                (published_path, now, size_bytes, checksum, json.dumps(metadata, sort_keys=True),
                 json.dumps(metadata, sort_keys=True), now, data_id))
            if self.conn.changes() == 0:
                return False
            self._point_record(cur, "data_id", data_id, published_path)
            cur.execute(_LOG_PUBLISH, (data_id,))
            # Never recorded as published before, so no consumer was ever told.
            self._emit_published(cur, data_id, None, now)
            return True

    def _emit_published(self, cur: apsw.Cursor, data_id: str, supersedes: str | None,
                        now: float) -> None:
        """The outbox event of a row just made `published`, in the caller's transaction:
        committed with the publish or not at all."""
        # Only the columns the event carries: no Product is built for it, per publish.
        row = _one(cur, _EVENT_COLUMNS, (data_id,))
        assert row is not None  # updated just above, in this transaction
        payload = published_payload(row, supersedes, socket.gethostname())
        cur.execute("INSERT INTO outbox (event_id, type, data_id, payload_json, created_at)"
                    " VALUES (?, ?, ?, ?, ?)",
                    (str(uuid.uuid4()), EVENT_PUBLISHED, data_id,
                     json.dumps(payload, sort_keys=True, default=str), now))

    # --- the outbox -----------------------------------------------------------------------

    def add_sinks(self, sinks: Sequence[str], now: float | None = None) -> list[str]:
        """Give each sink not seen before its cursor at the end of the outbox: a new
        consumer hears of the publishes from now on, not the archive's history. A sink seen
        before keeps its cursor (one removed and configured again resumes where it
        stopped). Returns the sinks added."""
        now = time.time() if now is None else now
        added = []
        with self.write() as cur:
            for sink in sinks:
                cur.execute("INSERT OR IGNORE INTO outbox_sinks (sink, delivered_through,"
                            " added_at) VALUES (?, (SELECT COALESCE(MAX(id), 0) FROM outbox),"
                            " ?)", (sink, now))
                if self.conn.changes():
                    added.append(sink)
        return added

    def outbox_head(self, sink: str) -> Event | None:
        """The oldest event not yet done for this sink (None: nothing waits, or the sink
        is not registered)."""
        rows = self._events(
            "SELECT * FROM outbox WHERE id > (SELECT delivered_through FROM outbox_sinks"
            " WHERE sink = ?) ORDER BY id LIMIT 1", (sink,))
        return rows[0] if rows else None

    def _events(self, sql: str, args: Sequence[Any] = ()) -> list[Event]:
        return [event_of(*row) for row in self.conn.execute(
            sql.replace("SELECT *", "SELECT id, event_id, type, data_id, payload_json,"
                        " created_at", 1), args)]

    def record_delivered(self, sink: str, seq: int, now: float | None = None) -> int:
        """The sink took event `seq` (its head): the cursor moves past it. Returns the
        attempts it took, 0 when the cursor was already past it (nothing changed)."""
        return self._finish(sink, seq, Delivery.DELIVERED, None, None, now)

    def record_delivery_failure(self, sink: str, seq: int, error: str, error_max_chars: int,
                                max_attempts: int = 0, now: float | None = None
                                ) -> tuple[int, bool]:
        """A failed attempt at the sink's head, counted; with max_attempts > 0 and that many
        failures the event is given up on for this sink (`dead`, kept in
        outbox_deliveries) and the next one becomes the head. Returns (attempts, dead)."""
        now = time.time() if now is None else now
        text = truncate(error, error_max_chars)
        with self.write() as cur:
            row = _one(cur, "SELECT delivered_through, attempts FROM outbox_sinks"
                       " WHERE sink = ?", (sink,))
            if row is None or int(row["delivered_through"]) >= seq:
                return 0, False
            attempts = int(row["attempts"]) + 1
            if max_attempts and attempts >= max_attempts:
                self._finish(sink, seq, Delivery.DEAD, attempts, text, now)
                return attempts, True
            cur.execute("UPDATE outbox_sinks SET attempts = ?, last_error = ?,"
                        " last_attempt_at = ? WHERE sink = ?", (attempts, text, now, sink))
        return attempts, False

    def _finish(self, sink: str, seq: int, outcome: str, attempts: int | None,
                error: str | None, now: float | None) -> int:
        now = time.time() if now is None else now
        with self.write() as cur:
            if attempts is None:
                attempts = int(self._scalar("SELECT attempts FROM outbox_sinks WHERE sink = ?",
                                            (sink,)) or 0) + 1
            # The head's failures go with it (a dead one's into outbox_deliveries).
            cur.execute("UPDATE outbox_sinks SET delivered_through = ?, attempts = 0,"
                        " last_error = NULL, last_attempt_at = ?"
                        " WHERE sink = ? AND delivered_through < ?", (seq, now, sink, seq))
            if self.conn.changes() == 0:
                return 0
            cur.execute("INSERT OR REPLACE INTO outbox_deliveries (event, sink, outcome,"
                        " attempts, at, error) VALUES (?, ?, ?, ?, ?, ?)",
                        (seq, sink, outcome, attempts, now, error))
        return attempts

    def redeliver_dead(self, sinks: Sequence[str]) -> dict[str, int]:
        """Each sink's cursor goes back to just before the oldest event it gave up on:
        that event and every one after it are delivered again, in order (a consumer that
        deduplicates by event_id sees the ones it has once). Returns sink -> events
        queued again."""
        out: dict[str, int] = {}
        with self.write() as cur:
            for sink in sinks:
                first = self._scalar("SELECT MIN(event) FROM outbox_deliveries WHERE sink = ?"
                                     " AND outcome = 'dead'", (sink,))
                if first is None:
                    continue
                cur.execute("DELETE FROM outbox_deliveries WHERE sink = ? AND event >= ?",
                            (sink, first))
                cur.execute("UPDATE outbox_sinks SET delivered_through = ?, attempts = 0,"
                            " last_error = NULL WHERE sink = ?", (int(first) - 1, sink))
                out[sink] = int(self._scalar("SELECT COUNT(*) FROM outbox WHERE id >= ?",
                                             (first,)))
        return out

    def sink_states(self, sinks: Sequence[str]) -> list[SinkState]:
        """Backlog and last failure of each sink; a sink the daemon has not registered yet
        has no backlog (it starts at the end of the outbox)."""
        out = []
        for sink in sinks:
            row = self.conn.execute(
                "SELECT delivered_through, attempts, last_error, last_attempt_at"
                " FROM outbox_sinks WHERE sink = ?", (sink,)).fetchone()
            if row is None:
                out.append(SinkState(sink, False, 0, 0, None, 0, None, None, 0))
                continue
            through, attempts, error, at = row
            count, oldest, head = cast("tuple[int, float | None, int | None]", self.conn.execute(
                "SELECT COUNT(*), MIN(created_at), MIN(id) FROM outbox WHERE id > ?",
                (through,)).fetchone())
            dead = int(self._scalar("SELECT COUNT(*) FROM outbox_deliveries WHERE sink = ?"
                                    " AND outcome = 'dead'", (sink,)))
            out.append(SinkState(sink, True, int(through), int(count), oldest, int(attempts),
                                 error, at, dead, head))
        return out

    def events(self, sinks: Sequence[str], everything: bool = False, after: int = 0,
               limit: int | None = None) -> list[tuple[Event, dict[str, dict[str, Any]]]]:
        """Events oldest first, each with its state for every sink: {"state": "pending" |
        "delivered" | "dead", "attempts", "at", "error"}. Without `everything`, only those
        still pending for some sink or given up on by one."""
        cursors = {s.sink: s for s in self.sink_states(sinks) if s.registered}
        low = min((s.delivered_through for s in cursors.values()), default=None)
        where = ["id > ?"]
        args: list[Any] = [after]
        if not everything:
            pending = "" if low is None else f"id > {int(low)}"
            dead = ("id IN (SELECT event FROM outbox_deliveries WHERE outcome = 'dead'"
                    f" AND sink IN ({','.join('?' * len(cursors))}))") if cursors else ""
            either = " OR ".join(p for p in (pending, dead) if p)
            if not either:
                return []
            where.append(f"({either})")
            args += list(cursors)
        sql = f"SELECT * FROM outbox WHERE {' AND '.join(where)} ORDER BY id"
        if limit is not None:
            sql += " LIMIT ?"
            args.append(limit)
        events = self._events(sql, args)
        done: dict[tuple[int, str], dict[str, Any]] = {}
        if events:
            for seq, sink, outcome, attempts, at, error in self.conn.execute(
                    "SELECT event, sink, outcome, attempts, at, error FROM outbox_deliveries"
                    " WHERE event BETWEEN ? AND ?", (events[0].seq, events[-1].seq)):
                done[(seq, sink)] = {"state": outcome, "attempts": attempts, "at": at,
                                     "error": error}
        return delivery_states(events, cursors, done, everything)

    def last_event_seq(self) -> int:
        return int(self._scalar("SELECT COALESCE(MAX(id), 0) FROM outbox"))

    def events_for(self, data_id: str) -> list[Event]:
        return self._events("SELECT * FROM outbox WHERE data_id = ? ORDER BY id", (data_id,))

    # An SQLite registry has one daemon, the one holding the lock file: every duty is its.

    def lead(self, duty: str, owner: str, lease_seconds: float) -> bool:
        return True

    def resign(self, duty: str, owner: str) -> None:
        pass

    def publish_records(self, data_id: str, stage_path: str) -> list[PublishRecord]:
        """This program's publishes of a product (by its id or its staged path), newest
        first."""
        return [PublishRecord(*row) for row in self.conn.execute(
            "SELECT data_id, data_type, stage_path, published_path, size_bytes, checksum,"
            " sidecars_json, header_json, publish_mode, published_at FROM publish_log"
            " WHERE data_id = ? OR stage_path = ? ORDER BY id DESC", (data_id, stage_path))]

    def restore_published(self, row_id: int, record: PublishRecord,
                          now: float | None = None) -> bool:
        """A waiting row whose product is in the archive (its copy verified against
        `record`) is `published` again, described from the record. Values the legacy writer
        set are kept; what it reset is filled in."""
        now = time.time() if now is None else now
        with self.write() as cur:
            cur.execute(
                "UPDATE data_registry SET status = 'published', published_path = ?,"
                " published_at = COALESCE(published_at, ?), size_bytes = ?, checksum = ?,"
                " header_json = ?, metadata_json = COALESCE(metadata_json, ?),"
                " sidecars_json = ?, publish_mode = COALESCE(publish_mode, ?),"
                " publish_error = NULL, publish_attempts = 0, next_attempt_at = NULL,"
                " lease_owner = NULL,"
                " lease_expires_at = NULL, publish_target = NULL, publish_temp = NULL,"
                " publish_step = NULL, publish_requested_at = NULL, updated_at = ?"
                " WHERE id = ? AND status IN ('staging', 'failed')",
                (record.published_path, record.published_at, record.size_bytes,
                 record.checksum, record.header_json, record.header_json,
                 record.sidecars_json, record.publish_mode or "auto", now, row_id))
            if self.conn.changes() == 0:
                return False
            self._point_record(cur, "id", row_id, record.published_path)
            return True

    def record_failure(self, data_id: str, owner: str | None, kind: str, error: str,
                       max_attempts: int, backoff_initial: float, backoff_max: float,
                       error_max_chars: int, now: float | None = None,
                       host: str | None = None, pid: int | None = None,
                       rng: random.Random | None = None, token: str | None = None
                       ) -> FailureOutcome | None:
        """Count a failed attempt (unless its kind says nothing about the product), keep it in
        the history, and schedule the next try; `failed` once attempts reach max_attempts.

        Returns None when the row is not (or no longer) ours to change.
        """
        if kind not in FAILURE_KINDS:
            raise ValueError(f"unknown failure kind {kind!r}")
        kind = FailureKind(kind)
        now = time.time() if now is None else now
        text = truncate(error, error_max_chars)
        counted = kind.counted
        with self.write() as cur:
            row = _one(cur, "SELECT * FROM data_registry WHERE data_id = ?", (data_id,))
            if row is None or row["status"] != Status.PUBLISHING or (
                    owner is not None and row["lease_owner"] != owner):
                return None
            attempts = int(row["publish_attempts"] or 0) + (1 if counted else 0)
            if counted and attempts >= max_attempts:
                status, next_at = Status.FAILED, None
            elif not counted:  # due again at once
                status, next_at = Status.STAGING, None
            else:
                status = Status.STAGING
                next_at = now + backoff_delay(attempts, backoff_initial, backoff_max, rng=rng)
            cur.execute(
                "UPDATE data_registry SET status = ?, publish_attempts = ?, publish_error = ?,"
                " next_attempt_at = ?, lease_owner = NULL, lease_expires_at = NULL,"
                " publish_target = NULL, publish_temp = NULL,"
                " publish_step = NULL, publish_requested_at = NULL,"
                " checksum = CASE WHEN ? THEN NULL ELSE checksum END, updated_at = ?"
                " WHERE id = ?",
                (status, attempts, text, next_at, kind is FailureKind.SOURCE_CHANGED, now,
                 row["id"]))
            cur.execute(
                "INSERT INTO publish_failures (data_id, attempt, kind, error, at, host, pid)"
                " VALUES (?, ?, ?, ?, ?, ?, ?)",
                (data_id, attempts if counted else int(row["publish_attempts"] or 0) + 1,
                 kind, text, now, host or socket.gethostname(), pid or os.getpid()))
        return FailureOutcome(attempts, status, next_at, counted, text)

    def requeue(self, data_id: str, owner: str | None, now: float | None = None,
                token: str | None = None, due_at: float | None = None) -> bool:
        """Give a claimed row back, due now (or at `due_at`), without counting an attempt
        (clean shutdown; no room for it yet)."""
        now = time.time() if now is None else now
        with self.write() as cur:
            cur.execute(
                "UPDATE data_registry SET status = 'staging', lease_owner = NULL,"
                " lease_expires_at = NULL, publish_target = NULL, publish_temp = NULL,"
                " publish_step = NULL,"
                " next_attempt_at = ?, updated_at = ? WHERE data_id = ?"
                " AND status = 'publishing' AND (? IS NULL OR lease_owner = ?)",
                (due_at, now, data_id, owner, owner))
            return self.conn.changes() > 0

    def forget_missing(self, data_id: str, reason: str, error_max_chars: int,
                       now: float | None = None) -> bool:
        """A waiting product's file is gone from staging: it is rejected, with the reason.

        A `failed` one stays `failed` with its last error (an operator is already asked to
        look at it, and that text says why it failed); the new reason goes into its failure
        history, once. Returns whether anything was recorded."""
        now = time.time() if now is None else now
        text = truncate(reason, error_max_chars)
        with self.write() as cur:
            row = _one(cur, "SELECT id, status, publish_attempts FROM data_registry"
                       " WHERE data_id = ?", (data_id,))
            if row is None:
                return False
            if row["status"] == Status.FAILED:
                last = _one(cur, "SELECT kind, error FROM publish_failures WHERE data_id = ?"
                            " ORDER BY at DESC, id DESC LIMIT 1", (data_id,))
                if last is not None and (last["kind"], last["error"]) == (
                        FailureKind.SOURCE_MISSING, text):
                    return False
                cur.execute(
                    "INSERT INTO publish_failures (data_id, attempt, kind, error, at, host, pid)"
                    " VALUES (?, ?, ?, ?, ?, ?, ?)",
                    (data_id, int(row["publish_attempts"] or 0), FailureKind.SOURCE_MISSING,
                     text, now, socket.gethostname(), os.getpid()))
                cur.execute("UPDATE data_registry SET checksum = NULL, updated_at = ?"
                            " WHERE id = ?", (now, row["id"]))
                return True
            cur.execute(
                "UPDATE data_registry SET status = 'rejected', publish_error = ?, checksum = NULL,"
                " updated_at = ? WHERE id = ? AND status = 'staging'", (text, now, row["id"]))
            return self.conn.changes() > 0

    def park_outside_root(self, stage_root: str, data_types: Sequence[str], reason: str,
                          error_max_chars: int, now: float | None = None) -> list[str]:
        """Waiting rows of these types, described by this program, whose staged path is not
        under `stage_root` (the configured staging root changed since they were registered)
        become `failed`, with the reason, in the failure history too: an operator state,
        never a silent wait. Returns their data_ids."""
        now = time.time() if now is None else now
        if not data_types:
            return []
        text = truncate(reason, error_max_chars)
        prefix = stage_root.rstrip("/") + "/"
        marks = ",".join("?" * len(data_types))
        with self.write() as cur:
            rows = cur.execute(
                "SELECT data_id, publish_attempts FROM data_registry WHERE status = 'staging'"
                f" AND data_type IN ({marks}) AND substr(stage_path, 1, ?) != ?"
                # described by this program (a legacy row elsewhere is not its to change)
                " AND stage_ino IS NOT NULL",
                (*data_types, len(prefix), prefix)).fetchall()
            for data_id, attempts in rows:
                cur.execute("UPDATE data_registry SET status = 'failed', publish_error = ?,"
                            " next_attempt_at = NULL, updated_at = ? WHERE data_id = ?",
                            (text, now, data_id))
                cur.execute(
                    "INSERT INTO publish_failures (data_id, attempt, kind, error, at, host,"
                    " pid) VALUES (?, ?, 'other', ?, ?, ?, ?)",
                    (data_id, int(attempts or 0), text, now, socket.gethostname(),
                     os.getpid()))
        return [str(r[0]) for r in rows]

    def retry(self, data_ids: Iterable[str] = (), all_failed: bool = False,
              now: float | None = None) -> list[str]:
        """Clear attempts and make products due again; rejected ones are examined afresh."""
        now = time.time() if now is None else now
        changed = []
        with self.write() as cur:
            if all_failed:
                data_ids = [r[0] for r in cur.execute(
                    "SELECT data_id FROM data_registry WHERE status = 'failed'")]
            for data_id in data_ids:
                cur.execute(
                    "UPDATE data_registry SET publish_attempts = 0, next_attempt_at = NULL,"
                    " checksum = CASE WHEN status = 'rejected' THEN NULL ELSE checksum END,"
                    " status = 'staging', updated_at = ? WHERE data_id = ?"
                    " AND status IN ('failed', 'staging', 'rejected')", (now, data_id))
                if self.conn.changes():
                    changed.append(data_id)
        return changed

    def request_publish(self, data_id: str, now: float | None = None) -> bool:
        """Ask the running daemon to publish a product now, held or failed or not yet due."""
        now = time.time() if now is None else now
        with self.write() as cur:
            cur.execute(
                "UPDATE data_registry SET publish_requested_at = ?, next_attempt_at = NULL,"
                " status = CASE WHEN status = 'failed' THEN 'staging' ELSE status END,"
                " updated_at = ? WHERE data_id = ? AND status IN ('staging', 'failed')",
                (now, now, data_id))
            return self.conn.changes() > 0

    def set_hold(self, data_id: str, held: bool, now: float | None = None) -> bool:
        now = time.time() if now is None else now
        with self.write() as cur:
            cur.execute("UPDATE data_registry SET auto_publish_enabled = ?, updated_at = ?"
                        " WHERE data_id = ?", (0 if held else 1, now, data_id))
            return self.conn.changes() > 0

    def mark_exhausted(self, max_attempts: int, now: float | None = None,
                       owns: Callable[[Product], bool] | None = None) -> list[str]:
        """Rows waiting with attempts already at the limit (legacy rows, a lowered limit)
        become `failed`, so they wait for an operator instead of retrying forever. With
        `owns`, only the rows it accepts (the others belong to other writers)."""
        now = time.time() if now is None else now
        with self.write() as cur:
            rows = [r for r in self._products(
                "SELECT * FROM data_registry WHERE status = 'staging'"
                " AND COALESCE(publish_attempts, 0) >= ?", (max_attempts,))
                if owns is None or owns(r)]
            for r in rows:
                cur.execute("UPDATE data_registry SET status = 'failed', updated_at = ?"
                            " WHERE id = ? AND status = 'staging'", (now, r.id))
        return [r.data_id for r in rows]

    def add_sidecars(self, data_id: str, names: Sequence[str], now: float | None = None
                     ) -> bool:
        """A sidecar that arrived after its product was published now stands beside it."""
        now = time.time() if now is None else now
        with self.write() as cur:
            row = _one(cur, "SELECT sidecars_json FROM data_registry WHERE data_id = ?"
                       " AND status = 'published'", (data_id,))
            if row is None:
                return False
            try:
                have = list(json.loads(row["sidecars_json"] or "[]"))
            except ValueError:
                have = []
            merged = have + [n for n in names if n not in have]
            cur.execute("UPDATE data_registry SET sidecars_json = ?, updated_at = ?"
                        " WHERE data_id = ?", (json.dumps(merged), now, data_id))
            cur.execute("UPDATE publish_log SET sidecars_json = ? WHERE id = (SELECT MAX(id)"
                        " FROM publish_log WHERE data_id = ?)", (json.dumps(merged), data_id))
        return True

    def replace_unclaimed(self, found: Sequence[tuple[str, bytes, str, float, int | None]],
                          now: float | None = None) -> None:
        """Make (path, path bytes, reason, changed_at, size) the whole list of unclaimed
        files, keeping when each was first seen."""
        now = time.time() if now is None else now
        with self.write() as cur:
            first = {p: (r, f) for p, r, f in cur.execute(
                "SELECT path, reason, first_seen FROM unclaimed_files")}
            cur.execute("DELETE FROM unclaimed_files")
            for path, raw, reason, changed_at, size in found:
                seen = first.get(path)
                cur.execute(
                    "INSERT OR REPLACE INTO unclaimed_files (path, path_bytes, reason,"
                    " first_seen, changed_at, size_bytes) VALUES (?, ?, ?, ?, ?, ?)",
                    (path, raw, reason, seen[1] if seen and seen[0] == reason else now,
                     changed_at, size))

    def unclaimed(self, changed_before: float | None = None,
                  limit: int | None = None) -> list[Unclaimed]:
        """Unclaimed files, oldest change first; with changed_before, only those unchanged
        since then."""
        sql = ("SELECT path, path_bytes, reason, first_seen, changed_at, size_bytes"
               " FROM unclaimed_files WHERE changed_at <= ? ORDER BY changed_at, path")
        args: list[Any] = [float("inf") if changed_before is None else changed_before]
        if limit is not None:
            sql += " LIMIT ?"
            args.append(limit)
        return [Unclaimed(*row) for row in self.conn.execute(sql, args)]

    # --- the fixity audit -------------------------------------------------------------------

    def published_after(self, after_id: int, limit: int, prefix: str | None = None
                        ) -> list[Product]:
        """Published rows with a published path, in id order after `after_id` (the audit's
        cursor); with prefix, only those whose published path starts with it."""
        sql = ("SELECT * FROM data_registry WHERE id > ? AND status = 'published'"
               " AND published_path IS NOT NULL")
        args: list[Any] = [after_id]
        if prefix is not None:
            sql += " AND substr(published_path, 1, ?) = ?"
            args += [len(prefix), prefix]
        return self._products(sql + " ORDER BY id LIMIT ?", (*args, limit))

    def recorded_in(self, folder: str) -> Recorded:
        """What any row records in `folder` (display form, no trailing slash): published
        products of every status and row, the final names and sidecars of publishes in
        flight, and every publish this program logged (a row another writer reset still
        has its product in the archive). Range queries on the published_path indexes."""
        prefix, upper = folder_range(folder)
        found: list[tuple[str | None, str | None]] = []
        with self.read() as cur:
            for sql in (
                    "SELECT published_path, sidecars_json FROM data_registry"
                    " WHERE published_path >= ? AND published_path < ?",
                    "SELECT published_path, sidecars_json FROM publish_log"
                    " WHERE published_path >= ? AND published_path < ?"):
                found += cur.execute(sql, (prefix, upper))
            found += cur.execute(
                "SELECT publish_target, sidecars_json FROM data_registry"
                " WHERE status = 'publishing' AND publish_target IS NOT NULL")
        return recorded_under(prefix, found)

    def is_recorded(self, path: str) -> bool:
        """Whether any row or logged publish names this published path."""
        return bool(self._scalar(
            "SELECT EXISTS (SELECT 1 FROM data_registry WHERE published_path = ?)"
            " OR EXISTS (SELECT 1 FROM publish_log WHERE published_path = ?)"
            " OR EXISTS (SELECT 1 FROM data_registry WHERE status = 'publishing'"
            " AND publish_target = ?)", (path, path, path)))

    def observe_findings(self, findings: Sequence[Finding], now: float | None = None,
                         state: dict[str, Any] | None = None) -> list[Finding]:
        """Record what a slice of the audit found: a finding already open is seen again
        (last_seen), a new one is opened. Returns the new ones (to be logged once). `state`
        is saved in the same transaction (the audit's cursor)."""
        now = time.time() if now is None else now
        new: list[Finding] = []
        with self.write() as cur:
            for f in findings:
                cur.execute("UPDATE audit_findings SET last_seen = ?, detail = ?,"
                            " data_id = COALESCE(?, data_id)"
                            " WHERE kind = ? AND path = ? AND resolved_at IS NULL",
                            (now, f.detail, f.data_id, f.kind, f.path))
                if self._conn.changes():
                    continue
                cur.execute("INSERT INTO audit_findings (kind, path, data_id, detail,"
                            " first_seen, last_seen) VALUES (?, ?, ?, ?, ?, ?)",
                            (f.kind, f.path, f.data_id, f.detail, now, now))
                new.append(Finding(f.kind, f.path, f.detail, f.data_id, now, now))
            if state:
                self._save_audit_state(cur, state)
        return new

    def resolve_findings(self, seen_before: float, now: float | None = None,
                         state: dict[str, Any] | None = None) -> list[Finding]:
        """At the end of a full pass: open findings that the pass (started at seen_before)
        did not see again are resolved. Returns them."""
        now = time.time() if now is None else now
        with self.write() as cur:
            rows = cur.execute(
                "UPDATE audit_findings SET resolved_at = ? WHERE resolved_at IS NULL"
                " AND last_seen < ? RETURNING kind, path, detail, data_id, first_seen,"
                " last_seen, resolved_at", (now, seen_before)).fetchall()
            if state:
                self._save_audit_state(cur, state)
        return [Finding(*cast("tuple[Any, ...]", row)) for row in rows]

    def findings(self, open_only: bool = True, limit: int | None = None) -> list[Finding]:
        sql = ("SELECT kind, path, detail, data_id, first_seen, last_seen, resolved_at"
               " FROM audit_findings")
        if open_only:
            sql += " WHERE resolved_at IS NULL"
        sql += " ORDER BY first_seen, id"
        args: list[Any] = []
        if limit is not None:
            sql += " LIMIT ?"
            args.append(limit)
        return [Finding(*cast("tuple[Any, ...]", row)) for row in self.conn.execute(sql, args)]

    def finding_counts(self) -> dict[str, int]:
        """Open findings by kind (every kind, zero included)."""
        counts: dict[str, int] = {str(k): 0 for k in FINDING_KINDS}
        for kind, n in self.conn.execute("SELECT kind, COUNT(*) FROM audit_findings"
                                         " WHERE resolved_at IS NULL GROUP BY kind"):
            counts[kind] = n
        return counts

    def audit_state(self) -> dict[str, Any]:
        """The background audit's progress: pass_started (a pass under way), cursor (the
        last row id it checked), last_pass_started, last_pass_finished, ..."""
        return {str(k): v for k, v in self.conn.execute("SELECT key, value FROM audit_state")}

    def save_audit_state(self, state: dict[str, Any]) -> None:
        with self.write() as cur:
            self._save_audit_state(cur, state)

    def _save_audit_state(self, cur: apsw.Cursor, state: dict[str, Any]) -> None:
        for key, value in state.items():
            cur.execute("INSERT OR REPLACE INTO audit_state (key, value) VALUES (?, ?)",
                        (key, value))

    # --- rebuild from the archive --------------------------------------------------------

    def insert_rebuilt(self, item: Rebuilt, now: float | None = None) -> str:
        """A row for an archived product that has none, described from its bytes on disk
        (publish_mode 'rebuilt'), and its publish_log record. Returns "created", or why
        nothing was written: "recorded" (some row names the path by now), "id_taken" (the
        data_id belongs to another row, which is never changed)."""
        now = time.time() if now is None else now
        header = json.dumps(item.metadata, sort_keys=True)
        with self.write() as cur:
            if self.is_recorded(item.published_path):
                return "recorded"
            if _one(cur, "SELECT id FROM data_registry WHERE data_id = ?",
                    (item.data_id,)) is not None:
                return "id_taken"
            cur.execute(
                "INSERT INTO data_registry (data_type, data_id, base_path, status, stage_path,"
                " stage_path_bytes, published_path, created_at, staged_at, published_at,"
                " publish_mode, metadata_json, header_json, auto_publish_enabled,"
                " publish_attempts, size_bytes, checksum, sidecars_json, updated_at)"
                " VALUES (?, ?, ?, 'published', ?, ?, ?, ?, ?, ?, 'rebuilt', ?, ?, 1, 0, ?, ?,"
                " ?, ?)",
                (item.data_type, item.data_id, item.base_path, item.stage_path,
                 item.stage_path_bytes, item.published_path, now, item.published_at,
                 item.published_at, header, header, item.size_bytes, item.checksum,
                 json.dumps(list(item.sidecars)), now))
            cur.execute(_LOG_PUBLISH, (item.data_id,))
        return "created"

    # --- staging hygiene -------------------------------------------------------------------

    def rejected_before(self, before: float) -> list[Product]:
        """Rejected rows whose record last changed before `before`, oldest first."""
        return self._products(
            "SELECT * FROM data_registry WHERE status = 'rejected'"
            " AND COALESCE(updated_at, staged_at) <= ? ORDER BY COALESCE(updated_at, staged_at),"
            " id", (before,))

    def record_quarantine(self, item: Quarantined, original_bytes: bytes) -> None:
        """A file moved into the quarantine folder; an unclaimed one leaves that list."""
        with self.write() as cur:
            cur.execute(
                "INSERT INTO quarantine_log (kind, data_id, original_path, original_path_bytes,"
                " quarantine_path, reason, size_bytes, how, moved_at)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (item.kind, item.data_id, item.original_path, original_bytes,
                 item.quarantine_path, item.reason, item.size_bytes, item.how, item.moved_at))
            cur.execute("DELETE FROM unclaimed_files WHERE path = ?", (item.original_path,))

    def quarantined(self, limit: int | None = None) -> list[Quarantined]:
        """Files moved into the quarantine folder, newest first."""
        sql = ("SELECT kind, data_id, original_path, quarantine_path, reason, size_bytes, how,"
               " moved_at FROM quarantine_log ORDER BY moved_at DESC, id DESC")
        args: list[Any] = []
        if limit is not None:
            sql += " LIMIT ?"
            args.append(limit)
        return [Quarantined(*row) for row in self.conn.execute(sql, args)]

    def size_bytes(self) -> int:
        page_size = int(self._scalar("PRAGMA page_size"))
        return page_size * int(self._scalar("PRAGMA page_count"))

    # An SQLite registry has one host and one daemon, which the lock file names: nothing to
    # record (a write every few seconds would also cost an fsync and end the counts cache).

    def heartbeat(self, owner: str, started: float, version: str) -> None:
        """Nothing to record (see above)."""

    def end_heartbeat(self, owner: str) -> None:
        """Nothing to remove."""

    def heartbeats(self) -> list[Heartbeat]:
        """None: the lock file says which daemon runs."""
        return []

    def waiting(self, limit: int | None = None) -> list[Product]:
        """Products waiting to be published, longest-waiting first."""
        sql = "SELECT * FROM data_registry WHERE status = 'staging' ORDER BY staged_at, id"
        if limit is None:
            return self._products(sql)
        return self._products(sql + " LIMIT ?", (limit,))


    def oldest_unheld_waiting(self) -> Product | None:
        """The longest-waiting product the daemon is expected to publish (held ones wait on
        purpose, unless an operator asked for a publish)."""
        rows = self._products(
            "SELECT * FROM data_registry WHERE status = 'staging' AND checksum IS NOT NULL"
            " AND (COALESCE(auto_publish_enabled, 1) = 1 OR publish_requested_at IS NOT NULL)"
            f" AND ({self._qa_hold} IS NULL OR publish_requested_at IS NOT NULL)"
            " ORDER BY staged_at, id LIMIT 1")
        return rows[0] if rows else None


    def held(self, data_types: Sequence[str], limit: int | None = None
             ) -> list[tuple[Product, str]]:
        """Waiting products of these types that are not published automatically, with the
        reason: the QA gate's, or a hold (auto_publish_enabled = 0), oldest first. A manual
        publish that was asked for is not held."""
        if not data_types:
            return []
        sql = (f"SELECT *, {self._qa_hold} AS qa_hold FROM data_registry"
               f" WHERE status = 'staging' AND data_type IN ({','.join('?' * len(data_types))})"
               " AND publish_requested_at IS NULL"
               f" AND (COALESCE(auto_publish_enabled, 1) = 0 OR {self._qa_hold} IS NOT NULL)"
               " ORDER BY staged_at, id")
        args: list[Any] = list(data_types)
        if limit is not None:
            sql += " LIMIT ?"
            args.append(limit)
        cursor = self.conn.cursor()
        cursor.execute(sql, args)
        try:
            names = [d[0] for d in cursor.getdescription()]
        except apsw.ExecutionCompleteError:
            return []
        out = []
        for values in cursor:
            row = dict(zip(names, values, strict=True))
            out.append((_product(row), row["qa_hold"] or HELD_BY_OPERATOR))
        return out



    def qa_holds(self, data_ids: Sequence[str]) -> dict[str, str]:
        """data_id -> the reason the QA gate holds it, for the rows it holds."""
        out: dict[str, str] = {}
        ids = list(data_ids)
        for start in range(0, len(ids), 500):
            chunk = ids[start:start + 500]
            for data_id, reason in self.conn.execute(
                    f"SELECT data_id, {self._qa_hold} FROM data_registry"
                    f" WHERE data_id IN ({','.join('?' * len(chunk))})", chunk):
                if reason is not None:
                    out[data_id] = reason
        return out


    def recent_published(self, limit: int = 10) -> list[Product]:
        """The last publishes, newest first."""
        return self._products(
            "SELECT * FROM data_registry WHERE status = 'published' AND published_at IS NOT NULL"
            " ORDER BY published_at DESC, id DESC LIMIT ?", (limit,))


    def by_status(self, status: str, limit: int | None = None) -> list[Product]:
        """Rows in one status, most recently changed first."""
        sql = ("SELECT * FROM data_registry WHERE status = ?"
               " ORDER BY COALESCE(updated_at, staged_at) DESC, id DESC")
        if limit is None:
            return self._products(sql, (status,))
        return self._products(sql + " LIMIT ?", (status, limit))

    # --- folder-name reservations -----------------------------------------------------------
    # Trivially granted, with no table: an SQLite registry has one host, and one publishing
    # process at a time holds its single-writer lock, so no two publishes choose a name at
    # once; within a batch, publish keeps the names it chose, and the no-replace rename
    # stays the guard against anything else.

    def reserve_name(self, published_path: str, data_id: str, owner: str,
                     token: str | None = None) -> str | None:
        """Always this product's (see above)."""
        return None

    def release_name(self, published_path: str, data_id: str, token: str | None = None
                     ) -> bool:
        """Nothing was recorded, nothing to release."""
        return False

    def reservations(self) -> list[Reservation]:
        """None recorded."""
        return []


def refuse_new_over_archive(path: str | os.PathLike[str], products_root: str | os.PathLike[str]
                            ) -> None:
    """A registry that does not exist is never created silently beside a products area that
    already holds published products: that is a lost registry, and an empty new one would
    hide it. RegistryError naming the way out, unless the registry exists or the products
    area holds nothing but temporary names."""
    if os.path.lexists(path):
        return
    root = os.fsencode(products_root)
    try:
        root_fd = paths.open_root(root)
    except OSError:
        return  # no products area (yet): nothing to lose
    example: str | None = None
    try:
        # Through descriptors (treewalk): a folder the walk does not enter is passed over.
        walk = treewalk.walk(root_fd, on_problem=lambda _exc: None)
        with contextlib.closing(walk):
            for folder in walk:
                name = next((n for n in folder.files if paths.parse_temp_name(n) is None), None)
                if name is not None:
                    example = paths.shown((*folder.parts, name), root)
                    break
    finally:
        os.close(root_fd)
    if example is not None:
        raise RegistryError(
            f"registry {path}: no such file, but {products_root} already holds "
            f"published products (e.g. {example}); refusing to start "
            "on a new, empty registry. Restore the registry from its backup, or create "
            "an empty one on purpose with `contimg-publisher migrate`, or recover the "
            "rows of what is archived with `contimg-publisher rebuild --from-archive`")


def _one(cur: apsw.Cursor, sql: str, args: Sequence[Any]) -> dict[str, Any] | None:
    cur.execute(sql, args)
    try:
        names = [d[0] for d in cur.getdescription()]
    except apsw.ExecutionCompleteError:
        return None
    row = cur.fetchone()
    return None if row is None else dict(zip(names, row, strict=True))

