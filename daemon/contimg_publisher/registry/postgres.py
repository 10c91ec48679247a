"""The PostgreSQL backend of the registry: one registry for several nodes.

The tables and operations are the SQLite backend's (operations.py, schema.py), plus what
several nodes sharing one server need:

- `node` on each row: the node whose staging area holds the product. A node claims,
  rescans, reconciles and parks only its own rows; reads for operators see every node.
- claims with `SELECT ... FOR UPDATE SKIP LOCKED`, in one statement: two nodes (or two
  daemons) claiming at once never take the same row, and neither waits for the other's.
- lease times from the server's clock (`now()`), never a client's: one clock for every node.
- a fence on every write after a claim: the claim sets `claim_token`, and each later
  UPDATE of the claimed row names it in its WHERE, so a node whose lease expired and whose
  row was claimed again (by anyone, itself included) changes nothing.
- `contimg_schema`, the schema version (SQLite's PRAGMA user_version), migrated under an
  advisory lock; `heartbeats`, one row per running daemon; `name_reservations`, folder
  names reserved across nodes; `duties`, the outbox's delivery and the fixity audit each
  one daemon's at a time, under a lease; outbox ids given in commit order (OUTBOX_LOCK).

Where SQLite's nuances have no equivalent here: check_identity is a no-op (a server has
no file to be replaced under the connection); there is no fsguard (a server refuses a
write with an error, it cannot SIGBUS us); the planner picks the due-row partial indexes
itself (no INDEXED BY); counts are not cached (no data_version to tell a change).

Each Registry holds a pool of one connection (psycopg-pool), which reconnects in the
background after the server restarts or the network comes back. A lost connection, a
server that is down or read-only, a full disk: RegistryUnavailable, nothing recorded. No
call waits longer than a fraction of the lease and the busy timeout (pgconn.Limits), so
a dead link pauses the daemon within its lease instead of blocking it.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import socket
import time
import uuid
from collections.abc import Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager
from typing import Any

import psycopg
import psycopg.errors
from psycopg import pq
from psycopg.rows import DictRow, dict_row
from psycopg.types.json import Jsonb
from psycopg_pool import ConnectionPool, PoolTimeout

from contimg_publisher import redact
from contimg_publisher.registry import pgconn, schema
from contimg_publisher.registry.dialect import PG_NOW, POSTGRES, pg, pg_fence
from contimg_publisher.registry.model import (
    EVENT_COLUMNS,
    EVENT_PUBLISHED,
    Candidate,
    Heartbeat,
    Planned,
    Product,
    Published,
    PublishRecord,
    Registered,
    RegistryBusy,
    RegistryUnavailable,
    Reservation,
    _product,
    columns,
    published_payload,
)
from contimg_publisher.registry.operations import Operations, Row
from contimg_publisher.registry.schema import MIGRATIONS, SCHEMA_VERSION
from contimg_publisher.states import Move, Status, Step, sql, sql_in

__all__ = ["MIGRATE_LOCK", "MIGRATIONS", "SCHEMA_VERSION", "PostgresRegistry"]

# The transaction-level advisory lock that serialises migrations of one database.
MIGRATE_LOCK = 0x43494D50

TABLES = (*schema.TABLES, "heartbeats", "contimg_schema", "name_reservations", "duties")

# The transaction-level advisory lock every transaction that writes an outbox event takes
# first (and holds to its commit): events get their ids in commit order, so a sink's cursor
# (delivered_through) never passes an event another node had not committed yet.
OUTBOX_LOCK = (MIGRATE_LOCK << 8) | 7
OUTBOX_IDLE_SECONDS = 5.0
# A connection that answered this recently is lent without asking the server (_check).
RECENT_SECONDS = 1.0

# What the server says when it cannot take work now: a lost connection, a server shutting
# down or in recovery, a full disk, a lock past lock_timeout, a statement past
# statement_timeout, no connection within the pool's wait, a read-only server, a
# transaction the server ended (see pgconn: every wait has a bound).
_UNAVAILABLE: tuple[type[Exception], ...] = (
    psycopg.OperationalError, psycopg.InterfaceError, psycopg.errors.ReadOnlySqlTransaction,
    psycopg.errors.IdleInTransactionSessionTimeout)
_POOL_NUMBERS = itertools.count(1)  # each registry's pool has a name of its own


def _texts(*names: str) -> str:
    """Parameters holding lists, as the text arrays unnest() takes side by side."""
    return ", ".join(f"CAST(:{name} AS TEXT[])" for name in names)


class PostgresRegistry(Operations):
    """A pool of one connection to the registry database; open one per thread."""

    dialect = POSTGRES
    schema_version = SCHEMA_VERSION
    shared = True  # every node's daemons: see Operations.shared
    tables = TABLES

    def __init__(self, uri: str, busy_timeout_seconds: float = 10.0, migrate: bool = True,
                 node: str | None = None, application: str = "contimg-publisher",
                 lease_seconds: float | None = None) -> None:
        self.uri = uri
        self.location = redact.url(uri)
        self.path = self.location  # what messages name, as the SQLite backend's file path
        self.node = node or socket.gethostname()
        self.busy_timeout_seconds = busy_timeout_seconds
        # Every wait bounded by a fraction of the lease and the busy timeout (see pgconn).
        self.limits = pgconn.limits(busy_timeout_seconds, lease_seconds)
        self._init_gate()
        self._conn: psycopg.Connection[DictRow] | None = None  # inside write()/read()
        self._pipeline: psycopg.Pipeline | None = None  # inside write()
        self._answered: tuple[int, float] = (0, 0.0)  # see _check
        self._outbox_held = False  # this transaction took OUTBOX_LOCK
        self._pool_name = f"contimg-{self.node}-{next(_POOL_NUMBERS)}"
        self._pool: ConnectionPool[psycopg.Connection[DictRow]] = ConnectionPool(
            uri, min_size=1, max_size=1, num_workers=1, open=False, name=self._pool_name,
            timeout=self.limits.call_seconds,
            reconnect_timeout=self.limits.reconnect_seconds,
            check=self._check,
            kwargs={"autocommit": True, "row_factory": dict_row,
                    "application_name": f"{application} {self.node}",
                    **self.limits.connect_kwargs()})
        try:
            self._pool.open(wait=False)
            if migrate:
                self.migrate()
            else:
                self._refuse_newer(self.version())
        except BaseException:
            self.close()
            raise

    # --- the session -------------------------------------------------------------------

    def _unavailable(self, exc: Exception) -> RegistryUnavailable:
        lim = self.limits
        if isinstance(exc, psycopg.errors.LockNotAvailable):
            return RegistryBusy(
                f"registry {self.location}: a lock (a row's, or the migration's) was held by "
                f"another process for longer than the busy timeout ({lim.call_seconds:g} s);"
                " nothing was written")
        if isinstance(exc, PoolTimeout):
            last = pgconn.CONNECT_ERRORS.last(self._pool_name)
            why = f"no connection to the server within {lim.call_seconds:g} s" + (
                f" (the last attempt: {last})" if last else "")
        elif isinstance(exc, psycopg.errors.QueryCanceled):
            why = f"a statement ran past its bound of {lim.statement_seconds:g} s"
        elif isinstance(exc, psycopg.errors.IdleInTransactionSessionTimeout):
            why = (f"the server ended a transaction left idle for "
                   f"{lim.idle_in_transaction_seconds:g} s")
        else:
            why = " ".join(str(exc).split()) or type(exc).__name__
        return RegistryUnavailable(f"registry {self.location}: cannot be used now "
                                   f"({type(exc).__name__}: {why}); nothing was recorded")

    @contextmanager
    def _told(self) -> Iterator[None]:
        """What the server says when it cannot take work now, as RegistryUnavailable."""
        try:
            yield
        except _UNAVAILABLE as exc:
            raise self._unavailable(exc) from None

    @contextmanager
    def _session(self) -> Iterator[psycopg.Connection[DictRow]]:
        """The connection of the transaction in progress, or one from the pool (autocommit)."""
        if self._conn is not None:
            yield self._conn
            return
        with self._told(), self._pool.connection() as conn:
            yield conn

    def _check(self, conn: psycopg.Connection[DictRow]) -> None:
        """The pool's check of a connection before it is lent: a round trip to the server,
        unless this connection answered within RECENT_SECONDS (a check per call would
        double the round trips of the hot path). A server lost since then is noticed by
        the statement itself (RegistryUnavailable), and the pool replaces the connection."""
        if conn.closed or conn.broken:
            raise psycopg.OperationalError("the connection is closed")
        key, when = self._answered
        if key != id(conn) or time.monotonic() - when > RECENT_SECONDS:
            ConnectionPool.check_connection(conn)

    def _done(self, conn: psycopg.Connection[DictRow]) -> None:
        self._answered = (id(conn), time.monotonic())

    def _run(self, sql: str, args: Row | None, sync: bool) -> psycopg.Cursor[DictRow]:
        with self._session() as conn, self._told():
            # Always with parameters, so a literal % (doubled by pg()) means the same in
            # every statement, those without placeholders included.
            cur = conn.execute(pg(sql), args or {})
            if sync and self._pipeline is not None:
                self._pipeline.sync()
            self._done(conn)
            return cur

    def _rows(self, sql: str, args: Row | None = None) -> list[Row]:
        cur = self._run(sql, args, True)
        result = cur.pgresult  # not cur.description, which builds every column's object
        return cur.fetchall() if result is not None and \
            result.status == pq.ExecStatus.TUPLES_OK else []

    def _changed(self, sql: str, args: Row) -> int:
        return int(self._run(sql, args, True).rowcount)

    def _exec(self, sql: str, args: Row | None = None) -> None:
        """In write(), sent along with the next statement whose answer is awaited (psycopg's
        pipeline mode): a statement whose result nobody reads costs no round trip."""
        self._run(sql, args, False)

    def _many(self, sql: str, args: Sequence[Row]) -> None:
        if not args:
            return
        with self._session() as conn, conn.cursor() as cur, self._told():
            cur.executemany(pg(sql), args)

    def _table_columns(self, table: str) -> frozenset[str]:
        """As the search_path finds an unqualified name."""
        return frozenset(r["name"] for r in self._rows(
            "SELECT a.attname AS name FROM pg_attribute a"
            " WHERE a.attrelid = to_regclass(quote_ident(:t)) AND a.attnum > 0"
            " AND NOT a.attisdropped", {"t": table}))

    def _state_value(self, value: Any) -> Any:
        return None if value is None else Jsonb(value)

    def _outbox_lock(self) -> None:
        """Every node's publishes wait while one holds OUTBOX_LOCK, so a transaction holding
        it that its client no longer drives (a node cut off before its COMMIT arrived) is
        ended by the server after OUTBOX_IDLE_SECONDS (at least; 3 busy timeouts), not
        after the server's TCP keepalives give up, which can take hours."""
        idle = max(OUTBOX_IDLE_SECONDS, 3 * self.busy_timeout_seconds)
        self._outbox_held = True
        self._exec(f"SELECT pg_advisory_xact_lock({OUTBOX_LOCK})")
        self._exec(f"SET LOCAL idle_in_transaction_session_timeout = {int(idle * 1000)}")

    def write(self) -> AbstractContextManager[psycopg.Connection[DictRow]]:
        """Operations.write in pipeline mode: BEGIN, and statements whose results are not
        read, travel with the next statement that is waited for."""
        return self._transaction(pipeline=True)

    @contextmanager
    def _transaction(self, pipeline: bool) -> Iterator[psycopg.Connection[DictRow]]:
        if self._conn is not None:
            with self._told():
                with self._conn.transaction():
                    yield self._conn
                if self._pipeline is not None and self._outbox_held:
                    # Its RELEASE sent and waited for: a transaction that holds the outbox's
                    # order must be idle (not mid-pipeline) while its client does something
                    # else, for the server to end it after OUTBOX_IDLE_SECONDS.
                    self._pipeline.sync()
            return
        with self._session() as conn:
            self._conn, self._outbox_held = conn, False
            try:
                with contextlib.ExitStack() as stack:
                    if pipeline:
                        self._pipeline = stack.enter_context(conn.pipeline())
                    stack.enter_context(conn.transaction())
                    yield conn
                self._done(conn)
            finally:
                self._conn, self._pipeline = None, None

    @contextmanager
    def read(self) -> Iterator[psycopg.Connection[DictRow]]:
        """A consistent snapshot for several SELECTs (REPEATABLE READ)."""
        if self._conn is not None:
            yield self._conn
            return
        with self._session() as conn:
            self._conn = conn
            try:
                with conn.transaction():
                    conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")
                    yield conn
            finally:
                self._conn = None

    def close(self) -> None:
        self._pool.close()
        pgconn.CONNECT_ERRORS.forget(self._pool_name)

    def probe(self) -> None:
        """A real commit that leaves nothing behind (a transaction id is assigned and its
        commit written to the server's WAL): whether the server takes commits again."""
        with self.write() as conn:
            conn.execute("SELECT pg_current_xact_id()")

    def check_identity(self) -> None:
        """Nothing to check: a server has no file that could be replaced under us."""

    def clock(self) -> float:
        """The server's clock, which every lease is measured by."""
        return float(self._scalar(f"SELECT {PG_NOW} AS now"))

    # --- schema -------------------------------------------------------------------------

    def version(self) -> int:
        if self._scalar("SELECT to_regclass('contimg_schema') IS NOT NULL AS there") is not True:
            return 0
        value = self._scalar("SELECT version FROM contimg_schema WHERE id = 1")
        return 0 if value is None else int(value)

    def migrate(self, to: int | None = None) -> list[int]:
        """Bring the database to SCHEMA_VERSION (or `to`), one step of MIGRATIONS at a time;
        returns the versions applied. Steps another node applied meanwhile are skipped: the
        version is read again under the lock."""
        target_version = SCHEMA_VERSION if to is None else to
        current = self.version()
        self._refuse_newer(current)
        applied: list[int] = []
        for target, step in MIGRATIONS:
            if target <= current or target > target_version:
                continue
            with self._transaction(pipeline=False) as conn:
                # DDL on a large table may outlast a statement's bound; a dead link is
                # still noticed (pgconn: tcp_user_timeout, keepalives).
                conn.execute("SET LOCAL statement_timeout = 0")
                conn.execute("SELECT pg_advisory_xact_lock(%s)", (MIGRATE_LOCK,))
                conn.execute("CREATE TABLE IF NOT EXISTS contimg_schema ("
                             " id INTEGER PRIMARY KEY CHECK (id = 1), version INTEGER NOT NULL,"
                             " application TEXT NOT NULL)")
                row = conn.execute("SELECT version FROM contimg_schema WHERE id = 1").fetchone()
                version = 0 if row is None else int(row["version"])
                self._refuse_newer(version)
                if version >= target:
                    continue
                step(self)
                conn.execute(
                    "INSERT INTO contimg_schema (id, version, application)"
                    " VALUES (1, %s, 'contimg-publisher')"
                    " ON CONFLICT (id) DO UPDATE SET version = EXCLUDED.version", (target,))
            applied.append(target)
        return applied

    def run_ddl(self, ddl: str) -> None:
        with self._session() as conn:
            conn.execute(ddl)

    def add_column(self, table: str, name: str, decl: str) -> None:
        self.run_ddl(f"ALTER TABLE {table} ADD COLUMN IF NOT EXISTS {name} {decl}")

    def size_bytes(self) -> int:
        return int(self._scalar(
            "SELECT COALESCE(SUM(pg_total_relation_size(to_regclass(t))), 0) AS n"
            " FROM unnest(CAST(:t AS TEXT[])) AS t", {"t": list(TABLES)}))

    # --- a burst's registrations, a batch's plans and publishes: a statement each ----------

    def register_many(self, candidates: Sequence[Candidate], now: float | None = None
                      ) -> list[tuple[Registered, Product]]:
        """The candidates nothing is registered for (no row of their id, no unpublished row
        of this node at their path: what register() would insert) inserted in one
        statement; the others registered one by one, as register() does."""
        if not candidates:
            return []
        if len({c.data_id for c in candidates}) < len(candidates) or \
                len({c.stage_path for c in candidates}) < len(candidates):
            return super().register_many(candidates, now)
        listed = ", ".join((_texts("types", "ids", "bases", "paths", "headers", "checksums"),
                            "CAST(:raws AS BYTEA[])",
                            *(f"CAST(:{n} AS BIGINT[])"
                              for n in ("sizes", "devs", "inos", "mtimes", "ctimes"))))
        values: dict[str, Any] = {
            "node": self.node, "now": self._now(now),
            "types": [c.data_type for c in candidates], "ids": [c.data_id for c in candidates],
            "bases": [c.base_path for c in candidates],
            "paths": [c.stage_path for c in candidates],
            "headers": [json.dumps(c.metadata, sort_keys=True) for c in candidates],
            "checksums": [c.checksum for c in candidates],
            "raws": [c.stage_path_bytes for c in candidates],
            "sizes": [c.identity.size for c in candidates],
            "devs": [c.identity.dev for c in candidates],
            "inos": [c.identity.ino for c in candidates],
            "mtimes": [c.identity.mtime_ns for c in candidates],
            "ctimes": [c.identity.ctime_ns for c in candidates]}
        into, registered = self._registered("v.")
        with self.write():
            made = {r["data_id"]: r for r in self._rows(
                f"INSERT INTO data_registry ({into}) SELECT {registered} FROM unnest({listed})"
                " WITH ORDINALITY AS v(type, id, base, path, header, checksum, raw, size, dev,"
                " ino, mtime, ctime, n)"
                " WHERE NOT EXISTS (SELECT 1 FROM data_registry d WHERE d.data_id = v.id)"
                " AND NOT EXISTS (SELECT 1 FROM data_registry d WHERE d.stage_path = v.path"
                f" AND d.node = :node AND d.status != {sql(Status.PUBLISHED)})"
                " ORDER BY v.n ON CONFLICT DO NOTHING RETURNING *", values)}
            return [(Registered.NEW, _product(made[c.data_id])) if c.data_id in made
                    else self._register(c, self._now(now)) for c in candidates]

    def set_publish_plans(self, owner: str, plans: Sequence[Planned]) -> set[str]:
        """One UPDATE for the batch, each row fenced by its own claim token."""
        if not plans:
            return set()
        if len({p.data_id for p in plans}) < len(plans):
            return super().set_publish_plans(owner, plans)
        rows = self._rows(
            "UPDATE data_registry SET publish_target = v.target, publish_temp = v.temp,"
            f" publish_step = {sql(Step.PLANNED)}, sidecars_json = v.sidecars"
            f" FROM unnest({_texts('ids', 'targets', 'temps', 'sidecars', 'tokens')})"
            " AS v(data_id, target, temp, sidecars, token)"
            f" WHERE data_registry.data_id = v.data_id AND {pg_fence('v.token')}"
            " RETURNING data_registry.data_id",
            {"owner": owner, "ids": [p.data_id for p in plans],
             "targets": [p.target for p in plans], "temps": [p.temp for p in plans],
             "sidecars": [json.dumps(list(p.sidecars)) for p in plans],
             "tokens": [p.token for p in plans]})
        return {r["data_id"] for r in rows}

    def mark_published_many(self, items: Sequence[tuple[Published, str | None]],
                            owner: str | None, now: float | None = None) -> set[str]:
        """What mark_published does for each item, in three statements for the batch: the
        rows and their publish_log records (one UPDATE, its RETURNING inserted), then
        OUTBOX_LOCK, then every event (one INSERT, in the items' order)."""
        ids = [item.data_id for item, _ in items]
        if not ids:
            return set()
        if self._records or len(set(ids)) < len(ids):
            return super().mark_published_many(items, owner, now)
        values = {"now": self._now(now), "owner": owner, "ids": ids,
                  "paths": [item.published_path for item, _ in items],
                  "sidecars": [json.dumps(list(item.sidecars)) for item, _ in items],
                  "modes": [item.publish_mode for item, _ in items],
                  "tokens": [token for _, token in items]}
        returned = ", ".join(f"data_registry.{c.strip()}"
                             for c in (*EVENT_COLUMNS.split(","), "node"))
        listed = _texts("ids", "paths", "sidecars", "modes", "tokens")
        with self.write():
            rows = self._rows(
                f"WITH v AS (SELECT * FROM unnest({listed}) WITH ORDINALITY"
                " AS v(data_id, path, sidecars, mode, token, n)),"
                f" done AS (UPDATE data_registry SET {self._published_sets('v.')}"
                " FROM v WHERE data_registry.data_id = v.data_id"
                f" AND {sql_in(Move.PUBLISH)} AND (CAST(:owner AS TEXT) IS NULL"
                f" OR ({pg_fence('v.token')})) RETURNING {returned}, v.n),"
                f" logged AS (INSERT INTO publish_log ({columns(PublishRecord)}, node)"
                f" SELECT {columns(PublishRecord)}, node FROM done ORDER BY n)"
                " SELECT * FROM done ORDER BY n", values)
            if not rows:
                return set()
            supersedes = {item.data_id: item.supersedes for item, _ in items}
            for row in rows:
                self._supersede(row["data_id"], supersedes[row["data_id"]])
            self._outbox_lock()
            host = socket.gethostname()
            self._exec(
                "INSERT INTO outbox (event_id, type, data_id, payload_json, created_at, node)"
                f" SELECT e.event_id, :type, e.data_id, e.payload, {POSTGRES.at}, :node"
                f" FROM unnest({_texts('events', 'ids', 'payloads')}) WITH ORDINALITY"
                " AS e(event_id, data_id, payload, n) ORDER BY e.n",
                {"type": EVENT_PUBLISHED, "now": values["now"], "node": self.node,
                 "events": [str(uuid.uuid4()) for _ in rows],
                 "ids": [row["data_id"] for row in rows],
                 "payloads": [json.dumps(published_payload(
                     row, supersedes[row["data_id"]], host, self.node), sort_keys=True,
                     default=str) for row in rows]})
        return {row["data_id"] for row in rows}

    def heartbeat(self, owner: str, started: float, version: str) -> None:
        """This daemon is alive now (the server's clock): its row, made or renewed."""
        self._rows(
            "INSERT INTO heartbeats (owner, node, host, pid, started, last_seen, version)"
            f" VALUES (:owner, :node, :host, :pid, :started, {PG_NOW}, :version)"
            " ON CONFLICT (owner) DO UPDATE SET last_seen = EXCLUDED.last_seen,"
            " node = EXCLUDED.node, version = EXCLUDED.version",
            {"owner": owner, "node": self.node, "host": socket.gethostname(),
             "pid": os.getpid(), "started": started, "version": version})

    def end_heartbeat(self, owner: str) -> None:
        """A clean stop: the daemon is no longer listed."""
        self._rows("DELETE FROM heartbeats WHERE owner = :owner", {"owner": owner})

    def heartbeats(self) -> list[Heartbeat]:
        """Every node's daemons, with how long ago each was last heard from."""
        return [Heartbeat(**r) for r in self._rows(
            "SELECT owner, node, host, pid, started, last_seen, version,"
            f" {PG_NOW} - last_seen AS age_seconds FROM heartbeats ORDER BY node, started")]

    # --- folder-name reservations (a products area several nodes share) -------------------

    def reserve_name(self, published_path: str, data_id: str, owner: str,
                     token: str | None = None) -> str | None:
        """INSERT on the unique name: of two nodes reserving one name at once, the server
        lets exactly one insert it; the other sees the holder. A reservation the same product
        made earlier (a crashed attempt, a failed one) passes to this claim."""
        values = {"path": published_path, "id": data_id, "node": self.node, "owner": owner,
                  "token": token}
        for _ in range(3):  # a holder that releases between the two statements: try again
            if self._one(
                    "INSERT INTO name_reservations (published_path, data_id, node, owner,"
                    f" claim_token, reserved_at) VALUES (:path, :id, :node,"
                    f" :owner, :token, {PG_NOW}) ON CONFLICT (published_path) DO UPDATE"
                    " SET node = EXCLUDED.node, owner = EXCLUDED.owner,"
                    " claim_token = EXCLUDED.claim_token, reserved_at = EXCLUDED.reserved_at"
                    " WHERE name_reservations.data_id = EXCLUDED.data_id RETURNING data_id",
                    values) is not None:
                return None
            holder = self._scalar("SELECT data_id FROM name_reservations"
                                  " WHERE published_path = :path", values)
            if holder is not None:
                return str(holder)
        raise RegistryBusy(f"registry {self.location}: the reservation of {published_path} "
                           "kept changing hands; nothing was reserved")

    def release_name(self, published_path: str, data_id: str, token: str | None = None
                     ) -> bool:
        return self._changed(
            "DELETE FROM name_reservations WHERE published_path = :path"
            " AND data_id = :id AND (CAST(:token AS TEXT) IS NULL OR claim_token = :token)",
            {"path": published_path, "id": data_id, "token": token}) > 0

    def reservations(self) -> list[Reservation]:
        return [Reservation(**r) for r in self._rows(
            "SELECT r.published_path, r.data_id, r.owner, r.claim_token, r.reserved_at"
            " FROM name_reservations r LEFT JOIN data_registry d ON d.data_id = r.data_id"
            f" WHERE r.node = :node AND NOT COALESCE(d.status = {sql(Status.PUBLISHED)}"
            " AND d.published_path = r.published_path, false)"
            " ORDER BY r.reserved_at", {"node": self.node})]

    def lead(self, duty: str, owner: str, lease_seconds: float) -> bool:
        """Take `duty` when free or lapsed, renew it when `owner` holds it (the server's
        clock); False while another daemon's lease runs."""
        return self._one(
            "INSERT INTO duties (duty, owner, node, since, expires_at) VALUES"
            f" (:duty, :owner, :node, {PG_NOW}, {PG_NOW} + CAST(:lease AS DOUBLE PRECISION))"
            " ON CONFLICT (duty) DO UPDATE SET owner = EXCLUDED.owner, node = EXCLUDED.node,"
            " since = CASE WHEN duties.owner = EXCLUDED.owner THEN duties.since"
            "   ELSE EXCLUDED.since END, expires_at = EXCLUDED.expires_at"
            " WHERE duties.owner = EXCLUDED.owner OR duties.expires_at < EXCLUDED.since"
            " RETURNING owner", {"duty": str(duty), "owner": owner, "node": self.node,
                                 "lease": lease_seconds}) is not None

    def resign(self, duty: str, owner: str) -> None:
        self._rows("DELETE FROM duties WHERE duty = :duty AND owner = :owner",
                   {"duty": str(duty), "owner": owner})
