"""The console script: parse, load the config, run one command, and turn what went wrong
into an exit status."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence

from contimg_publisher import config as config_mod
from contimg_publisher import lock, logs
from contimg_publisher.cli import (
    archive,
    checkconfig,
    events,
    operate,
    products,
    scan,
    status,
    upkeep,
)
from contimg_publisher.cli.common import EXIT_FAILED, EXIT_OK, EXIT_USAGE, UsageError
from contimg_publisher.cli.parser import build_parser
from contimg_publisher.config import Config, ConfigError
from contimg_publisher.registry import RegistryError

Command = Callable[[Config, argparse.Namespace], int]

COMMANDS: dict[str, Command] = {
    "status": status.cmd_status, "list": products.cmd_list, "show": products.cmd_show,
    "retry": operate.cmd_retry, "publish": operate.cmd_publish, "hold": operate.cmd_hold,
    "release": operate.cmd_release, "migrate": upkeep.cmd_migrate,
    "check-config": checkconfig.cmd_check_config, "scan": scan.cmd_scan,
    "events": events.cmd_events, "audit": archive.cmd_audit, "rebuild": archive.cmd_rebuild,
    "quarantine": archive.cmd_quarantine, "backup": upkeep.cmd_backup,
}


def main(argv: Sequence[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exc:
        if isinstance(exc.code, str):
            print(exc.code, file=sys.stderr)
            return EXIT_USAGE
        return EXIT_OK if exc.code in (0, None) else EXIT_USAGE
    path = args.config or config_mod.default_path()
    try:
        cfg = config_mod.load(path)
    except ConfigError as exc:
        print(f"contimg-publisher: bad config: {exc}", file=sys.stderr)
        return EXIT_USAGE
    if args.command == "run":
        return scan.run_daemon(path)
    logs.configure(cfg.log_level, "console" if cfg.log_format in ("auto", "journal")
                   else cfg.log_format, cfg.error_max_chars)
    try:
        return COMMANDS[args.command](cfg, args)
    except UsageError as exc:
        print(f"contimg-publisher: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except (RegistryError, lock.LockHeld, OSError) as exc:
        print(f"contimg-publisher: {args.command}: {exc}", file=sys.stderr)
        return EXIT_FAILED
