"""What every command shares: exit statuses, the usage error, and opening the registry to
read it as it is."""

from __future__ import annotations

import os
import time

from contimg_publisher.config import Config
from contimg_publisher.registry import (
    RegistryBackend,
    RegistryError,
    open_registry,
    refuse_new_over_archive,
)

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2


class UsageError(Exception):
    """Bad usage found after parsing (exit 2 with the message)."""


def _wait_for_migration(registry: RegistryBackend, limit_seconds: float) -> None:
    """A daemon starting on this registry may be stepping through its migration right now
    (one transaction per step): wait while the version moves, up to the busy timeout, and
    not at all longer than a second for a file that nobody is migrating."""
    version = registry.version()
    now = time.monotonic()
    deadline, quiet_until = now + limit_seconds, now + 1.0
    while version < registry.schema_version and now < min(deadline, quiet_until):
        time.sleep(0.1)
        seen, now = registry.version(), time.monotonic()
        if seen != version:
            version, quiet_until = seen, now + 1.0


def open_for_reading(cfg: Config) -> RegistryBackend:
    """Read commands use the registry as it is: an older file is not migrated behind the
    operator's back.

    Reads are not refused when the -shm cannot be written (Registry guard_reads): this
    short-lived process opens it after the fact, and SQLite then maps it read-only, so an
    operator can still read a registry made immutable. Writes are refused with the reason."""
    if not cfg.registry_is_server and not os.path.exists(cfg.registry):
        refuse_new_over_archive(cfg.registry, cfg.products_root)
        registry = open_registry(cfg)
    else:
        registry = open_registry(cfg, migrate=False, guard_reads=False)
        _wait_for_migration(registry, cfg.busy_timeout_seconds)
        if registry.version() < registry.schema_version:
            version = registry.version()
            registry.close()
            raise RegistryError(f"registry {cfg.registry_shown} is at schema version {version}, "
                                f"this program needs {registry.schema_version}: run "
                                "`contimg-publisher "
                                "migrate` (or start the daemon, which migrates)")
    return registry
