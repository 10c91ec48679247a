"""Every registry operation, written once against a session and a dialect.

A backend (sqlite.py, postgres.py) subclasses `Operations` and gives it its session: how a
statement runs (`_rows`, `_changed`, `_many`), transactions (`write`, `read`), the clock,
and what only it has (file identity, advisory locks, heartbeats, duties, reservations).
The SQL fragments that differ are its `dialect` (dialect.py). Statements name their
parameters (`:name`); a backend on a server also fences and scopes rows by its `node`.

`Operations` is the registry's contract, whichever backend keeps it: the rest of the program
knows it as RegistryBackend. Every backend raises the errors of model.py: RegistryUnavailable
(and RegistryBusy) for "cannot be used now, nothing was recorded", a state the daemon waits
out; RegistryGone when the records went away under it; RegistryError for a registry that
cannot be used at all. Owner-checked writes (those after a claim) also take the claim's
token (Product.claim_token): a backend that issues tokens makes such a write change nothing
once another claim took the row, even one by the same owner.
"""

from __future__ import annotations

import json
import os
import random
import socket
import uuid
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Sequence
from contextlib import AbstractContextManager
from typing import Any, ClassVar, Self

from contimg_publisher.qa import Condition, Record
from contimg_publisher.registry import records as records_sql
from contimg_publisher.registry.dialect import DUE_AUTO, DUE_ORDER, DUE_REQUESTED, Dialect
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
    Planned,
    Product,
    Published,
    PublishRecord,
    Quarantined,
    RebuildOutcome,
    Rebuilt,
    Recorded,
    Registered,
    RegistryError,
    Rejection,
    Reservation,
    SinkState,
    Unclaimed,
    _product,
    _same_bytes,
    _same_file,
    backoff_delay,
    checksum_known,
    columns,
    delivery_states,
    event_of,
    folder_range,
    identity_of,
    published_payload,
    qa_hold_sql,
    recorded_under,
    sidecars_of,
    truncate,
)
from contimg_publisher.states import (
    Delivery,
    FailureKind,
    Move,
    Status,
    Step,
    may,
    sql,
    sql_in,
    to,
)

Row = dict[str, Any]

_PUBLISHED = sql(Status.PUBLISHED)
_PUBLISHING = sql(Status.PUBLISHING)
_STAGING = sql(Status.STAGING)
_FAILED = sql(Status.FAILED)
_REJECTED = sql(Status.REJECTED)

# Copies a row's publish into publish_log (the row was just made `published`).
_LOGGED = columns(PublishRecord)
_LOG_PUBLISH = (f"INSERT INTO publish_log ({_LOGGED}{{node}}) SELECT {_LOGGED}{{node}}"
                f" FROM data_registry WHERE data_id = :data_id AND status = {_PUBLISHED}")
_FAILURE = ("INSERT INTO publish_failures (data_id, attempt, kind, error, at, host, pid)"
            " VALUES (:data_id, :attempt, :kind, :text, :at, :host, :pid)")


class Operations(ABC):
    """The registry's contract and its one implementation; open one per thread."""

    dialect: ClassVar[Dialect]
    #: Where it is: a file path, or a server's URI without its password.
    location: str
    #: The schema this program needs.
    schema_version: int
    #: Whether other hosts' daemons use it too (a server): a claim is then only counted
    #: on while its lease can be renewed.
    shared: ClassVar[bool]
    #: The node whose staging area this connection's daemon acts on (a server's rows).
    node: str | None

    def _init_gate(self) -> None:
        self._gate = "NULL"  # set_qa_gate(): no gate until the rules are known
        self._conditions: tuple[Condition, ...] = ()
        self._records: tuple[Record, ...] = ()
        self._found: records_sql.Found = {}

    # --- what each backend provides ---------------------------------------------------------

    @abstractmethod
    def _rows(self, sql: str, args: Row | None = None) -> list[Row]:
        """Run one statement (a write outside write() is a transaction of its own)."""

    @abstractmethod
    def _changed(self, sql: str, args: Row) -> int:
        """Run one write; how many rows it changed."""

    def _exec(self, sql: str, args: Row | None = None) -> None:
        """Run one write whose result nobody reads: a backend may send it with the next
        statement it waits for, or with the end of the write() it is in."""
        self._rows(sql, args)

    @abstractmethod
    def _many(self, sql: str, args: Sequence[Row]) -> None:
        """Run one write for each set of parameters."""

    @abstractmethod
    def write(self) -> AbstractContextManager[Any]:
        """One transaction, committed on success and rolled back on error; a write inside
        another is a SAVEPOINT of it, so a caller's write() makes many calls one commit."""

    @abstractmethod
    def read(self) -> AbstractContextManager[Any]:
        """A consistent snapshot for several SELECTs."""

    @abstractmethod
    def close(self) -> None: ...

    @abstractmethod
    def probe(self) -> None:
        """A real write that leaves nothing behind: whether the registry takes commits again.
        RegistryUnavailable when it does not."""

    @abstractmethod
    def clock(self) -> float:
        """The clock leases are measured by."""

    @abstractmethod
    def check_identity(self) -> None:
        """RegistryGone unless the records are still those this connection opened."""

    @abstractmethod
    def version(self) -> int: ...

    @abstractmethod
    def migrate(self) -> list[int]:
        """Bring the registry to its schema version; returns the steps applied."""

    def _refuse_newer(self, version: int) -> None:
        if version > self.schema_version:
            raise RegistryError(
                f"registry {self.location}: schema version {version} is newer than this "
                f"program understands ({self.schema_version}); upgrade contimg-publisher")

    @abstractmethod
    def size_bytes(self) -> int: ...

    @abstractmethod
    def _table_columns(self, table: str) -> frozenset[str]:
        """The columns of a table as an unqualified name finds it (empty: no such table)."""

    def _now(self, now: float | None) -> float | None:
        """`now` as the statements take it (`dialect.at`): None, on a server, is its clock."""
        return now

    def _time(self, now: float | None) -> float:
        """`now`, or the clock's time, as a number Python decides with."""
        return self.clock() if now is None else now

    def _outbox_lock(self) -> None:
        """Taken before an outbox event is written (a server gives ids in commit order)."""
        return None

    def _state_value(self, value: Any) -> Any:
        """A value of audit_state as the column takes it."""
        return value

    # heartbeats, duties and name reservations: a server's; one file has one daemon

    def heartbeat(self, owner: str, started: float, version: str) -> None:
        """Nothing to record: the lock file names the one daemon."""
        return None

    def end_heartbeat(self, owner: str) -> None:
        return None

    def heartbeats(self) -> list[Heartbeat]:
        return []

    def lead(self, duty: str, owner: str, lease_seconds: float) -> bool:
        """Take or renew `duty`; False while another daemon's lease runs."""
        return True

    def resign(self, duty: str, owner: str) -> None:
        """Give `duty` up (a clean stop)."""
        return None

    def reserve_name(self, published_path: str, data_id: str, owner: str,
                     token: str | None = None) -> str | None:
        """Reserve a folder product's final name; None when it is this product's, else the
        data_id holding it. One host under the single-writer lock: always granted."""
        return None

    def release_name(self, published_path: str, data_id: str, token: str | None = None
                     ) -> bool:
        return False

    def reservations(self) -> list[Reservation]:
        """This node's reservations not settled by a publish under the reserved name."""
        return []

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- helpers ------------------------------------------------------------------------------

    def _one(self, sql: str, args: Row | None = None) -> Row | None:
        rows = self._rows(sql, args)
        return rows[0] if rows else None

    def _scalar(self, sql: str, args: Row | None = None) -> Any:
        row = self._one(sql, args)
        return None if row is None else next(iter(row.values()))

    def _products(self, sql: str, args: Row | None = None) -> list[Product]:
        return [_product(r) for r in self._rows(sql, args)]

    def _first(self, sql: str, args: Row | None = None) -> Product | None:
        row = self._one(sql, args)
        return None if row is None else _product(row)

    def _args(self, **values: Any) -> Row:
        return {"node": self.node, **values}

    @staticmethod
    def _in(name: str, values: Sequence[Any], args: Row) -> str:
        """`(:name0, :name1, ...)`, the values put into args."""
        for i, v in enumerate(values):
            args[f"{name}{i}"] = v
        return "(" + ", ".join(f":{name}{i}" for i in range(len(values))) + ")"

    @staticmethod
    def _limit(limit: int | None, args: Row) -> str:
        if limit is None:
            return ""
        args["limit"] = limit
        return " LIMIT :limit"

    @property
    def _node_col(self) -> str:
        return ", node" if self.dialect.nodes else ""

    @property
    def _node_val(self) -> str:
        return ", :node" if self.dialect.nodes else ""

    @property
    def _if_free(self) -> str:
        """An INSERT of a new row on a server: another node may have made it meanwhile."""
        return " ON CONFLICT DO NOTHING" if self.dialect.nodes else ""

    @property
    def _fenced(self) -> str:
        """The claim's fence, or no check at all when owner is None (reconciliation)."""
        return f"(CAST(:owner AS TEXT) IS NULL OR ({self.dialect.fence}))"

    def _ours(self, row: Row) -> bool:
        """A row of this node (one without a node, copied from an older registry, is adopted
        by the node that finds its file)."""
        return row.get("node") in (None, self.node)

    def _failure(self, data_id: str, attempt: int, kind: str, text: str, at: Any,
                 host: str | None = None, pid: int | None = None) -> Row:
        return {"data_id": data_id, "attempt": attempt, "kind": str(kind), "text": text,
                "at": at, "host": host or socket.gethostname(), "pid": pid or os.getpid()}

    # --- the QA gate and the products' own records ----------------------------------------

    def set_qa_gate(self, conditions: Sequence[Condition], records: Sequence[Record] = ()
                    ) -> None:
        """The QA gate claims, due times and hold reasons apply from now on (qa.conditions
        and qa.records of the configured rules). RegistryError, the gate unchanged, when a
        record's table exists without a column its rule names, or is one of ours."""
        records = tuple(records)
        found = self._record_tables(records)
        wrong = records_sql.problems(records, found, self.tables)
        if wrong:
            raise RegistryError(f"registry {self.location}: {'; '.join(wrong)}")
        self._conditions, self._records = tuple(conditions), records
        self._build_gate(found)

    tables: ClassVar[tuple[str, ...]] = ()

    def _build_gate(self, found: records_sql.Found) -> None:
        self._found = found
        quote = self.dialect.quote
        self._gate = qa_hold_sql(self._conditions, quote=quote, record_whens=[
            w for r in self._records for w in records_sql.gate_whens(r, found, quote)])

    @property
    def _qa_hold(self) -> str:
        """The gate's SQL expression. While a record's table does not exist yet, whether it
        does now is asked every time: its products wait for it, and go as soon as the
        pipeline has created it."""
        if any(self._found.get(r.table) is None for r in self._records):
            found = self._record_tables(self._records)
            if found != self._found:
                self._build_gate(found)
        return self._gate

    def _record_tables(self, records: Sequence[Record]) -> dict[str, frozenset[str] | None]:
        return {r.table: self._table_columns(r.table) or None for r in records}

    def _point_record(self, key: str, value: Any, published_path: str) -> None:
        """In the caller's transaction (the one that records the publish): the product's
        own record ([products.record]) names the published path instead of the staged one,
        so the pipeline's `SELECT path` names a file that exists once this commits."""
        if not self._records:
            return
        row = self._one(f"SELECT data_type, stage_path FROM data_registry WHERE {key} = :v",
                        {"v": value})
        for r in self._records:
            if row is not None and r.data_type == row["data_type"] and \
                    self._record_tables([r])[r.table] is not None:
                self._rows(records_sql.update_sql(r), {"published": published_path,
                                                       "staged": row["stage_path"]})

    # --- reads ----------------------------------------------------------------------------

    def get(self, data_id: str) -> Product | None:
        return self._first("SELECT * FROM data_registry WHERE data_id = :id", {"id": data_id})

    def by_stage_path(self, stage_path: str) -> list[Product]:
        """This node's rows staged at a path (another node's path names another disk)."""
        return self.by_stage_paths([stage_path])[stage_path]

    def by_stage_paths(self, stage_paths: Sequence[str]) -> dict[str, list[Product]]:
        """by_stage_path of each path, in one statement (a burst's checks ask once)."""
        found: dict[str, list[Product]] = {path: [] for path in stage_paths}
        if found:
            args = self._args()
            for row in self._products(
                    "SELECT * FROM data_registry WHERE stage_path IN"
                    f" {self._in('p', list(found), args)}{self.dialect.mine()} ORDER BY id",
                    args):
                found[row.stage_path].append(row)
        return found

    def by_published_path(self, published_path: str) -> Product | None:
        return self._first(
            "SELECT * FROM data_registry WHERE published_path = :path"
            f" AND status = {_PUBLISHED} ORDER BY id DESC LIMIT 1", {"path": published_path})

    def products(self, status: str | None = None, data_type: str | None = None,
                 limit: int | None = None, newest_first: bool = True) -> list[Product]:
        args: Row = {"status": status or None, "type": data_type or None}
        return self._products(
            "SELECT * FROM data_registry WHERE (CAST(:status AS TEXT) IS NULL"
            " OR status = :status) AND (CAST(:type AS TEXT) IS NULL OR data_type = :type)"
            f" ORDER BY id {'DESC' if newest_first else 'ASC'}{self._limit(limit, args)}",
            args)

    def stage_index(self) -> dict[str, tuple[str, Identity | None]]:
        """stage_path -> (status, identity) of this node's rows not yet published, for fast
        rescans. Published rows stay out: a long-lived registry is nearly all of them."""
        out: dict[str, tuple[str, Identity | None]] = {}
        for r in self._rows(
                "SELECT stage_path, status, stage_dev, stage_ino, size_bytes, stage_mtime_ns,"
                f" stage_ctime_ns FROM data_registry WHERE {self.dialect.unpublished}"
                f"{self.dialect.mine()}", self._args()):
            out[r["stage_path"]] = (r["status"], identity_of(r))
        return out

    def waiting_at(self, stage_path: str) -> bool:
        """Whether a row staged at this path waits (staging or failed): one index probe."""
        return bool(self._scalar(
            "SELECT EXISTS (SELECT 1 FROM data_registry WHERE stage_path = :path"
            f"{self.dialect.mine()} AND {sql_in(Move.REQUEST)}) AS there",
            self._args(path=stage_path)))

    def published_at(self, stage_path: str) -> bool:
        return bool(self._scalar(
            "SELECT EXISTS (SELECT 1 FROM data_registry WHERE stage_path = :path"
            f"{self.dialect.mine()} AND status = {_PUBLISHED}) AS there",
            self._args(path=stage_path)))

    def history(self, data_id: str) -> list[Failure]:
        return [Failure(**r) for r in self._rows(
            f"SELECT {columns(Failure)} FROM publish_failures WHERE data_id = :id"
            " ORDER BY at, id", {"id": data_id})]

    def relationships(self, data_id: str) -> list[dict[str, str]]:
        return [{"parent": r["parent_data_id"], "child": r["child_data_id"],
                 "type": r["relationship_type"]} for r in self._rows(
            "SELECT parent_data_id, child_data_id, relationship_type FROM data_relationships"
            " WHERE parent_data_id = :id OR child_data_id = :id ORDER BY id", {"id": data_id})]

    def counts(self) -> dict[str, int]:
        """Rows per status, every node's."""
        counts: dict[str, int] = dict.fromkeys(STATUSES, 0)
        for r in self._rows("SELECT status, COUNT(*) AS n FROM data_registry GROUP BY status"):
            counts[r["status"]] = int(r["n"])
        return counts

    def counts_by_type(self) -> dict[tuple[str, str], int]:
        return {(r["data_type"], r["status"]): int(r["n"]) for r in self._rows(
            "SELECT data_type, status, COUNT(*) AS n FROM data_registry"
            " GROUP BY data_type, status")}

    def oldest_waiting(self) -> Product | None:
        return self._first(f"SELECT * FROM data_registry WHERE status = {_STAGING}"
                           " ORDER BY staged_at LIMIT 1")

    def failures_since(self, since: float) -> int:
        return int(self._scalar("SELECT COUNT(*) AS n FROM publish_failures WHERE at >= :t",
                                {"t": since}))

    def published_since(self, since: float) -> int:
        return int(self._scalar("SELECT COUNT(*) AS n FROM data_registry"
                                " WHERE published_at >= :t", {"t": since}))

    def last_published(self) -> Product | None:
        return self._first("SELECT * FROM data_registry WHERE published_at IS NOT NULL"
                           " ORDER BY published_at DESC LIMIT 1")

    def next_due_at(self) -> float | None:
        """When the earliest of this node's waiting products becomes due (None: nothing
        waits); each half read from its partial index."""
        d = self.dialect
        value = self._scalar(
            "SELECT MIN(due) AS due FROM ("
            " SELECT due FROM (SELECT COALESCE(next_attempt_at, 0) AS due FROM data_registry"
            f"{d.index('data_registry_due_auto')} WHERE {DUE_AUTO}{d.mine()}"
            f" AND {self._qa_hold} IS NULL ORDER BY {DUE_ORDER} LIMIT 1) AS auto"
            " UNION ALL SELECT MIN(COALESCE(next_attempt_at, 0)) FROM data_registry"
            f"{d.index('data_registry_due_requested')} WHERE {DUE_REQUESTED}{d.mine()}"
            ") AS due", self._args())
        return None if value is None else float(value)

    def publishing(self, every_node: bool = False) -> list[Product]:
        """This node's rows in `publishing` (the ones its reconciliation may resolve), or
        every node's (the temporary names a shared products area must keep)."""
        return self._products(
            f"SELECT * FROM data_registry WHERE status = {_PUBLISHING}"
            f"{'' if every_node else self.dialect.mine()}", self._args())

    # --- registration ---------------------------------------------------------------------

    def register(self, c: Candidate, now: float | None = None) -> tuple[Registered, Product]:
        """Record a finished product staged here; idempotent. See Registered."""
        with self.write():
            return self._register(c, self._now(now))

    def register_many(self, candidates: Sequence[Candidate], now: float | None = None
                      ) -> list[tuple[Registered, Product]]:
        """register() of each candidate in order, in one transaction (a backend on a server
        inserts the new ones in one statement)."""
        with self.write():
            return [self.register(c, now) for c in candidates]

    def _find(self, data_id: str, stage_path: str, insert: tuple[str, str] | None = None,
              values: Row | None = None) -> tuple[Row | None, Row | None]:
        """(the row of the product staged at `stage_path` that would take `data_id`, the row
        `insert` made). The row found: that of the id when it is at that path, else the
        unpublished row at that path (a product registered by other code under another id,
        such as the full path that the legacy register_pipeline_data uses), else the row of
        that id, elsewhere. One statement; on a server (DML in a WITH) the INSERT of
        `insert` (its columns, its values) is in it too, made when nothing was found."""
        find = ("SELECT *, 0 AS found_by FROM data_registry WHERE data_id = :id UNION ALL"
                " SELECT * FROM (SELECT *, 1 AS found_by FROM data_registry"
                f" WHERE stage_path = :path{self.dialect.mine()} AND status != {_PUBLISHED}"
                " ORDER BY id DESC LIMIT 1) AS p")
        args = {**self._args(), **(values or {}), "id": data_id, "path": stage_path}
        if insert is not None:
            find = (f"WITH f AS ({find}), made AS (INSERT INTO data_registry ({insert[0]})"
                    f" SELECT {insert[1]} WHERE NOT EXISTS (SELECT 1 FROM f)"
                    " ON CONFLICT DO NOTHING RETURNING *, 2 AS found_by)"
                    " SELECT * FROM f UNION ALL SELECT * FROM made")
        by = [(r.pop("found_by"), r) for r in self._rows(find, args)]
        row = next((r for k, r in by if k == 0), None)
        made = next((r for k, r in by if k == 2), None)
        if row is not None and row["stage_path"] == stage_path and self._ours(row):
            return row, made
        return next((r for k, r in by if k == 1), row), made

    def _registered(self, p: str = ":") -> tuple[str, str]:
        """The columns a registration gives a new row, and their values: `p`type, `p`id, ...
        (its parameters, or the rows of a server's batch)."""
        at = self.dialect.at
        return ("data_type, data_id, base_path, status, stage_path, created_at, staged_at,"
                " metadata_json, header_json, auto_publish_enabled, publish_attempts,"
                " size_bytes, checksum, stage_path_bytes, stage_dev, stage_ino,"
                f" stage_mtime_ns, stage_ctime_ns, updated_at{self._node_col}",
                f"{p}type, {p}id, {p}base, {_STAGING}, {p}path, {at}, {at}, {p}header,"
                f" {p}header, 1, 0, {p}size, {p}checksum, {p}raw, {p}dev, {p}ino, {p}mtime,"
                f" {p}ctime, {at}{self._node_val}")

    def _register(self, c: Candidate, now: float | None) -> tuple[Registered, Product]:
        ident, at = c.identity, self.dialect.at
        values = self._args(
            type=c.data_type, id=c.data_id, base=c.base_path, path=c.stage_path, now=now,
            header=json.dumps(c.metadata, sort_keys=True), size=ident.size,
            checksum=c.checksum, raw=c.stage_path_bytes, dev=ident.dev, ino=ident.ino,
            mtime=ident.mtime_ns, ctime=ident.ctime_ns)
        insert = self._registered()
        # A server: found, or made, in one round trip.
        row, made = self._find(c.data_id, c.stage_path, insert if self.dialect.nodes else None,
                               values)
        here = row is not None and row["stage_path"] == c.stage_path and self._ours(row)
        if row is not None and here and row["data_type"] != c.data_type:
            # Registered at this path by another writer as another type: not ours to change.
            return Registered.FOREIGN, _product(row)
        if row is None:
            if made is None and not self.dialect.nodes:
                made = self._one(f"INSERT INTO data_registry ({insert[0]}) VALUES ({insert[1]})"
                                 " RETURNING *", values)  # one writer: nothing came between
            if made is None:
                # Another node registered this data_id since it was looked for (its commit
                # came first): judged again against that row, a "conflict" for a new id.
                return self._register(c, now)
            return Registered.NEW, _product(made)
        if not here:
            return Registered.CONFLICT, _product(row)
        if row["status"] == Status.PUBLISHING:
            return Registered.BUSY, _product(row)
        if row["status"] == Status.PUBLISHED:
            return (Registered.PUBLISHED if _same_bytes(row, c) else Registered.CONFLICT,
                    _product(row))
        if (_same_file(row, c) and row["status"] != Status.REJECTED and
                row["checksum"] is not None and
                (row["checksum"] == c.checksum or not checksum_known(c.checksum))):
            # A description without a digest leaves the one the row has.
            return Registered.UNCHANGED, _product(row)
        # New content, or a rejected file that was rewritten: it waits again with a fresh
        # attempt budget. A legacy row described for the first time keeps its status and
        # attempts (a `failed` one still waits for an operator). Earlier failures stay in
        # publish_failures.
        values.update(fresh=row["checksum"] is not None and not _same_bytes(row, c),
                      row=row["id"])
        row = self._one(
            f"UPDATE data_registry SET status = CASE WHEN status = {_FAILED}"
            f" AND NOT CAST(:fresh AS BOOLEAN) THEN {_FAILED} ELSE {_STAGING} END,"
            " size_bytes = :size, checksum = :checksum,"
            " metadata_json = CASE WHEN metadata_json IS NULL OR header_json IS NOT NULL"
            "   THEN :header ELSE metadata_json END, header_json = :header,"
            " stage_path_bytes = :raw, stage_dev = :dev, stage_ino = :ino,"
            " stage_mtime_ns = :mtime, stage_ctime_ns = :ctime, next_attempt_at = NULL,"
            f" staged_at = CASE WHEN CAST(:fresh AS BOOLEAN) THEN {at} ELSE staged_at END,"
            " publish_attempts = CASE WHEN CAST(:fresh AS BOOLEAN)"
            f"   OR status = {_REJECTED} THEN 0 ELSE publish_attempts END,"
            f" publish_error = CASE WHEN status = {_REJECTED} THEN NULL ELSE publish_error END"
            f"{', node = :node' if self.dialect.nodes else ''},"
            f" updated_at = {at} WHERE id = :row RETURNING *", values)
        assert row is not None
        return Registered.UPDATED, _product(row)

    def reject(self, data_id: str, data_type: str, base_path: str, stage_path: str,
               stage_path_bytes: bytes, reason: str, identity: Identity | None,
               error_max_chars: int, now: float | None = None
               ) -> tuple[Rejection, Product | None]:
        """Record bad input with the reason; never touches a published or publishing row,
        nor another node's."""
        reason = truncate(reason, error_max_chars)
        ident = identity or Identity(None, None, None, None, None)  # type: ignore[arg-type]
        at = self.dialect.at
        values = self._args(type=data_type, id=data_id, base=base_path, path=stage_path,
                            now=self._now(now), reason=reason, raw=stage_path_bytes,
                            size=ident.size, dev=ident.dev, ino=ident.ino,
                            mtime=ident.mtime_ns, ctime=ident.ctime_ns)
        with self.write():
            row, _ = self._find(data_id, stage_path)
            if row is None:
                row = self._one(
                    "INSERT INTO data_registry (data_type, data_id, base_path, status,"
                    " stage_path, created_at, staged_at, auto_publish_enabled,"
                    " publish_attempts, publish_error, stage_path_bytes, size_bytes, stage_dev,"
                    f" stage_ino, stage_mtime_ns, stage_ctime_ns, updated_at{self._node_col})"
                    f" VALUES (:type, :id, :base, {_REJECTED}, :path, {at}, {at}, 1, 0,"
                    " :reason, :raw, :size, :dev, :ino, :mtime, :ctime,"
                    f" {at}{self._node_val}){self._if_free} RETURNING *", values)
                if row is None:  # another node's row took this data_id meanwhile
                    return Rejection.SKIPPED, self.get(data_id)
                return Rejection.NEW, _product(row)
            if not may(Move.REJECT, row["status"]) or row["stage_path"] != stage_path or \
                    row["data_type"] != data_type or not self._ours(row):
                return Rejection.SKIPPED, _product(row)
            if (row["status"] == Status.REJECTED and row["publish_error"] == reason
                    and row["stage_ino"] == ident.ino
                    and row["stage_mtime_ns"] == ident.mtime_ns):
                return Rejection.UNCHANGED, _product(row)
            row = self._one(
                f"UPDATE data_registry SET status = {sql(to(Move.REJECT))},"
                " publish_error = :reason, checksum = NULL, size_bytes = :size,"
                " stage_dev = :dev, stage_ino = :ino, stage_mtime_ns = :mtime,"
                " stage_ctime_ns = :ctime, next_attempt_at = NULL"
                f"{', node = :node' if self.dialect.nodes else ''},"
                f" updated_at = {at} WHERE id = :row RETURNING *", {**values, "row": row["id"]})
            assert row is not None
        return Rejection.UPDATED, _product(row)

    # --- claims and publishes -------------------------------------------------------------

    def _due(self) -> str:
        """`picked (id, n)`: the rows a claim takes, in order: asked-for rows first, then
        the rest in the order they became due, `:limit` of them, the first always and the
        others while the batch stays within `:max_bytes`. The QA gate holds back automatic
        publishing only; an operator's request passes it (publish --override-qa)."""
        d = self.dialect
        halves = []
        for part, index, where in ((0, "data_registry_due_requested", DUE_REQUESTED),
                                   (1, "data_registry_due_auto",
                                    f"{DUE_AUTO} AND {self._qa_hold} IS NULL")):
            halves.append(
                f"due{part} AS (SELECT id, COALESCE(size_bytes, 0) AS size, {part} AS part,"
                f" COALESCE(next_attempt_at, 0) AS due, staged_at FROM data_registry"
                f"{d.index(index)} WHERE {where}{d.mine()}"
                f" AND COALESCE(next_attempt_at, 0) <= {d.at}"
                f" ORDER BY {DUE_ORDER} LIMIT :limit{d.skip_locked})")
        return (f"WITH {', '.join(halves)},"
                " listed AS (SELECT * FROM due0 UNION ALL"
                " SELECT * FROM due1 WHERE id NOT IN (SELECT id FROM due0)),"
                " ranked AS (SELECT id, row_number() OVER w AS n, SUM(size) OVER w AS total"
                " FROM listed WINDOW w AS (ORDER BY part, due, staged_at, id)),"
                " picked AS (SELECT id, n FROM ranked WHERE n <= :limit AND (n = 1"
                " OR CAST(:max_bytes AS BIGINT) IS NULL OR total <= :max_bytes))")

    def claim(self, owner: str, lease_seconds: float, limit: int = 1, now: float | None = None,
              data_id: str | None = None, max_bytes: int | None = None) -> list[Product]:
        """Move this node's due rows to `publishing` under a lease held by `owner` (on a
        server: each with a new claim token, rows another transaction holds skipped).

        With data_id (a manual publish), that row is claimed whether due, held or failed,
        as long as nobody holds a live lease on it. `max_bytes` stops a batch once its rows
        add up to that size (the first row is always taken). The lease ends
        `lease_seconds` after the clock leases are measured by."""
        d = self.dialect
        values = self._args(now=self._now(now), limit=limit, owner=owner, lease=lease_seconds,
                            id=data_id, max_bytes=max_bytes)
        picked = self._due() if data_id is None else (
            "WITH picked AS (SELECT id, 1 AS n FROM data_registry WHERE data_id = :id"
            f"{d.mine()} AND {sql_in(Move.CLAIM_ASKED)} AND checksum IS NOT NULL"
            f"{d.skip_locked})")
        update = (f"UPDATE data_registry SET status = {sql(to(Move.CLAIM))},"
                  f" lease_owner = :owner,"
                  f" lease_expires_at = {d.lease_clock} + CAST(:lease AS DOUBLE PRECISION),"
                  " publish_target = NULL, publish_temp = NULL,"
                  f" publish_step = {sql(Step.CLAIMED)}{d.claim_sets}, updated_at = {d.at}")
        if d.nodes:  # one statement, one round trip
            rows = self._rows(f"{picked} {update} FROM picked WHERE data_registry.id = picked.id"
                              " RETURNING data_registry.*, picked.n AS claim_rank", values)
            rows.sort(key=lambda r: int(r.pop("claim_rank")))
            return [_product(r) for r in rows]
        with self.write():
            ids = [r["id"] for r in self._rows(f"{picked} SELECT id FROM picked ORDER BY n",
                                               values)]
            if not ids:
                return []
            by_id = {r["id"]: r for r in self._rows(
                f"{update} WHERE id IN {self._in('i', ids, values)} RETURNING *", values)}
        return [_product(by_id[i]) for i in ids]

    def renew_lease(self, data_id: str, owner: str, lease_seconds: float,
                    now: float | None = None, token: str | None = None) -> bool:
        """The lease again `lease_seconds` from now, while the claim holds."""
        d = self.dialect
        return self._changed(
            f"UPDATE data_registry SET lease_expires_at = {d.lease_clock}"
            f" + CAST(:lease AS DOUBLE PRECISION) WHERE data_id = :data_id AND {d.fence}",
            {"lease": lease_seconds, "data_id": data_id, "owner": owner, "token": token,
             "now": self._time(now) if not d.nodes else None}) > 0

    def set_publish_plan(self, owner: str, data_id: str, target: str, temp: str | None,
                         sidecars: Sequence[str] = (), token: str | None = None) -> bool:
        """Record the final name, the temporary name and the sidecars' final names a publish
        is about to write (reconciliation, and the next attempt after a crash, read them);
        False when `owner` no longer holds the claim."""
        return self._changed(
            "UPDATE data_registry SET publish_target = :target, publish_temp = :temp,"
            f" publish_step = {sql(Step.PLANNED)}, sidecars_json = :sidecars"
            f" WHERE data_id = :data_id AND {self.dialect.fence}",
            {"target": target, "temp": temp, "sidecars": json.dumps(list(sidecars)),
             "data_id": data_id, "owner": owner, "token": token}) > 0

    def set_publish_plans(self, owner: str, plans: Sequence[Planned]) -> set[str]:
        """set_publish_plan of each plan, in one transaction; the data_ids whose claim held
        (a backend on a server records them in one statement)."""
        with self.write():
            return {p.data_id for p in plans if self.set_publish_plan(
                owner, p.data_id, p.target, p.temp, p.sidecars, token=p.token)}

    def record_checksum(self, data_id: str, owner: str, checksum: str,
                        fits_checksums: str | None, now: float | None = None,
                        token: str | None = None) -> bool:
        """The digest the publish's copy computed for a row registered without one, and
        how its FITS checksums came out, recorded before the product can reach its final
        name. False when `owner` no longer holds the claim."""
        d = self.dialect
        return self._changed(
            "UPDATE data_registry SET checksum = :checksum,"
            " metadata_json = CASE WHEN CAST(:fits AS TEXT) IS NOT NULL"
            "   AND metadata_json = header_json"
            f"   THEN {d.json_set('metadata_json', 'fits_checksums', 'fits')}"
            "   ELSE metadata_json END,"
            " header_json = CASE WHEN CAST(:fits AS TEXT) IS NOT NULL AND header_json IS NOT NULL"
            f"   THEN {d.json_set('header_json', 'fits_checksums', 'fits')} ELSE header_json END,"
            f" updated_at = {d.at} WHERE data_id = :data_id AND {d.fence}",
            {"checksum": checksum, "fits": fits_checksums, "now": self._now(now),
             "data_id": data_id, "owner": owner, "token": token}) > 0

    def reject_claimed(self, data_id: str, owner: str, reason: str, error_max_chars: int,
                       now: float | None = None, host: str | None = None,
                       pid: int | None = None, token: str | None = None) -> bool:
        """A claimed product the publish found is not publishable (a FITS checksum that
        fails in the copy's read): `rejected` with the reason, like a rejection at
        registration, the attempt kept in the history. False when not `owner`'s claim."""
        d = self.dialect
        text = truncate(reason, error_max_chars)
        with self.write():
            row = self._one(
                f"UPDATE data_registry SET status = {sql(to(Move.REJECT_CLAIMED))},"
                " publish_error = :text, publish_attempts = COALESCE(publish_attempts, 0) + 1,"
                f" checksum = NULL, next_attempt_at = NULL, {d.claim_cleared},"
                f" publish_requested_at = NULL, updated_at = {d.at}"
                f" WHERE data_id = :data_id AND {d.fence} RETURNING publish_attempts, updated_at",
                {"data_id": data_id, "owner": owner, "token": token, "text": text,
                 "now": self._now(now)})
            if row is None:
                return False
            self._rows(_FAILURE, self._failure(data_id, row["publish_attempts"],
                                               FailureKind.VERIFY_MISMATCH, text,
                                               row["updated_at"], host, pid))
        return True

    def _published_sets(self, p: str = ":") -> str:
        """What recording a publish sets, from `p`path, `p`sidecars and `p`mode (its
        parameters, or the rows of a server's batch)."""
        d = self.dialect
        return (f"status = {sql(to(Move.PUBLISH))}, published_path = {p}path,"
                f" published_at = {d.at}, sidecars_json = {p}sidecars, publish_mode = CASE"
                f" WHEN publish_requested_at IS NOT NULL THEN 'manual' ELSE {p}mode END,"
                f" publish_requested_at = NULL, {d.claim_cleared}, next_attempt_at = NULL,"
                " publish_error = NULL, publish_attempts = 0,"
                " finalization_status = COALESCE(finalization_status, 'pending'),"
                f" updated_at = {d.at}")

    def mark_published(self, item: Published, owner: str | None, now: float | None = None,
                       token: str | None = None) -> bool:
        """Durably record a publish, its publish_log record and its outbox event; with owner
        None the lease is not checked (reconciliation). False when the row's claim is no
        longer `owner`'s (it is left as it is).

        The legacy columns then read as the legacy code left them after a success
        (publish_attempts 0, publish_error NULL): legacy readers take a set publish_error or
        a count for a failing product; publish_failures keeps every attempt."""
        values = {"path": item.published_path, "now": self._now(now),
                  "sidecars": json.dumps(list(item.sidecars)), "mode": item.publish_mode,
                  "data_id": item.data_id, "owner": owner, "token": token}
        with self.write():
            row = self._one(
                f"UPDATE data_registry SET {self._published_sets()} WHERE data_id = :data_id"
                f" AND {sql_in(Move.PUBLISH)} AND {self._fenced} RETURNING {EVENT_COLUMNS}",
                values)
            if row is None:
                return False
            self._point_record("data_id", item.data_id, item.published_path)
            self._exec(_LOG_PUBLISH.format(node=self._node_col), values)
            self._supersede(item.data_id, item.supersedes)
            self._emit_published(row, item.supersedes, self._now(now))
        return True

    def _supersede(self, data_id: str, supersedes: str | None) -> None:
        if supersedes:
            self._exec("INSERT INTO data_relationships (parent_data_id, child_data_id,"
                       " relationship_type) VALUES (:data_id, :supersedes, 'supersedes')"
                       " ON CONFLICT DO NOTHING", {"data_id": data_id, "supersedes": supersedes})

    def mark_published_many(self, items: Sequence[tuple[Published, str | None]],
                            owner: str | None, now: float | None = None) -> set[str]:
        """mark_published of each (item, its claim token), in one durable commit; the
        data_ids recorded (a backend on a server records them in a few statements)."""
        with self.write():
            return {item.data_id for item, token in items
                    if self.mark_published(item, owner, now, token=token)}

    def confirm_published(self, data_id: str, published_path: str, size_bytes: int,
                          checksum: str, metadata: dict[str, Any],
                          now: float | None = None) -> bool:
        """A publish an older program finished on disk but never recorded: the row becomes
        `published` with the copy's description; legacy values already set are kept."""
        d = self.dialect
        values = {"path": published_path, "now": self._now(now), "size": size_bytes,
                  "checksum": checksum, "meta": json.dumps(metadata, sort_keys=True),
                  "data_id": data_id}
        with self.write():
            row = self._one(
                f"UPDATE data_registry SET status = {sql(to(Move.PUBLISH))},"
                f" published_path = :path, published_at = COALESCE(published_at, {d.at}),"
                " size_bytes = :size, checksum = :checksum,"
                " metadata_json = COALESCE(metadata_json, :meta), header_json = :meta,"
                f" {d.claim_cleared}, next_attempt_at = NULL, publish_error = NULL,"
                " publish_attempts = 0, publish_mode = COALESCE(publish_mode, 'auto'),"
                f" updated_at = {d.at} WHERE data_id = :data_id AND {sql_in(Move.PUBLISH)}"
                f" RETURNING {EVENT_COLUMNS}", values)
            if row is None:
                return False
            self._point_record("data_id", data_id, published_path)
            self._rows(_LOG_PUBLISH.format(node=self._node_col), values)
            # Never recorded as published before, so no consumer was ever told.
            self._emit_published(row, None, self._now(now))
        return True

    def publish_records(self, data_id: str, stage_path: str) -> list[PublishRecord]:
        """This program's publishes of a product (by its id or its staged path on this
        node), newest first."""
        mine = " AND (node IS NULL OR node = :node)" if self.dialect.nodes else ""
        return [PublishRecord(**r) for r in self._rows(
            f"SELECT {_LOGGED} FROM publish_log"
            f" WHERE data_id = :id OR (stage_path = :path{mine}) ORDER BY id DESC",
            self._args(id=data_id, path=stage_path))]

    def restore_published(self, row_id: int, record: PublishRecord,
                          now: float | None = None) -> bool:
        """A waiting row whose product is in the archive (its copy verified against
        `record`) is `published` again, described from the record. Values the legacy writer
        set are kept; what it reset is filled in."""
        d = self.dialect
        with self.write():
            if self._changed(
                    f"UPDATE data_registry SET status = {sql(to(Move.RESTORE))},"
                    " published_path = :path, published_at = COALESCE(published_at, :at),"
                    " size_bytes = :size, checksum = :checksum, header_json = :header,"
                    " metadata_json = COALESCE(metadata_json, :header),"
                    " sidecars_json = :sidecars, publish_mode = COALESCE(publish_mode, :mode),"
                    " publish_error = NULL, publish_attempts = 0, next_attempt_at = NULL,"
                    f" {d.claim_cleared}, publish_requested_at = NULL, updated_at = {d.at}"
                    f" WHERE id = :row AND {sql_in(Move.RESTORE)}",
                    {"path": record.published_path, "at": record.published_at,
                     "size": record.size_bytes, "checksum": record.checksum,
                     "header": record.header_json, "sidecars": record.sidecars_json,
                     "mode": record.publish_mode or "auto", "now": self._now(now),
                     "row": row_id}) == 0:
                return False
            self._point_record("id", row_id, record.published_path)
        return True

    def record_failure(self, data_id: str, owner: str | None, kind: str, error: str,
                       max_attempts: int, backoff_initial: float, backoff_max: float,
                       error_max_chars: int, now: float | None = None,
                       host: str | None = None, pid: int | None = None,
                       rng: random.Random | None = None, token: str | None = None
                       ) -> FailureOutcome | None:
        """Count a failed attempt (unless its kind says nothing about the product), keep it in
        the history, and schedule the next try; `failed` once attempts reach max_attempts.
        The write is fenced by the claim (`owner`, `token`) unless owner is None.

        Returns None when the row is not (or no longer) ours to change."""
        if kind not in FAILURE_KINDS:
            raise ValueError(f"unknown failure kind {kind!r}")
        kind = FailureKind(kind)
        text = truncate(error, error_max_chars)
        counted = kind.counted
        d = self.dialect
        with self.write():
            row = self._one(
                f"SELECT id, publish_attempts, {d.at} AS now FROM data_registry"
                f" WHERE data_id = :data_id AND {sql_in(Move.FAIL)} AND {self._fenced}"
                f"{d.for_update}", {"data_id": data_id, "owner": owner, "token": token,
                                    "now": self._now(now)})
            if row is None:
                return None
            when = float(row["now"])
            before = int(row["publish_attempts"] or 0)
            attempts = before + (1 if counted else 0)
            next_at: float | None = None
            if counted and attempts >= max_attempts:
                status = Status.FAILED
            else:  # due again: at once when not counted, else after its backoff
                status = to(Move.FAIL)
                if counted:
                    next_at = when + backoff_delay(attempts, backoff_initial, backoff_max,
                                                   rng=rng)
            self._exec(
                "UPDATE data_registry SET status = :status, publish_attempts = :attempts,"
                f" publish_error = :text, next_attempt_at = :next, {d.claim_cleared},"
                " publish_requested_at = NULL,"
                " checksum = CASE WHEN CAST(:drop AS BOOLEAN) THEN NULL ELSE checksum END,"
                " updated_at = :at WHERE id = :row",
                {"status": status.value, "attempts": attempts, "text": text, "next": next_at,
                 "drop": kind is FailureKind.SOURCE_CHANGED, "at": when, "row": row["id"]})
            self._rows(_FAILURE, self._failure(data_id, attempts if counted else before + 1,
                                               kind, text, when, host, pid))
        return FailureOutcome(attempts, status, next_at, counted, text)

    def requeue(self, data_id: str, owner: str | None, now: float | None = None,
                token: str | None = None, due_at: float | None = None) -> bool:
        """Give a claimed row back, due now (or at `due_at`), without counting an attempt
        (clean shutdown; no room for it yet)."""
        d = self.dialect
        return self._changed(
            f"UPDATE data_registry SET status = {sql(to(Move.REQUEUE))}, {d.claim_cleared},"
            f" next_attempt_at = CAST(:due_at AS DOUBLE PRECISION), updated_at = {d.at}"
            f" WHERE data_id = :data_id AND {sql_in(Move.REQUEUE)} AND {self._fenced}",
            {"now": self._now(now), "data_id": data_id, "owner": owner, "token": token,
             "due_at": due_at}) > 0

    def forget_missing(self, data_id: str, reason: str, error_max_chars: int,
                       now: float | None = None) -> bool:
        """A waiting product's file is gone from staging: it is rejected, with the reason.

        A `failed` one stays `failed` with its last error (an operator is already asked to
        look at it, and that text says why it failed); the new reason goes into its failure
        history, once. Returns whether anything was recorded."""
        d = self.dialect
        text = truncate(reason, error_max_chars)
        values = {"data_id": data_id, "now": self._now(now), "text": text}
        with self.write():
            row = self._one("SELECT id, status, publish_attempts FROM data_registry"
                            f" WHERE data_id = :data_id{d.for_update}", values)
            if row is None:
                return False
            values["row"] = row["id"]
            if row["status"] == Status.FAILED:
                last = self._one("SELECT kind, error FROM publish_failures"
                                 " WHERE data_id = :data_id ORDER BY at DESC, id DESC LIMIT 1",
                                 values)
                if last is not None and (last["kind"], last["error"]) == (
                        FailureKind.SOURCE_MISSING, text):
                    return False
                stamp = self._one(f"UPDATE data_registry SET checksum = NULL, updated_at = {d.at}"
                                  " WHERE id = :row RETURNING updated_at", values)
                assert stamp is not None
                self._rows(_FAILURE, self._failure(
                    data_id, int(row["publish_attempts"] or 0), FailureKind.SOURCE_MISSING,
                    text, stamp["updated_at"]))
                return True
            return self._changed(
                f"UPDATE data_registry SET status = {sql(to(Move.FORGET))},"
                f" publish_error = :text, checksum = NULL, updated_at = {d.at}"
                f" WHERE id = :row AND {sql_in(Move.FORGET)}", values) > 0

    def park_outside_root(self, stage_root: str, data_types: Sequence[str], reason: str,
                          error_max_chars: int, now: float | None = None) -> list[str]:
        """This node's waiting rows of these types, described by this program, whose staged
        path is not under `stage_root` (the configured staging root changed since they
        were registered) become `failed`, with the reason, in the failure history too: an
        operator state, never a silent wait. Returns their data_ids."""
        if not data_types:
            return []
        d = self.dialect
        text = truncate(reason, error_max_chars)
        prefix = stage_root.rstrip("/") + "/"
        values = self._args(len=len(prefix), prefix=prefix, text=text, now=self._now(now))
        with self.write():
            rows = self._rows(
                f"UPDATE data_registry SET status = {sql(to(Move.PARK))}, publish_error = :text,"
                f" next_attempt_at = NULL, updated_at = {d.at}"
                f" WHERE {sql_in(Move.PARK)}{d.mine()}"
                f" AND data_type IN {self._in('t', data_types, values)}"
                " AND substr(stage_path, 1, :len) <> :prefix"
                # described by this program (a legacy row elsewhere is not its to change)
                " AND stage_ino IS NOT NULL RETURNING data_id, publish_attempts, updated_at",
                values)
            self._many(_FAILURE, [self._failure(
                r["data_id"], int(r["publish_attempts"] or 0), FailureKind.OTHER, text,
                r["updated_at"]) for r in rows])
        return [str(r["data_id"]) for r in rows]

    def retry(self, data_ids: Iterable[str] = (), all_failed: bool = False,
              now: float | None = None) -> list[str]:
        """Clear attempts and make products due again; rejected ones are examined afresh."""
        at = self.dialect.at
        changed = []
        with self.write():
            if all_failed:
                data_ids = [r["data_id"] for r in self._rows(
                    f"SELECT data_id FROM data_registry WHERE status = {_FAILED} ORDER BY id")]
            for data_id in data_ids:
                if self._changed(
                        "UPDATE data_registry SET publish_attempts = 0, next_attempt_at = NULL,"
                        f" checksum = CASE WHEN status = {_REJECTED} THEN NULL ELSE checksum"
                        f" END, status = {sql(to(Move.RETRY))}, updated_at = {at}"
                        f" WHERE data_id = :id AND {sql_in(Move.RETRY)}",
                        {"now": self._now(now), "id": data_id}):
                    changed.append(data_id)
        return changed

    def request_publish(self, data_id: str, now: float | None = None) -> bool:
        """Ask the running daemon to publish a product now, held or failed or not yet due."""
        at = self.dialect.at
        return self._changed(
            f"UPDATE data_registry SET publish_requested_at = {at}, next_attempt_at = NULL,"
            f" status = {sql(to(Move.REQUEST))}, updated_at = {at}"
            f" WHERE data_id = :id AND {sql_in(Move.REQUEST)}",
            {"now": self._now(now), "id": data_id}) > 0

    def set_hold(self, data_id: str, held: bool, now: float | None = None) -> bool:
        return self._changed(
            f"UPDATE data_registry SET auto_publish_enabled = :on, updated_at = {self.dialect.at}"
            " WHERE data_id = :id", {"on": 0 if held else 1, "now": self._now(now),
                                     "id": data_id}) > 0

    def mark_exhausted(self, max_attempts: int, now: float | None = None,
                       owns: Callable[[Product], bool] | None = None) -> list[str]:
        """Rows waiting with attempts already at the limit (legacy rows, a lowered limit)
        become `failed`, so they wait for an operator instead of retrying forever. With
        `owns`, only the rows it accepts (the others belong to other writers)."""
        d = self.dialect
        with self.write():
            rows = [r for r in self._products(
                f"SELECT * FROM data_registry WHERE {sql_in(Move.EXHAUST)}{d.mine()}"
                f" AND COALESCE(publish_attempts, 0) >= :max{d.for_update}",
                self._args(max=max_attempts)) if owns is None or owns(r)]
            if rows:
                values: Row = {"now": self._now(now)}
                self._rows(f"UPDATE data_registry SET status = {sql(to(Move.EXHAUST))},"
                           f" updated_at = {d.at} WHERE id IN"
                           f" {self._in('i', [r.id for r in rows], values)}"
                           f" AND {sql_in(Move.EXHAUST)}", values)
        return [r.data_id for r in rows]

    def add_sidecars(self, data_id: str, names: Sequence[str], now: float | None = None
                     ) -> bool:
        """A sidecar that arrived after its product was published now stands beside it."""
        with self.write():
            row = self._one("SELECT sidecars_json FROM data_registry WHERE data_id = :id"
                            f" AND status = {_PUBLISHED}{self.dialect.for_update}",
                            {"id": data_id})
            if row is None:
                return False
            have = list(sidecars_of(row["sidecars_json"]))
            values = {"merged": json.dumps(have + [n for n in names if n not in have]),
                      "now": self._now(now), "id": data_id}
            self._rows("UPDATE data_registry SET sidecars_json = :merged,"
                       f" updated_at = {self.dialect.at} WHERE data_id = :id", values)
            self._rows("UPDATE publish_log SET sidecars_json = :merged WHERE id = (SELECT"
                       " MAX(id) FROM publish_log WHERE data_id = :id)", values)
        return True

    # --- unclaimed files (this node's staging area) ---------------------------------------

    def replace_unclaimed(self, found: Sequence[tuple[str, bytes, str, float, int | None]],
                          now: float | None = None) -> None:
        """Make (path, path bytes, reason, changed_at, size) the whole list of unclaimed
        files, keeping when each was first seen."""
        mine = " WHERE node = :node" if self.dialect.nodes else ""
        with self.write():
            first = {r["path"]: (r["reason"], r["first_seen"]) for r in self._rows(
                f"SELECT path, reason, first_seen FROM unclaimed_files{mine}", self._args())}
            when = self._time(now)
            self._rows(f"DELETE FROM unclaimed_files{mine}", self._args())
            key = "node, path" if self.dialect.nodes else "path"
            self._many(
                f"INSERT INTO unclaimed_files (path, path_bytes, reason, first_seen,"
                f" changed_at, size_bytes{self._node_col}) VALUES (:path, :raw, :reason,"
                f" :first, :changed, :size{self._node_val}) ON CONFLICT ({key}) DO UPDATE SET"
                " path_bytes = excluded.path_bytes, reason = excluded.reason,"
                " first_seen = excluded.first_seen, changed_at = excluded.changed_at,"
                " size_bytes = excluded.size_bytes",
                [self._args(path=path, raw=raw, reason=reason, changed=changed_at, size=size,
                            first=seen[1] if (seen := first.get(path)) and seen[0] == reason
                            else when)
                 for path, raw, reason, changed_at, size in found])

    def unclaimed(self, changed_before: float | None = None,
                  limit: int | None = None) -> list[Unclaimed]:
        """This node's unclaimed files, oldest change first; with changed_before, only those
        unchanged since then."""
        args = self._args(before=changed_before)
        return [Unclaimed(**r) for r in self._rows(
            f"SELECT {columns(Unclaimed)} FROM unclaimed_files"
            " WHERE (CAST(:before AS DOUBLE PRECISION) IS NULL"
            f" OR changed_at <= :before){self.dialect.mine()} ORDER BY changed_at, path"
            f"{self._limit(limit, args)}", args)]

    # --- read queries for metrics, the status page and `status` ---------------------------

    def waiting(self, limit: int | None = None) -> list[Product]:
        """Products waiting to be published, longest-waiting first."""
        args: Row = {}
        return self._products(f"SELECT * FROM data_registry WHERE status = {_STAGING}"
                              f" ORDER BY staged_at, id{self._limit(limit, args)}", args)

    def oldest_unheld_waiting(self) -> Product | None:
        """The longest-waiting product the daemon is expected to publish (held ones wait on
        purpose, unless an operator asked for a publish)."""
        return self._first(
            f"SELECT * FROM data_registry WHERE status = {_STAGING} AND checksum IS NOT NULL"
            " AND (COALESCE(auto_publish_enabled, 1) = 1 OR publish_requested_at IS NOT NULL)"
            f" AND ({self._qa_hold} IS NULL OR publish_requested_at IS NOT NULL)"
            " ORDER BY staged_at, id LIMIT 1")

    def held(self, data_types: Sequence[str], limit: int | None = None
             ) -> list[tuple[Product, str]]:
        """Waiting products of these types that are not published automatically, with the
        reason: the QA gate's, or a hold (auto_publish_enabled = 0), oldest first. A manual
        publish that was asked for is not held."""
        if not data_types:
            return []
        args: Row = {}
        rows = self._rows(
            f"SELECT *, {self._qa_hold} AS qa_hold FROM data_registry"
            f" WHERE status = {_STAGING} AND data_type IN {self._in('t', data_types, args)}"
            " AND publish_requested_at IS NULL"
            f" AND (COALESCE(auto_publish_enabled, 1) = 0 OR {self._qa_hold} IS NOT NULL)"
            f" ORDER BY staged_at, id{self._limit(limit, args)}", args)
        return [(_product(r), r["qa_hold"] or HELD_BY_OPERATOR) for r in rows]

    def qa_holds(self, data_ids: Sequence[str]) -> dict[str, str]:
        """data_id -> the reason the QA gate holds it, for the rows it holds."""
        out: dict[str, str] = {}
        ids = list(data_ids)
        for start in range(0, len(ids), 500):
            args: Row = {}
            for r in self._rows(f"SELECT data_id, {self._qa_hold} AS reason FROM data_registry"
                                f" WHERE data_id IN {self._in('i', ids[start:start + 500], args)}",
                                args):
                if r["reason"] is not None:
                    out[r["data_id"]] = r["reason"]
        return out

    def recent_published(self, limit: int = 10) -> list[Product]:
        """The last publishes, newest first."""
        return self._products(
            f"SELECT * FROM data_registry WHERE status = {_PUBLISHED}"
            " AND published_at IS NOT NULL ORDER BY published_at DESC, id DESC LIMIT :limit",
            {"limit": limit})

    def by_status(self, status: str, limit: int | None = None) -> list[Product]:
        """Rows in one status, most recently changed first."""
        args: Row = {"status": status}
        return self._products(
            "SELECT * FROM data_registry WHERE status = :status"
            " ORDER BY COALESCE(updated_at, staged_at) DESC, id DESC"
            f"{self._limit(limit, args)}", args)

    # --- the outbox -----------------------------------------------------------------------
    # One event per publish, written in the transaction that makes the row `published`, so
    # a crash can lose neither without the other. Several nodes share one outbox; delivery
    # is one daemon's duty at a time (lead), which moves each sink's cursor in order.

    def _emit_published(self, row: Row, supersedes: str | None, now: float | None) -> None:
        """The outbox event of a row just made `published` (its EVENT_COLUMNS), in the
        caller's transaction: committed with the publish or not at all."""
        self._outbox_lock()
        payload = published_payload(row, supersedes, socket.gethostname(),
                                    self.node if self.dialect.nodes else None)
        self._exec(
            f"INSERT INTO outbox (event_id, type, data_id, payload_json, created_at"
            f"{self._node_col}) VALUES (:event_id, :type, :id, :payload, {self.dialect.at}"
            f"{self._node_val})",
            self._args(event_id=str(uuid.uuid4()), type=EVENT_PUBLISHED, id=row["data_id"],
                       now=now, payload=json.dumps(payload, sort_keys=True, default=str)))

    def _events(self, where: str, args: Row) -> list[Event]:
        return [event_of(r["id"], r["event_id"], r["type"], r["data_id"], r["payload_json"],
                         r["created_at"]) for r in self._rows(
            "SELECT id, event_id, type, data_id, payload_json, created_at FROM outbox"
            f" WHERE {where}", args)]

    def add_sinks(self, sinks: Sequence[str], now: float | None = None) -> list[str]:
        """Give each sink not seen before its cursor at the end of the outbox: a new
        consumer hears of the publishes from now on, not the archive's history. A sink seen
        before keeps its cursor. Returns the sinks added."""
        added = []
        with self.write():
            for sink in sinks:
                if self._rows(
                        "INSERT INTO outbox_sinks (sink, delivered_through, added_at) VALUES"
                        f" (:sink, (SELECT COALESCE(MAX(id), 0) FROM outbox), {self.dialect.at})"
                        " ON CONFLICT (sink) DO NOTHING RETURNING sink",
                        {"sink": sink, "now": self._now(now)}):
                    added.append(sink)
        return added

    def outbox_head(self, sink: str) -> Event | None:
        """The oldest event not yet done for this sink (None: nothing waits, or the sink
        is not registered)."""
        rows = self._events("id > (SELECT delivered_through FROM outbox_sinks"
                            " WHERE sink = :sink) ORDER BY id LIMIT 1", {"sink": sink})
        return rows[0] if rows else None

    def record_delivered(self, sink: str, seq: int, now: float | None = None) -> int:
        """The sink took event `seq` (its head): the cursor moves past it. Returns the
        attempts it took, 0 when the cursor was already past it (nothing changed)."""
        return self._finish(sink, seq, Delivery.DELIVERED, None, None, now)

    def record_delivery_failure(self, sink: str, seq: int, error: str, error_max_chars: int,
                                max_attempts: int = 0, now: float | None = None
                                ) -> tuple[int, bool]:
        """A failed attempt at the sink's head, counted; with max_attempts > 0 and that many
        failures the event is given up on for this sink (`dead`) and the next one becomes
        the head. Returns (attempts, dead)."""
        text = truncate(error, error_max_chars)
        with self.write():
            row = self._one("SELECT delivered_through, attempts FROM outbox_sinks"
                            f" WHERE sink = :sink{self.dialect.for_update}", {"sink": sink})
            if row is None or int(row["delivered_through"]) >= seq:
                return 0, False
            attempts = int(row["attempts"]) + 1
            if max_attempts and attempts >= max_attempts:
                self._finish(sink, seq, Delivery.DEAD, attempts, text, now)
                return attempts, True
            self._rows("UPDATE outbox_sinks SET attempts = :n, last_error = :text,"
                       f" last_attempt_at = {self.dialect.at} WHERE sink = :sink",
                       {"n": attempts, "text": text, "now": self._now(now), "sink": sink})
        return attempts, False

    def _finish(self, sink: str, seq: int, outcome: str, attempts: int | None,
                error: str | None, now: float | None) -> int:
        """The sink's head `seq` is done (delivered or dead): its cursor moves past it, its
        failures go with it, and how it ended is kept. 0 when the cursor was past it."""
        with self.write():
            row = self._one("SELECT delivered_through, attempts FROM outbox_sinks"
                            f" WHERE sink = :sink{self.dialect.for_update}", {"sink": sink})
            if row is None or int(row["delivered_through"]) >= seq:
                return 0
            if attempts is None:
                attempts = int(row["attempts"]) + 1
            values = {"seq": seq, "sink": sink, "now": self._now(now), "outcome": str(outcome),
                      "attempts": attempts, "error": error}
            at = self.dialect.at
            self._rows("UPDATE outbox_sinks SET delivered_through = :seq, attempts = 0,"
                       f" last_error = NULL, last_attempt_at = {at} WHERE sink = :sink", values)
            self._rows("INSERT INTO outbox_deliveries (event, sink, outcome, attempts, at,"
                       f" error) VALUES (:seq, :sink, :outcome, :attempts, {at}, :error)"
                       " ON CONFLICT (event, sink) DO UPDATE SET outcome = excluded.outcome,"
                       " attempts = excluded.attempts, at = excluded.at, error = excluded.error",
                       values)
        return attempts

    def redeliver_dead(self, sinks: Sequence[str]) -> dict[str, int]:
        """Each sink's cursor goes back to just before the oldest event it gave up on:
        that event and every one after it are delivered again, in order. Returns sink ->
        events queued again."""
        out: dict[str, int] = {}
        dead = sql(Delivery.DEAD)
        with self.write():
            for sink in sinks:
                first = self._scalar("SELECT MIN(event) AS first FROM outbox_deliveries"
                                     f" WHERE sink = :sink AND outcome = {dead}", {"sink": sink})
                if first is None:
                    continue
                values = {"sink": sink, "first": int(first)}
                self._rows("DELETE FROM outbox_deliveries WHERE sink = :sink"
                           " AND event >= :first", values)
                self._rows("UPDATE outbox_sinks SET delivered_through = :first - 1,"
                           " attempts = 0, last_error = NULL WHERE sink = :sink", values)
                out[sink] = int(self._scalar("SELECT COUNT(*) AS n FROM outbox"
                                             " WHERE id >= :first", values))
        return out

    def sink_states(self, sinks: Sequence[str]) -> list[SinkState]:
        """Backlog and last failure of each sink; a sink the daemon has not registered yet
        has no backlog (it starts at the end of the outbox)."""
        out = []
        for sink in sinks:
            row = self._one("SELECT delivered_through, attempts, last_error, last_attempt_at"
                            " FROM outbox_sinks WHERE sink = :sink", {"sink": sink})
            if row is None:
                out.append(SinkState(sink, False, 0, 0, None, 0, None, None, 0))
                continue
            through = int(row["delivered_through"])
            backlog = self._one("SELECT COUNT(*) AS n, MIN(created_at) AS oldest,"
                                " MIN(id) AS head FROM outbox WHERE id > :t", {"t": through})
            assert backlog is not None  # an aggregate's one row
            dead = int(self._scalar("SELECT COUNT(*) AS n FROM outbox_deliveries WHERE"
                                    f" sink = :sink AND outcome = {sql(Delivery.DEAD)}",
                                    {"sink": sink}))
            out.append(SinkState(sink, True, through, int(backlog["n"]), backlog["oldest"],
                                 int(row["attempts"]), row["last_error"],
                                 row["last_attempt_at"], dead,
                                 None if backlog["head"] is None else int(backlog["head"])))
        return out

    def events(self, sinks: Sequence[str], everything: bool = False, after: int = 0,
               limit: int | None = None) -> list[tuple[Event, dict[str, dict[str, Any]]]]:
        """Events oldest first (every node's), each with its state for every sink:
        {"state": "pending" | "delivered" | "dead", "attempts", "at", "error"}. Without
        `everything`, only those still pending for some sink or given up on by one."""
        cursors = {s.sink: s for s in self.sink_states(sinks) if s.registered}
        low = min((s.delivered_through for s in cursors.values()), default=None)
        args: Row = {"after": after}
        where = "id > :after"
        if not everything:
            either = [] if low is None else [f"id > {int(low)}"]
            if cursors:
                sinks = self._in("s", list(cursors), args)
                either.append("id IN (SELECT event FROM outbox_deliveries WHERE outcome ="
                              f" {sql(Delivery.DEAD)} AND sink IN {sinks})")
            if not either:
                return []
            where += f" AND ({' OR '.join(either)})"
        events = self._events(f"{where} ORDER BY id{self._limit(limit, args)}", args)
        done: dict[tuple[int, str], dict[str, Any]] = {}
        if events:
            for r in self._rows("SELECT event, sink, outcome, attempts, at, error"
                                " FROM outbox_deliveries WHERE event BETWEEN :a AND :b",
                                {"a": events[0].seq, "b": events[-1].seq}):
                done[(int(r["event"]), r["sink"])] = {
                    "state": r["outcome"], "attempts": r["attempts"], "at": r["at"],
                    "error": r["error"]}
        return delivery_states(events, cursors, done, everything)

    def last_event_seq(self) -> int:
        return int(self._scalar("SELECT COALESCE(MAX(id), 0) AS n FROM outbox"))

    def events_for(self, data_id: str) -> list[Event]:
        return self._events("data_id = :id ORDER BY id", {"id": data_id})

    # --- the fixity audit (of the shared archive: every node's rows) ----------------------

    def published_after(self, after_id: int, limit: int, prefix: str | None = None
                        ) -> list[Product]:
        """Published rows with a published path, in id order after `after_id` (the audit's
        cursor); with prefix, only those whose published path starts with it."""
        return self._products(
            f"SELECT * FROM data_registry WHERE id > :after AND status = {_PUBLISHED}"
            " AND published_path IS NOT NULL AND (CAST(:prefix AS TEXT) IS NULL"
            " OR substr(published_path, 1, :len) = :prefix) ORDER BY id LIMIT :limit",
            {"after": after_id, "prefix": prefix, "len": len(prefix or ""), "limit": limit})

    def recorded_in(self, folder: str) -> Recorded:
        """What any row records in `folder` (display form, no trailing slash): published
        products of every status and row, the final names and sidecars of publishes in
        flight, and every publish this program logged. Range queries, in byte order, on
        the published_path indexes."""
        prefix, upper = folder_range(folder)
        column = "published_path" if self.dialect.name == "sqlite" else \
            '(published_path COLLATE "C")'
        found: list[tuple[str | None, str | None]] = []
        with self.read():
            for table in ("data_registry", "publish_log"):
                found += [(r["path"], r["sidecars_json"]) for r in self._rows(
                    f"SELECT published_path AS path, sidecars_json FROM {table}"
                    f" WHERE {column} >= :low AND {column} < :high",
                    {"low": prefix, "high": upper})]
            found += [(r["publish_target"], r["sidecars_json"]) for r in self._rows(
                "SELECT publish_target, sidecars_json FROM data_registry"
                f" WHERE status = {_PUBLISHING} AND publish_target IS NOT NULL")]
        return recorded_under(prefix, found)

    def is_recorded(self, path: str) -> bool:
        """Whether any row or logged publish names this published path."""
        return bool(self._scalar(
            "SELECT EXISTS (SELECT 1 FROM data_registry WHERE published_path = :p)"
            " OR EXISTS (SELECT 1 FROM publish_log WHERE published_path = :p)"
            f" OR EXISTS (SELECT 1 FROM data_registry WHERE status = {_PUBLISHING}"
            " AND publish_target = :p) AS there", {"p": path}))

    def observe_findings(self, findings: Sequence[Finding], now: float | None = None,
                         state: dict[str, Any] | None = None) -> list[Finding]:
        """Record what a slice of the audit found: a finding already open is seen again
        (last_seen), a new one is opened. Returns the new ones (to be logged once). `state`
        is saved in the same transaction (the audit's cursor)."""
        new: list[Finding] = []
        with self.write():
            when = self._time(now)
            for f in findings:
                values = {"when": when, "detail": f.detail, "id": f.data_id, "kind": f.kind,
                          "path": f.path}
                if self._changed("UPDATE audit_findings SET last_seen = :when,"
                                 " detail = :detail, data_id = COALESCE(:id, data_id)"
                                 " WHERE kind = :kind AND path = :path AND resolved_at IS NULL",
                                 values):
                    continue
                if self._rows("INSERT INTO audit_findings (kind, path, data_id, detail,"
                              " first_seen, last_seen) VALUES (:kind, :path, :id, :detail,"
                              " :when, :when) ON CONFLICT (kind, path) WHERE resolved_at IS NULL"
                              " DO NOTHING RETURNING id", values):
                    new.append(Finding(f.kind, f.path, f.detail, f.data_id, when, when))
            if state:
                self._save_audit_state(state)
        return new

    def resolve_findings(self, seen_before: float, now: float | None = None,
                         state: dict[str, Any] | None = None) -> list[Finding]:
        """At the end of a full pass: open findings that the pass (started at seen_before)
        did not see again are resolved. Returns them."""
        with self.write():
            rows = self._rows(
                f"UPDATE audit_findings SET resolved_at = {self.dialect.at}"
                f" WHERE resolved_at IS NULL AND last_seen < :before RETURNING {columns(Finding)}",
                {"now": self._now(now), "before": seen_before})
            if state:
                self._save_audit_state(state)
        return [Finding(**r) for r in rows]

    def findings(self, open_only: bool = True, limit: int | None = None) -> list[Finding]:
        args: Row = {}
        where = " WHERE resolved_at IS NULL" if open_only else ""
        return [Finding(**r) for r in self._rows(
            f"SELECT {columns(Finding)} FROM audit_findings{where} ORDER BY first_seen, id"
            f"{self._limit(limit, args)}", args)]

    def finding_counts(self) -> dict[str, int]:
        """Open findings by kind (every kind, zero included)."""
        counts: dict[str, int] = {str(k): 0 for k in FINDING_KINDS}
        for r in self._rows("SELECT kind, COUNT(*) AS n FROM audit_findings"
                            " WHERE resolved_at IS NULL GROUP BY kind"):
            counts[r["kind"]] = int(r["n"])
        return counts

    def audit_state(self) -> dict[str, Any]:
        """The background audit's progress: pass_started (a pass under way), cursor (the
        last row id it checked), last_pass_started, last_pass_finished, ..."""
        return {str(r["key"]): r["value"]
                for r in self._rows("SELECT key, value FROM audit_state")}

    def save_audit_state(self, state: dict[str, Any]) -> None:
        with self.write():
            self._save_audit_state(state)

    def _save_audit_state(self, state: dict[str, Any]) -> None:
        self._many("INSERT INTO audit_state (key, value) VALUES (:key, :value)"
                   " ON CONFLICT (key) DO UPDATE SET value = excluded.value",
                   [{"key": k, "value": self._state_value(v)} for k, v in state.items()])

    # --- rebuild from the archive, and staging hygiene -------------------------------------

    def insert_rebuilt(self, item: Rebuilt, now: float | None = None) -> RebuildOutcome:
        """A row (this node's) for an archived product that has none, described from its
        bytes on disk (publish_mode 'rebuilt'), and its publish_log record. See
        RebuildOutcome for why nothing may be written."""
        header = json.dumps(item.metadata, sort_keys=True)
        at = self.dialect.at
        with self.write():
            if self.is_recorded(item.published_path):
                return RebuildOutcome.RECORDED
            row = self._one(
                "INSERT INTO data_registry (data_type, data_id, base_path, status, stage_path,"
                " stage_path_bytes, published_path, created_at, staged_at, published_at,"
                " publish_mode, metadata_json, header_json, auto_publish_enabled,"
                " publish_attempts, size_bytes, checksum, sidecars_json, updated_at"
                f"{self._node_col}) VALUES (:type, :data_id, :base, {_PUBLISHED}, :path, :raw,"
                f" :published, {at}, :at, :at, 'rebuilt', :header, :header, 1, 0, :size,"
                f" :checksum, :sidecars, {at}{self._node_val}) ON CONFLICT DO NOTHING"
                " RETURNING id",
                self._args(type=item.data_type, data_id=item.data_id, base=item.base_path,
                           path=item.stage_path, raw=item.stage_path_bytes,
                           published=item.published_path, now=self._now(now),
                           at=item.published_at, header=header, size=item.size_bytes,
                           checksum=item.checksum, sidecars=json.dumps(list(item.sidecars))))
            if row is None:
                return RebuildOutcome.ID_TAKEN
            self._rows(_LOG_PUBLISH.format(node=self._node_col), {"data_id": item.data_id})
        return RebuildOutcome.CREATED

    def rejected_before(self, before: float) -> list[Product]:
        """This node's rejected rows whose record last changed before `before`, oldest
        first (the files are in its staging area)."""
        return self._products(
            f"SELECT * FROM data_registry WHERE status = {_REJECTED}{self.dialect.mine()}"
            " AND COALESCE(updated_at, staged_at) <= :before"
            " ORDER BY COALESCE(updated_at, staged_at), id", self._args(before=before))

    def record_quarantine(self, item: Quarantined, original_bytes: bytes) -> None:
        """A file moved into the quarantine folder; an unclaimed one leaves that list."""
        values = self._args(kind=item.kind, id=item.data_id, path=item.original_path,
                            raw=original_bytes, to=item.quarantine_path, reason=item.reason,
                            size=item.size_bytes, how=item.how, at=item.moved_at)
        with self.write():
            self._rows(
                "INSERT INTO quarantine_log (kind, data_id, original_path, original_path_bytes,"
                f" quarantine_path, reason, size_bytes, how, moved_at{self._node_col})"
                f" VALUES (:kind, :id, :path, :raw, :to, :reason, :size, :how, :at"
                f"{self._node_val})", values)
            self._rows(f"DELETE FROM unclaimed_files WHERE path = :path{self.dialect.mine()}",
                       values)

    def quarantined(self, limit: int | None = None) -> list[Quarantined]:
        """Every node's files moved into quarantine, newest first."""
        args: Row = {}
        return [Quarantined(**r) for r in self._rows(
            f"SELECT {columns(Quarantined)} FROM quarantine_log ORDER BY moved_at DESC, id DESC"
            f"{self._limit(limit, args)}", args)]

