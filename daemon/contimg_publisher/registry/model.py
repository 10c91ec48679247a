"""What the registry records, whatever keeps it: the rows and outcomes the rest of the
program reads (dataclasses), the errors every backend raises, and the pure helpers the
backends share (no connection, no I/O)."""

from __future__ import annotations

import json
import os
import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, TypeGuard

from contimg_publisher.config import QA_FIELDS
from contimg_publisher.qa import Condition
from contimg_publisher.states import FailureKind, Kind, Status

# The schema both backends are at: version N means the same tables, columns and meanings in
# SQLite (PRAGMA user_version) and in PostgreSQL (its schema version table).
SCHEMA_VERSION = 6

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


def _literal(text: str) -> str:
    """An SQL string literal (the QA gate's values come from the config file)."""
    return "'" + text.replace("'", "''") + "'"


def qa_hold_sql(conditions: Sequence[Condition], quote: str = "quote") -> str:
    """An SQL expression over a data_registry row: NULL when the QA gate lets it be
    published automatically, else the reason it is held (qa.py says which values hold)."""
    whens = []
    for c in conditions:
        if c.column not in QA_FIELDS:
            raise ValueError(f"QA gate: {c.column!r} is not a QA column ({', '.join(QA_FIELDS)})")
        values = ", ".join(_literal(v) for v in c.values)
        if c.required:
            wanted = values if len(c.values) == 1 else f"one of {values}"
            test = f"{c.column} IS NULL OR {c.column} NOT IN ({values})"
            reason = (f"{_literal(f'QA gate: waits for {c.column} {wanted} (now ')}"
                      f" || {quote}({c.column}) || ')'")
        else:
            test = f"{c.column} IN ({values})"
            reason = f"{_literal(f'QA gate: {c.column} is ')} || {quote}({c.column})"
        whens.append(f"WHEN data_type = {_literal(c.data_type)} AND ({test}) THEN {reason}")
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
        return {
            "data_id": self.data_id,
            "data_type": self.data_type,
            "status": self.status,
            "stage_path": self.stage_path,
            "published_path": self.published_path,
            "publish_attempts": self.publish_attempts,
            "publish_error": self.publish_error,
            "size_bytes": self.size_bytes,
            "checksum": self.checksum if checksum_known(self.checksum) else None,
            "checksum_pending": self.checksum_pending,
            "metadata": self.metadata,
            "held": not self.auto_publish_enabled,
            "publish_mode": self.publish_mode,
            "created_at": self.created_at,
            "staged_at": self.staged_at,
            "published_at": self.published_at,
            "next_attempt_at": self.next_attempt_at,
            "lease_owner": self.lease_owner,
            "lease_expires_at": self.lease_expires_at,
            "publish_step": self.publish_step,
            "sidecars": self.sidecars,
        }


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


def _metadata(row: dict[str, Any]) -> dict[str, Any]:
    """A row's metadata as Product.metadata has it (the header's, else the legacy column)."""
    try:
        metadata = json.loads(row.get("header_json") or row.get("metadata_json") or "{}")
    except ValueError:
        metadata = {"_unparsed": row.get("header_json") or row.get("metadata_json")}
    if not isinstance(metadata, dict):
        metadata = {"_value": metadata}
    return metadata


def _sidecars(row: dict[str, Any]) -> list[str]:
    try:
        sidecars = json.loads(row.get("sidecars_json") or "[]")
    except ValueError:
        sidecars = []
    return sidecars  # type: ignore[no-any-return]


def _product(row: dict[str, Any]) -> Product:
    metadata, sidecars = _metadata(row), _sidecars(row)
    ident = None
    if row.get("stage_ino") is not None:
        ident = Identity(row["stage_dev"], row["stage_ino"], row["size_bytes"],
                         row["stage_mtime_ns"], row["stage_ctime_ns"])
    enabled = row.get("auto_publish_enabled")
    return Product(
        id=row["id"], data_id=row["data_id"], data_type=row["data_type"], status=row["status"],
        base_path=row["base_path"], stage_path=row["stage_path"],
        stage_path_bytes=row.get("stage_path_bytes"), published_path=row["published_path"],
        created_at=row["created_at"], staged_at=row["staged_at"],
        published_at=row["published_at"], publish_mode=row["publish_mode"], metadata=metadata,
        auto_publish_enabled=enabled is None or bool(enabled),
        publish_attempts=int(row.get("publish_attempts") or 0),
        publish_error=row.get("publish_error"), next_attempt_at=row.get("next_attempt_at"),
        lease_owner=row.get("lease_owner"), lease_expires_at=row.get("lease_expires_at"),
        size_bytes=row.get("size_bytes"), checksum=row.get("checksum"), identity=ident,
        publish_target=row.get("publish_target"), publish_temp=row.get("publish_temp"),
        publish_step=row.get("publish_step"),
        sidecars=sidecars, publish_requested_at=row.get("publish_requested_at"),
        claim_token=row.get("claim_token"), node=row.get("node"))


# --- read queries for metrics, the status page and `status` ---------------------------------
HELD_BY_OPERATOR = ("auto_publish_enabled is 0 (`contimg-publisher release DATA_ID` "
                    "lets it be published automatically)")

