"""The product registry: every SQL statement of the project lives in this package.

Every operation is written once (operations.py) against a session and a dialect
(dialect.py), over one numbered schema history (schema.py); each backend keeps only what
truly differs: sqlite.py, the embedded default that needs no server (a file shared with the
pipeline's older code), and postgres.py, one registry for several nodes. `open_registry`
picks the backend from `[paths] registry`: a file path, or a `postgresql://` URI.

`Registry` is the SQLite backend, under the name the code and its tests always used. The
names imported here are the package's public names (re-exported: see pyproject.toml).
"""

from __future__ import annotations

import os
import socket
from typing import TYPE_CHECKING

from contimg_publisher import qa
from contimg_publisher.registry import sqlite
from contimg_publisher.registry.model import (
    FAILURE_KINDS,
    HEARTBEAT_SECONDS,
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
    Registered,
    RegistryBusy,
    RegistryError,
    RegistryGone,
    RegistryUnavailable,
    Rejection,
    SinkState,
    Unclaimed,
    backoff_delay,
    checksum_known,
    pending_checksum,
    truncate,
)
from contimg_publisher.registry.operations import Operations as RegistryBackend
from contimg_publisher.registry.schema import LEGACY_DDL, SCHEMA_VERSION
from contimg_publisher.registry.sqlite import TRANSIENT, Registry, unavailable

if TYPE_CHECKING:
    from contimg_publisher.config import Config

URI_SCHEMES = ("postgresql://", "postgres://")


def is_server(target: str | os.PathLike[str]) -> bool:
    """Whether `[paths] registry` names a database server (a URI) rather than a file."""
    return isinstance(target, str) and target.startswith(URI_SCHEMES)


def refuse_new_over_archive(target: str | os.PathLike[str],
                            products_root: str | os.PathLike[str]) -> None:
    """An SQLite registry that does not exist is not created silently beside an archive that
    holds products (sqlite.refuse_new_over_archive); a server's database is never created
    by this program, so there is nothing to refuse."""
    if not is_server(target):
        sqlite.refuse_new_over_archive(target, products_root)


def open_registry(target: Config | str | os.PathLike[str],
                  busy_timeout_seconds: float | None = None,
                  *, migrate: bool = True, create: bool = True, guard_reads: bool = True,
                  node: str | None = None, lease_seconds: float | None = None
                  ) -> RegistryBackend:
    """The backend `target` names (a Config's `[paths] registry`, a file path or a
    `postgresql://` URI), connected. With a Config, its busy timeout and `[node] name` are
    the defaults, and its lease bounds a server's waits too (postgres: pgconn.limits).
    `create`/`guard_reads` are SQLite's (a server's database exists, or not).

    With a Config the connection also has its rules' QA gate and products' records
    (set_qa_gate): every connection that may record a publish points the record at it."""
    cfg: Config | None = None
    if not isinstance(target, str | os.PathLike):
        cfg = target
        target = cfg.registry
        busy_timeout_seconds = cfg.busy_timeout_seconds if busy_timeout_seconds is None \
            else busy_timeout_seconds
        node = cfg.node_name if node is None else node
        lease_seconds = cfg.lease_seconds if lease_seconds is None else lease_seconds
    timeout = 10.0 if busy_timeout_seconds is None else busy_timeout_seconds
    registry: RegistryBackend
    if is_server(target):
        from contimg_publisher.registry.postgres import PostgresRegistry
        registry = PostgresRegistry(str(target), timeout, migrate=migrate,
                                    node=node or socket.gethostname(),
                                    lease_seconds=lease_seconds)
    else:
        registry = Registry(target, timeout, migrate=migrate, create=create,
                            guard_reads=guard_reads)
    if cfg is not None:
        try:
            registry.set_qa_gate(qa.conditions(cfg.products), qa.records(cfg.products))
        except BaseException:
            registry.close()
            raise
    return registry

