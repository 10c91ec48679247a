"""What the registry records, whatever keeps it: the rows and outcomes the rest of the
program reads (dataclasses), the errors every backend raises, and the pure helpers the
backends share (no connection, no I/O)."""

from __future__ import annotations

import json
import os
import random
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, fields
from enum import StrEnum
from typing import Any, TypeGuard

from contimg_publisher import paths, redact
from contimg_publisher.config import QA_FIELDS
from contimg_publisher.qa import Condition
from contimg_publisher.registry.records import literal
from contimg_publisher.states import Delivery, FailureKind, FindingKind, Kind, Status

STATUSES = tuple(Status)
FAILURE_KINDS = tuple(FailureKind)

# The `checksum` of a row described without reading its data (a FITS file that is copied to
# another filesystem): "<algorithm>:pending" until the publish's copy, the file's one read,
# computes the digest and records it before the product can reach its final name. Not NULL,
# which means "not described" (nothing is claimed before it is described); never equal to a
# digest, whose hex has no such letters.
PENDING = "pending"


def pending_checksum(algorithm: str) -> str:
    return f"{algorithm}:{PENDING}"


def checksum_known(checksum: str | None) -> TypeGuard[str]:
    """Whether a row's checksum is a digest (not NULL, not pending)."""
    return checksum is not None and checksum.partition(":")[2] not in ("", PENDING)


class RegistryError(Exception):
    """The registry cannot be used; the message names the file and the reason."""


class RegistryUnavailable(RegistryError):
    """The registry cannot be written or read now (a full disk, a read-only, immutable or
    failing one, a write lock held past the busy timeout); what was being recorded was
    rolled back. A state to wait out and retry, never a crash."""


class RegistryBusy(RegistryUnavailable):
    """Another process held the write lock for longer than the busy timeout."""


class RegistryGone(RegistryError):
    """The file at the configured path is no longer the one this connection writes: deleted
    or replaced while in use. Every later commit would be lost, so nothing may be
    published or removed on its word."""


@dataclass(frozen=True)
class PublishRecord:
    """One publish as publish_log keeps it."""

    data_id: str
    data_type: str
    stage_path: str
    published_path: str
    size_bytes: int | None
    checksum: str | None
    sidecars_json: str | None
    header_json: str | None
    publish_mode: str | None
    published_at: float


def columns(cls: type[Any]) -> str:
    """The SELECT list of rows read as `cls(**row)`: its fields, in order."""
    return ", ".join(f.name for f in fields(cls))


class Registered(StrEnum):
    """What `register` did with a finished product."""

    NEW = "new"
    UPDATED = "updated"      # content changed: waits again
    UNCHANGED = "unchanged"
    BUSY = "busy"            # a publish holds it
    PUBLISHED = "published"  # the same content was already published from this path
    CONFLICT = "conflict"    # the data_id belongs to another path or other content
    FOREIGN = "foreign"      # another writer registered this path as another type


class Rejection(StrEnum):
    """What `reject` did with bad input."""

    NEW = "new"
    UPDATED = "updated"
    UNCHANGED = "unchanged"
    SKIPPED = "skipped"      # a published or publishing row, or another node's: untouched


class RebuildOutcome(StrEnum):
    """What `insert_rebuilt` did for an archived product."""

    CREATED = "created"
    RECORDED = "recorded"    # some row names the path by now: nothing written
    ID_TAKEN = "id_taken"    # the data_id belongs to another row, which is never changed


def qa_hold_sql(conditions: Sequence[Condition], quote: str = "quote",
                record_whens: Sequence[str] = ()) -> str:
    """An SQL expression over a data_registry row: NULL when the QA gate lets it be
    published automatically, else the reason it is held (qa.py says which values hold).
    `record_whens`, the branches of the products' own records (records.gate_whens), come
    after the explicit failures of the legacy columns and before what they require."""
    whens: list[str] = []
    for c in sorted(conditions, key=lambda c: c.required):
        if c.required and record_whens:
            whens += record_whens
            record_whens = ()
        if c.column not in QA_FIELDS:
            raise ValueError(f"QA gate: {c.column!r} is not a QA column ({', '.join(QA_FIELDS)})")
        values = ", ".join(literal(v) for v in c.values)
        if c.required:
            wanted = values if len(c.values) == 1 else f"one of {values}"
            test = f"{c.column} IS NULL OR {c.column} NOT IN ({values})"
            reason = (f"{literal(f'QA gate: waits for {c.column} {wanted} (now ')}"
                      f" || {quote}({c.column}) || ')'")
        else:
            test = f"{c.column} IN ({values})"
            reason = f"{literal(f'QA gate: {c.column} is ')} || {quote}({c.column})"
        whens.append(f"WHEN data_type = {literal(c.data_type)} AND ({test}) THEN {reason}")
    whens += record_whens
    return f"(CASE {' '.join(whens)} END)" if whens else "NULL"


@dataclass(frozen=True)
class Unclaimed:
    """A file in a product folder of the staging area that no product owns: a sidecar whose
    product never came, or a name no rule matches. Listed, never deleted."""

    path: str
    path_bytes: bytes
    reason: str
    first_seen: float
    changed_at: float
    size_bytes: int | None

    def to_json(self, now: float) -> dict[str, Any]:
        return {"path": self.path, "reason": self.reason, "size_bytes": self.size_bytes,
                "first_seen": self.first_seen, "changed_at": self.changed_at,
                "age_seconds": round(max(0.0, now - self.changed_at), 3)}


@dataclass(frozen=True)
class Identity:
    """What a staged file was when it was described; a publish checks it again with fstat."""

    dev: int
    ino: int
    size: int
    mtime_ns: int
    ctime_ns: int

    @classmethod
    def of(cls, st: os.stat_result) -> Identity:
        return cls(st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)

    def same(self, other: Identity, kind: str = Kind.FILE) -> bool:
        """Whether `other` is this file unchanged (the same inode, size and mtime), or for a
        folder product the same folder (its files are compared by their checksums)."""
        if kind == Kind.DIRECTORY:
            return (self.dev, self.ino) == (other.dev, other.ino)
        return (self.dev, self.ino, self.size, self.mtime_ns) == (
            other.dev, other.ino, other.size, other.mtime_ns)


@dataclass(frozen=True)
class Candidate:
    """A described, finished product ready to be registered."""

    data_id: str
    data_type: str
    base_path: str
    stage_path: str             # display form
    stage_path_bytes: bytes     # exact bytes
    identity: Identity
    checksum: str
    metadata: dict[str, Any]


@dataclass(frozen=True)
class Product:
    """One row of data_registry, with the fields the daemon uses."""

    id: int
    data_id: str
    data_type: str
    status: str
    base_path: str
    stage_path: str
    stage_path_bytes: bytes | None
    published_path: str | None
    created_at: float
    staged_at: float
    published_at: float | None
    publish_mode: str | None
    metadata: dict[str, Any]
    auto_publish_enabled: bool
    publish_attempts: int
    publish_error: str | None
    next_attempt_at: float | None
    lease_owner: str | None
    lease_expires_at: float | None
    size_bytes: int | None
    checksum: str | None
    identity: Identity | None
    publish_target: str | None
    publish_temp: str | None
    publish_step: str | None
    sidecars: list[str]
    publish_requested_at: float | None = None
    # The claim this row is held under (a backend that fences writes after a claim sets it
    # at the claim; they name it), and the node whose staging area holds the product.
    claim_token: str | None = None
    node: str | None = None

    @property
    def stage_bytes(self) -> bytes:
        return self.stage_path_bytes or os.fsencode(self.stage_path)

    @property
    def checksum_pending(self) -> bool:
        """Described, with its digest still to be computed by the publish's copy."""
        return self.checksum is not None and not checksum_known(self.checksum)

    def to_json(self) -> dict[str, Any]:
        """PRODUCT_JSON's fields; the checksum only once it is a digest."""
        shown = {"checksum": self.checksum if checksum_known(self.checksum) else None,
                 "held": not self.auto_publish_enabled}
        return {k: shown[k] if k in shown else getattr(self, k) for k in PRODUCT_JSON}


# A product's fields as its JSON gives them, in this order (Product.to_json).
PRODUCT_JSON = (
    "data_id", "data_type", "status", "stage_path", "published_path", "publish_attempts",
    "publish_error", "size_bytes", "checksum", "checksum_pending", "metadata", "held",
    "publish_mode", "created_at", "staged_at", "published_at", "next_attempt_at",
    "lease_owner", "lease_expires_at", "publish_step", "sidecars")


@dataclass(frozen=True)
class Failure:
    data_id: str
    attempt: int
    kind: str
    error: str
    at: float
    host: str
    pid: int

    def to_json(self) -> dict[str, Any]:
        return dict(self.__dict__)


@dataclass(frozen=True)
class FailureOutcome:
    """What recording a failure did, so the caller can log it."""

    attempts: int
    status: Status
    next_attempt_at: float | None
    counted: bool
    error: str

    @property
    def exhausted(self) -> bool:
        return self.status is Status.FAILED


@dataclass(frozen=True)
class Published:
    """One row's publish, as mark_published records it."""

    data_id: str
    published_path: str
    publish_mode: str
    sidecars: tuple[str, ...] = ()
    supersedes: str | None = None


@dataclass(frozen=True)
class Planned:
    """One claimed row's publish plan, as set_publish_plan records it (with its claim)."""

    data_id: str
    target: str
    temp: str | None
    sidecars: tuple[str, ...] = ()
    token: str | None = None


# A daemon renews its heartbeat this often; one not renewed for STALE_AFTER_BEATS of these
# is flagged: its daemon stopped without saying so (killed, its host down or cut off).
HEARTBEAT_SECONDS = 10.0
STALE_AFTER_BEATS = 3


@dataclass(frozen=True)
class Heartbeat:
    """One running daemon, as its main loop last said (ages by the registry's clock)."""

    owner: str
    node: str
    host: str
    pid: int
    started: float
    last_seen: float
    version: str
    age_seconds: float

    @property
    def stale(self) -> bool:
        return self.age_seconds > HEARTBEAT_SECONDS * STALE_AFTER_BEATS

    def to_json(self) -> dict[str, Any]:
        return {"node": self.node, "host": self.host, "pid": self.pid, "owner": self.owner,
                "started": self.started, "last_seen": self.last_seen, "version": self.version,
                "age_seconds": round(self.age_seconds, 3), "stale": self.stale}


def truncate(text: str, limit: int) -> str:
    """At most `limit` characters; a cut is marked so nobody mistakes it for the whole text."""
    if len(text) <= limit:
        return text
    marker = "…"
    return text[: max(limit - len(marker), 0)] + marker[: limit]


def backoff_delay(attempt: int, initial: float, maximum: float, jitter: float = 0.1,
                  rng: random.Random | None = None) -> float:
    """min(max, initial * 2^(attempt-1)), spread by +-jitter so retries do not march in step."""
    base: float = min(maximum, initial * (2 ** max(attempt - 1, 0)))
    spread = (rng or random).uniform(-jitter, jitter) if jitter else 0.0
    return min(maximum, max(0.0, base * (1.0 + spread)))


def _same_file(row: dict[str, Any], c: Candidate) -> bool:
    """Whether a candidate is the row's staged file, unchanged (inode, size, mtime)."""
    return (row["stage_ino"], row["size_bytes"], row["stage_mtime_ns"]) == (
        c.identity.ino, c.identity.size, c.identity.mtime_ns)


def _same_bytes(row: dict[str, Any], c: Candidate) -> bool:
    """Whether a candidate holds the row's bytes: by the digests when both are known; with
    one still pending, only when it is the same file, unchanged."""
    if checksum_known(row["checksum"]) and checksum_known(c.checksum):
        return bool(row["checksum"] == c.checksum)
    return row["checksum"] is not None and _same_file(row, c)


def _json_object(text: str) -> dict[str, Any]:
    """A JSON object as a dict; any other text is kept, wrapped (_unparsed, _value)."""
    try:
        value = json.loads(text)
    except ValueError:
        return {"_unparsed": text}
    return value if isinstance(value, dict) else {"_value": value}


def _metadata(row: dict[str, Any]) -> dict[str, Any]:
    """A row's metadata as Product.metadata has it (the header's, else the legacy column)."""
    return _json_object(row.get("header_json") or row.get("metadata_json") or "{}")


def sidecars_of(sidecars_json: str | None) -> list[str]:
    try:
        sidecars = json.loads(sidecars_json or "[]")
    except ValueError:
        sidecars = []
    return sidecars  # type: ignore[no-any-return]


def identity_of(row: dict[str, Any]) -> Identity | None:
    """The staged file a row describes (None: not described by this program)."""
    if row.get("stage_ino") is None:
        return None
    return Identity(row["stage_dev"], row["stage_ino"], row["size_bytes"],
                    row["stage_mtime_ns"], row["stage_ctime_ns"])


_DERIVED = ("metadata", "identity", "sidecars", "auto_publish_enabled", "publish_attempts")
# The Product fields that are data_registry's columns as they are (a column a registry
# lacks, such as a server's claim_token in an SQLite file, reads as None).
_AS_STORED = tuple(f.name for f in fields(Product) if f.name not in _DERIVED)


def _product(row: dict[str, Any]) -> Product:
    enabled = row.get("auto_publish_enabled")
    stored: dict[str, Any] = {name: row.get(name) for name in _AS_STORED}
    return Product(**stored, metadata=_metadata(row), identity=identity_of(row),
                   sidecars=sidecars_of(row.get("sidecars_json")),
                   auto_publish_enabled=enabled is None or bool(enabled),
                   publish_attempts=int(row.get("publish_attempts") or 0))


# --- folder-name reservations (a products area several nodes share) ---------------------------


@dataclass(frozen=True)
class Reservation:
    """A final name in the products area that a folder product's publish reserved before its
    rename, and that product is not (yet) published under: the claim that reserved it
    (data_id, claim_token) is what reconciliation checks to keep or release it."""

    published_path: str
    data_id: str
    owner: str
    claim_token: str | None
    reserved_at: float


# --- read queries for metrics, the status page and `status` ---------------------------------
HELD_BY_OPERATOR = ("auto_publish_enabled is 0 (`contimg-publisher release DATA_ID` "
                    "lets it be published automatically)")


# --- the outbox, the fixity audit, rebuild and quarantine (every backend) -------------------

FINDING_KINDS = tuple(FindingKind)

EVENT_PUBLISHED = "published"


@dataclass(frozen=True)
class Event:
    """One outbox row: what a consumer is told, identical at every delivery."""

    seq: int
    event_id: str
    type: str
    data_id: str
    created_at: float
    payload: dict[str, Any]

    def to_json(self) -> dict[str, Any]:
        """The body sent to every sink."""
        return {"event_id": self.event_id, "sequence": self.seq, "type": self.type,
                "time": self.created_at, **self.payload}


@dataclass(frozen=True)
class SinkState:
    """Where one sink stands: its backlog and the last failure at its head."""

    sink: str
    registered: bool
    delivered_through: int
    undelivered: int
    oldest_undelivered_at: float | None
    attempts: int
    last_error: str | None
    last_attempt_at: float | None
    dead: int
    head: int | None = None  # the sequence number of the event it waits to deliver

    def to_json(self, now: float) -> dict[str, Any]:
        oldest = self.oldest_undelivered_at
        return {"sink": self.sink, "registered": self.registered,
                "undelivered": self.undelivered,
                "oldest_undelivered_age_seconds": None if oldest is None
                else round(max(0.0, now - oldest), 3),
                "attempts": self.attempts, "last_error": self.last_error,
                "last_attempt_at": self.last_attempt_at, "dead": self.dead,
                "delivered_through": self.delivered_through}


@dataclass(frozen=True)
class Finding:
    """One thing the fixity audit found wrong (states.FindingKind), at a path in the products
    area (display form), with the product it concerns when a row records it."""

    kind: str
    path: str
    detail: str
    data_id: str | None = None
    first_seen: float | None = None
    last_seen: float | None = None
    resolved_at: float | None = None

    def to_json(self) -> dict[str, Any]:
        return {"kind": self.kind, "path": self.path, "data_id": self.data_id,
                "detail": self.detail, "first_seen": self.first_seen,
                "last_seen": self.last_seen, "resolved_at": self.resolved_at}


@dataclass(frozen=True)
class Recorded:
    """What the registry records in one folder of the products area (Registry.recorded_in):
    names of products and sidecars in it, and names of its sub-folders that hold any."""

    names: frozenset[str]
    folders: frozenset[str]


@dataclass(frozen=True)
class Rebuilt:
    """A row to create for an archived product that has none (rebuild --from-archive)."""

    data_id: str
    data_type: str
    base_path: str
    stage_path: str
    stage_path_bytes: bytes
    published_path: str
    published_at: float
    size_bytes: int
    checksum: str
    metadata: dict[str, Any]
    sidecars: tuple[str, ...]


@dataclass(frozen=True)
class Quarantined:
    """One file moved out of the staging area into the quarantine folder."""

    kind: str
    data_id: str | None
    original_path: str
    quarantine_path: str
    reason: str
    size_bytes: int | None
    how: str
    moved_at: float

    def to_json(self) -> dict[str, Any]:
        return dict(self.__dict__)


# The columns a `published` event carries (published_payload), selected by each backend.
EVENT_COLUMNS = ("data_id, data_type, published_path, stage_path, checksum, size_bytes,"
                 " header_json, metadata_json, sidecars_json, published_at, publish_mode")


def published_payload(row: dict[str, Any], supersedes: str | None, host: str,
                      node: str | None = None) -> dict[str, Any]:
    """The body of a row's `published` event (the row as the publish just left it, its
    EVENT_COLUMNS: no Product is built per publish); with a shared registry it also names
    the node whose daemon published it."""
    checksum = row["checksum"]
    payload: dict[str, Any] = {
        "data_id": row["data_id"], "data_type": row["data_type"],
        "published_path": row["published_path"], "stage_path": row["stage_path"],
        "checksum": checksum if checksum_known(checksum) else None,
        "size_bytes": row["size_bytes"], "metadata": _metadata(row),
        "sidecars": sidecars_of(row["sidecars_json"]), "supersedes": supersedes,
        "published_at": row["published_at"], "publish_mode": row["publish_mode"],
        "host": host}
    if node is not None:
        payload["node"] = node
    shown: dict[str, Any] = redact.deep(payload)  # a URL in a header value: no secrets
    return shown


def event_of(seq: int, event_id: str, type_: str, data_id: str, payload: str,
             created_at: float) -> Event:
    """An outbox row as an Event (a payload that is not a JSON object is kept, wrapped)."""
    return Event(seq, event_id, type_, data_id, created_at, _json_object(payload))


def folder_range(folder: str) -> tuple[str, str]:
    """(prefix, upper): every path in `folder` (display form) is >= prefix and < upper, in
    code point (byte) order, so one range query on a published_path index finds them."""
    prefix = folder.rstrip("/") + "/"
    return prefix, prefix[:-1] + "0"  # "0" is the character after "/"


def recorded_under(prefix: str, rows: Iterable[tuple[str | None, str | None]]) -> Recorded:
    """What (published path, sidecars_json) pairs record directly in the folder `prefix`
    names: product and sidecar names in it, and names of its sub-folders that hold any."""
    names: set[str] = set()
    folders: set[str] = set()
    for path, sidecars_json in rows:
        if not path or not path.startswith(prefix):
            continue
        rest = path[len(prefix):]
        head, sep, _tail = rest.partition("/")
        if sep:
            folders.add(head)
            continue
        names.add(rest)
        sidecars = sidecars_of(sidecars_json)
        if isinstance(sidecars, list):
            names.update(paths.display(os.fsencode(n)) for n in sidecars if isinstance(n, str))
    return Recorded(frozenset(names), frozenset(folders))


def delivery_states(events: Sequence[Event], cursors: dict[str, SinkState],
                    done: dict[tuple[int, str], dict[str, Any]], everything: bool
                    ) -> list[tuple[Event, dict[str, dict[str, Any]]]]:
    """Each event's state for every sink, from the sinks' cursors and the recorded
    outcomes (`done`, by (event, sink)): past a cursor an event is pending (the head with
    the sink's attempts), before it delivered unless an outcome says otherwise. Without
    `everything`, only the events some sink has not delivered."""
    out = []
    for event in events:
        states: dict[str, dict[str, Any]] = {}
        for sink, state in cursors.items():
            if event.seq > state.delivered_through:
                head = event.seq == state.head
                states[sink] = {"state": Delivery.PENDING,
                                "attempts": state.attempts if head else 0,
                                "at": state.last_attempt_at if head else None,
                                "error": state.last_error if head else None}
            else:
                states[sink] = done.get((event.seq, sink)) or {
                    "state": Delivery.DELIVERED, "attempts": None, "at": None,
                    "error": None}
        if everything or any(v["state"] != Delivery.DELIVERED for v in states.values()):
            out.append((event, states))
    return out
