"""The SQLite backend of the registry: the embedded default, which needs no server.

The file is an SQLite database shared with older pipeline code that reads the legacy
`data_registry`, `data_relationships` and `data_tags` tables, so those are adopted in place
and only ever extended: nothing is dropped or renamed, and legacy columns keep their meaning.

What is SQLite's own here: the connection (one APSW connection; open one `Registry` per
thread), explicit `BEGIN IMMEDIATE` transactions through `write()` (no statement depends
on an implicit transaction), the file's checks (fsguard before every transaction, the
file's identity before commits that let a source go, the schema and application ids), and
the cached counts. Every operation is operations.py's. Claims are fenced by their owner
(host, pid, start time: one process) and the single-writer lock; a claim's `token` is
accepted and not needed: a file on one host has no node whose lease could run out under
another's. Heartbeats, duties and name reservations need no table on one host.
"""

from __future__ import annotations

import contextlib
import os
import stat
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import apsw

from contimg_publisher import fsguard, paths, treewalk
from contimg_publisher.registry.dialect import SQLITE
from contimg_publisher.registry.model import (
    STATUSES,
    RegistryBusy,
    RegistryError,
    RegistryGone,
    RegistryUnavailable,
)
from contimg_publisher.registry.operations import Operations, Row
from contimg_publisher.registry.schema import MIGRATIONS, SCHEMA_VERSION, TABLES
from contimg_publisher.states import Status, sql

APPLICATION_ID = 0x43494D50  # "CIMP"
PROBE_PATH = "\0contimg-publisher probe"  # never a file's name: no path holds a NUL

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


class Registry(Operations):
    """One APSW connection to the registry file; open one per thread."""

    dialect = SQLITE
    schema_version = SCHEMA_VERSION
    shared = False  # one host: see Operations.shared
    tables = TABLES

    def __init__(self, path: str | os.PathLike[str], busy_timeout_seconds: float = 10.0,
                 migrate: bool = True, create: bool = True, guard_reads: bool = True) -> None:
        self.path = os.fspath(path)
        self.location = self.path
        self.node = None
        self.busy_timeout_seconds = busy_timeout_seconds
        self.guard_reads = guard_reads
        self._depth = 0  # write() nesting: 0 outside a transaction
        self._counts: tuple[tuple[Any, int], dict[str, int]] | None = None  # see counts()
        self._init_gate()
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
        transaction, so pages reach the WAL and the commit is fsynced)."""
        with self.write() as cur:
            cur.execute("INSERT OR REPLACE INTO unclaimed_files (path, path_bytes, reason,"
                        " first_seen, changed_at) VALUES (?, x'', 'probe', 0, 0)",
                        (PROBE_PATH,))
            cur.execute("DELETE FROM unclaimed_files WHERE path = ?", (PROBE_PATH,))

    def clock(self) -> float:
        """The clock leases are measured by: this host's (an SQLite file has one host)."""
        return time.time()

    def _now(self, now: float | None) -> float:
        return time.time() if now is None else now

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

    # --- the session -----------------------------------------------------------------------

    def _rows(self, sql: str, args: Row | None = None) -> list[Row]:
        cursor = self.conn.cursor()
        cursor.execute(sql, args or {})
        try:
            names = [d[0] for d in cursor.getdescription()]
        except apsw.ExecutionCompleteError:
            return []
        return [dict(zip(names, row, strict=True)) for row in cursor]

    def _changed(self, sql: str, args: Row) -> int:
        with self.write() as cur:
            cur.execute(sql, args)
            return int(self._conn.changes())

    def _many(self, sql: str, args: Sequence[Row]) -> None:
        if args:
            self.conn.cursor().executemany(sql, args)

    def _table_columns(self, table: str) -> frozenset[str]:
        return frozenset(r["name"] for r in self._rows(
            "SELECT name FROM pragma_table_info(:t)", {"t": table}))

    @contextmanager
    def write(self) -> Iterator[apsw.Cursor]:
        """Operations.write as one explicit BEGIN IMMEDIATE transaction: a caller's write()
        around many calls makes one durable commit (one fsync for a burst)."""
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
        try:  # whatever fails, from the caller's statements to the COMMIT, rolls back
            try:
                yield cursor
            finally:
                self._depth = 0
            self.guard(write=True)  # made immutable during the transaction: no commit
            try:
                cursor.execute("COMMIT")
            except apsw.BusyError:
                raise RegistryBusy(f"registry {self.path}: commit blocked by another process;"
                                   " rolled back") from None
        except _UNAVAILABLE as exc:
            self._rollback(cursor)
            raise self._unavailable(exc) from None
        except BaseException:
            self._rollback(cursor)
            raise

    def _rollback(self, cursor: apsw.Cursor) -> None:
        if self._conn.in_transaction:
            with contextlib.suppress(apsw.Error):
                cursor.execute("ROLLBACK")

    def _unavailable(self, exc: apsw.Error) -> RegistryUnavailable:
        return RegistryUnavailable(f"registry {self.path}: cannot be written now "
                                   f"({type(exc).__name__}: {exc}); nothing was recorded")

    @contextmanager
    def read(self) -> Iterator[apsw.Cursor]:
        cursor = self.conn.cursor()
        cursor.execute("BEGIN")
        try:
            yield cursor
        finally:
            cursor.execute("COMMIT")

    def _scalar(self, sql: str, args: Row | Sequence[Any] | None = None) -> Any:
        row = self.conn.execute(sql, args or ()).fetchone()
        return None if row is None else row[0]

    # --- schema -------------------------------------------------------------------------------

    def version(self) -> int:
        return int(self._scalar("PRAGMA user_version"))

    def _check_version(self) -> None:
        self._refuse_newer(self.version())
        app = int(self._scalar("PRAGMA application_id"))
        if app not in (0, APPLICATION_ID):
            raise RegistryError(f"registry {self.path}: belongs to another application "
                                f"(application_id {app:#x}); left untouched")

    def migrate(self, to: int | None = None) -> list[int]:
        """Bring the file to SCHEMA_VERSION (or `to`), one transaction per step of
        schema.MIGRATIONS; returns the steps applied."""
        self._check_version()
        applied = []
        for target, step in MIGRATIONS:
            if to is not None and target > to:
                break
            with self.write() as cur:
                # Re-read inside the write lock: another process may have migrated meanwhile.
                if self.version() >= target:
                    continue
                step(self)
                cur.execute(f"PRAGMA application_id={APPLICATION_ID}")
                cur.execute(f"PRAGMA user_version={target}")
                applied.append(target)
        return applied

    def run_ddl(self, ddl: str) -> None:
        self.conn.execute(ddl)

    def add_column(self, table: str, name: str, decl: str) -> None:
        if name not in {row[1] for row in self.conn.execute(f"PRAGMA table_info({table})")}:
            self.conn.execute(f"ALTER TABLE {table} ADD COLUMN {name} {decl}")

    # --- what SQLite answers its own way ------------------------------------------------------

    def counts(self) -> dict[str, int]:
        """Rows per status. Nearly every row of a long-lived registry is `published`, so the
        other statuses are counted through the status index and `published` is what remains
        of COUNT(*), which SQLite answers from b-tree pages without visiting rows. One
        statement, so one consistent snapshot. The answer is kept until a commit changes
        the file, by this connection (total_changes) or any other (PRAGMA data_version)."""
        stamp = (self._scalar("PRAGMA data_version"), self.conn.total_changes())
        if self._counts is not None and self._counts[0] == stamp:
            return dict(self._counts[1])
        counts: dict[str, int] = dict.fromkeys(STATUSES, 0)
        published = sql(Status.PUBLISHED)
        rest = 0
        for part, status, n in self.conn.execute(
                f"SELECT 0, status, COUNT(*) FROM data_registry WHERE status < {published}"
                " GROUP BY status"
                " UNION ALL SELECT 0, status, COUNT(*) FROM data_registry"
                f" WHERE status > {published} GROUP BY status"
                " UNION ALL SELECT 0, NULL, COUNT(*) FROM data_registry WHERE status IS NULL"
                " UNION ALL SELECT 1, NULL, (SELECT COUNT(*) FROM data_registry)"):
            if part:
                rest = n
            elif status is not None or n:
                counts[status] = n
        counts[Status.PUBLISHED] = rest - sum(counts.values())
        self._counts = (stamp, dict(counts))
        return counts

    def size_bytes(self) -> int:
        return int(self._scalar("PRAGMA page_size")) * int(self._scalar("PRAGMA page_count"))


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
