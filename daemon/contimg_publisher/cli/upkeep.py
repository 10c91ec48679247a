"""`migrate` (and `migrate --from`, the copy into PostgreSQL) and `backup`: the registry's
own upkeep."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from contimg_publisher.cli.common import EXIT_FAILED, EXIT_OK, EXIT_USAGE, UsageError
from contimg_publisher.config import Config
from contimg_publisher.registry import open_registry

if TYPE_CHECKING:
    from contimg_publisher.registry.backup import Backup

# --- migrate -----------------------------------------------------------------------------------

def _copy_site(cfg: Config, source: str) -> int:
    """`migrate --from FILE`: the SQLite registry into the configured PostgreSQL one."""
    from contimg_publisher.registry.copy import copy_sqlite
    from contimg_publisher.registry.postgres import PostgresRegistry
    if not cfg.registry_is_server:
        print("contimg-publisher: migrate --from: [paths] registry must be a postgresql:// "
              "URI to copy into", file=sys.stderr)
        return EXIT_USAGE
    if not os.path.isfile(source):
        print(f"contimg-publisher: migrate --from: {source}: no such file", file=sys.stderr)
        return EXIT_USAGE
    with open_registry(cfg) as registry:
        assert isinstance(registry, PostgresRegistry)
        copied = copy_sqlite(source, registry, cfg.node_name)
    for c in copied:
        print(f"{c.table}: {c.rows} row{'s' if c.rows != 1 else ''} copied"
              + (f" (left out: {', '.join(c.left_out)})" if c.left_out else ""))
    print(f"{source} copied into {cfg.registry_shown} as node {cfg.node_name}; the file is "
          "unchanged, and no longer the registry: legacy readers of it see no new publishes")
    return EXIT_OK


def cmd_migrate(cfg: Config, args: argparse.Namespace) -> int:
    if args.from_sqlite:
        return _copy_site(cfg, args.from_sqlite)
    with open_registry(cfg, migrate=False) as registry:
        before = registry.version()
        applied = registry.migrate()
        after = registry.version()
    if applied:
        print(f"{cfg.registry_shown}: migrated from schema version {before} to {after} "
              f"(steps {', '.join(map(str, applied))})")
    else:
        print(f"{cfg.registry_shown}: already at schema version {after}")
    return EXIT_OK


# --- backup ------------------------------------------------------------------------------------

def cmd_backup(cfg: Config, args: argparse.Namespace) -> int:
    from contimg_publisher.registry import backup
    if cfg.registry_is_server:
        raise UsageError(f"the registry is a PostgreSQL database ({cfg.registry_shown}): back it "
                         "up with the site's PostgreSQL backups (pg_dump, or base backups with "
                         "WAL archiving)")
    if args.keep is not None and args.keep < 1:
        raise UsageError("--keep takes a whole number of at least 1")
    try:
        made = backup.backup(str(cfg.registry), Path(args.dest), keep=args.keep,
                             busy_timeout_seconds=cfg.busy_timeout_seconds)
    except backup.BackupError as exc:
        print(f"contimg-publisher: backup of {cfg.registry_shown}: {exc}; nothing kept",
              file=sys.stderr)
        return EXIT_FAILED
    print(json.dumps(backup_json(made)) if args.json else backup_text(made, args.keep))
    return EXIT_OK


def backup_json(made: Backup) -> dict[str, Any]:
    return {"path": str(made.path), "size_bytes": made.size_bytes, "products": made.products,
            "schema_version": made.schema_version, "integrity": "ok",
            "removed": [str(p) for p in made.removed]}


def backup_text(made: Backup, keep: int | None) -> str:
    lines = [f"{made.path}: {made.size_bytes} bytes, {made.products} products, schema "
             f"version {made.schema_version}, integrity_check ok"]
    lines += [f"removed {old} (--keep {keep})" for old in made.removed]
    return "\n".join(lines)
