"""The command line: every subcommand, option and help text (the CLI reference in the
documentation is generated from build_parser())."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from typing import NoReturn

from contimg_publisher import __version__
from contimg_publisher import config as config_mod
from contimg_publisher.registry import STATUSES


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:  # exit 2 with one line, as for bad config
        self.print_usage(sys.stderr)
        raise SystemExit(f"{self.prog}: {message}") from None


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="contimg-publisher",
                     description="Publish finished DSA-110 mosaics from staging to the archive.")
    parser.add_argument("--config", metavar="PATH",
                        help=f"config file (default: ${config_mod.ENV_VAR}, else "
                             f"{config_mod.DEFAULT_PATH})")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="SUBCOMMAND",
                                parser_class=_Parser)
    # In this order in --help: running, reading, operating, events, the archive, upkeep.
    for group in (_running, _reading, _operating, _events, _archive, _upkeep):
        group(sub.add_parser)
    return parser


# sub.add_parser of the subcommands: each group adds its own.
AddParser = Callable[..., argparse.ArgumentParser]


def _running(add: AddParser) -> None:
    add("run", help="the daemon, in the foreground (what systemd starts)")
    add("scan", help="one pass: detect, register, publish what is due, reconcile")


def _reading(add: AddParser) -> None:
    p = add("status", help="health summary; exit 1 when something needs an "
                           "operator (a failed product, a product waiting too "
                           "long, no daemon)")
    p.add_argument("--json", action="store_true", help="the same as one JSON document")
    p = add("list", help="products, newest first")
    p.add_argument("--status", choices=STATUSES, help="only products in this status")
    p.add_argument("--type", dest="data_type", help="only products of this data type")
    p.add_argument("--limit", type=int, default=50, help="at most N rows (default 50; 0: all)")
    p.add_argument("--json", action="store_true", help="the same as one JSON document")
    p = add("show", help="one product with its failure history")
    p.add_argument("data_id", help="the product's data_id (see list)")
    p.add_argument("--json", action="store_true", help="the same as one JSON document")


def _operating(add: AddParser) -> None:
    p = add("retry", help="clear attempts and make failed products due again")
    p.add_argument("data_ids", nargs="*", metavar="DATA_ID", help="the products to retry")
    p.add_argument("--all-failed", action="store_true", help="every failed product")
    p = add("publish", help="publish one product now (manual)")
    p.add_argument("data_id", help="the product's data_id (see list)")
    p.add_argument("--override-qa", metavar="REASON",
                   help="publish a product the QA gate holds; REASON is logged")
    p = add("hold", help="stop automatic publishing of a product")
    p.add_argument("data_id", help="the product's data_id (see list)")
    p = add("release", help="allow automatic publishing of a product again")
    p.add_argument("data_id", help="the product's data_id (see list)")


def _events(add: AddParser) -> None:
    p = add("events", help="outbox events not yet delivered to every sink, oldest "
                           "first")
    p.add_argument("--json", action="store_true",
                   help="a JSON array; with --follow one JSON object per line")
    p.add_argument("--follow", action="store_true",
                   help="then print each new event, and each change of one, as it happens")
    p.add_argument("--all", dest="everything", action="store_true",
                   help="delivered events too")
    p.add_argument("--limit", type=int, default=0, help="at most N events (default 0: all)")
    p.add_argument("--redeliver-dead", action="store_true",
                   help="send the events a sink gave up on, and those after them, again")


def _archive(add: AddParser) -> None:
    p = add("audit", help="read the products area back against the registry: "
                          "missing or changed products, unrecorded files; exit 1 "
                          "when anything is wrong")
    p.add_argument("--json", action="store_true", help="the same as one JSON document")
    p.add_argument("--path", metavar="SUBPATH",
                   help="only this folder of the products area (relative to products_root)")
    p.add_argument("--bytes-per-second", type=float, default=0.0, metavar="N",
                   help="read back at most N bytes a second (default: unlimited)")
    p = add("rebuild", help="create rows for archived products that have none")
    p.add_argument("--from-archive", action="store_true", required=True,
                   help="describe them from the products area (required)")
    p.add_argument("--json", action="store_true", help="the same as one JSON document")
    p = add("quarantine", help="move rejected and unclaimed files older than "
                               "[hygiene] report_after_seconds out of staging, "
                               "into [hygiene] quarantine_dir")
    p.add_argument("--dry-run", action="store_true", help="list them, move nothing")
    p.add_argument("--json", action="store_true", help="the same as one JSON document")


def _upkeep(add: AddParser) -> None:
    p = add("migrate", help="bring the registry to the current schema; with --from, copy "
                            "an SQLite registry into the configured PostgreSQL one")
    p.add_argument("--from", dest="from_sqlite", metavar="SQLITE_FILE",
                   help="an SQLite registry to copy, every row and value, into the (empty) "
                        "PostgreSQL registry of [paths] registry; its products belong to "
                        "this node ([node] name)")
    p = add("check-config", help="validate the config and print the effective "
                                 "values")
    p.add_argument("--unit-drop-in", action="store_true",
                   help="print instead the systemd drop-in that lets the unit reach the "
                        "registry server and webhook this config names (their addresses, "
                        "resolved now)")
    p = add("backup", help="an online, checked copy of the SQLite registry into "
                           "DEST as registry-<UTC time>.sqlite3")
    p.add_argument("dest", metavar="DEST", help="the backup folder (created if missing)")
    p.add_argument("--keep", type=int, metavar="N",
                   help="then keep only the newest N backups in DEST")
    p.add_argument("--json", action="store_true", help="the same as one JSON document")
