"""The operator command: thin wrappers over the modules that do the work.

Exit status: 0 done, 1 the operation failed, 2 bad usage or bad config.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Sequence
from typing import Any, NoReturn

from contimg_publisher import __version__, lock, logs, outage, qa, statuspage
from contimg_publisher import config as config_mod
from contimg_publisher import registry as registry_mod
from contimg_publisher.config import Config, ConfigError
from contimg_publisher.registry import (
    HELD_BY_OPERATOR,
    SCHEMA_VERSION,
    STATUSES,
    Product,
    RegistryBackend,
    RegistryError,
    open_registry,
    refuse_new_over_archive,
)
from contimg_publisher.states import Attempt, Detected, Status
from contimg_publisher.statuspage import format_when as _when

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2


class UsageError(Exception):
    pass


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
    sub.add_parser("run", help="the daemon, in the foreground (what systemd starts)")
    sub.add_parser("scan", help="one pass: detect, register, publish what is due, reconcile")
    p = sub.add_parser("status", help="health summary; exit 1 when something needs an "
                                      "operator (a failed product, a product waiting too "
                                      "long, no daemon)")
    p.add_argument("--json", action="store_true")
    p = sub.add_parser("list", help="products, newest first")
    p.add_argument("--status", choices=STATUSES)
    p.add_argument("--type", dest="data_type")
    p.add_argument("--limit", type=int, default=50, help="at most N rows (default 50; 0: all)")
    p.add_argument("--json", action="store_true")
    p = sub.add_parser("show", help="one product with its failure history")
    p.add_argument("data_id")
    p.add_argument("--json", action="store_true")
    p = sub.add_parser("retry", help="clear attempts and make failed products due again")
    p.add_argument("data_ids", nargs="*", metavar="DATA_ID")
    p.add_argument("--all-failed", action="store_true")
    p = sub.add_parser("publish", help="publish one product now (manual)")
    p.add_argument("data_id")
    p.add_argument("--override-qa", metavar="REASON",
                   help="publish a product the QA gate holds; REASON is logged")
    p = sub.add_parser("hold", help="stop automatic publishing of a product")
    p.add_argument("data_id")
    p = sub.add_parser("release", help="allow automatic publishing of a product again")
    p.add_argument("data_id")
    p = sub.add_parser("migrate", help="bring the registry to the current schema; with "
                       "--from, copy an SQLite registry into the configured PostgreSQL one")
    p.add_argument("--from", dest="from_sqlite", metavar="SQLITE_FILE",
                   help="an SQLite registry to copy, every row and value, into the (empty) "
                        "PostgreSQL registry of [paths] registry; its products belong to "
                        "this node ([node] name)")
    sub.add_parser("check-config", help="validate the config and print the effective values")
    return parser


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
        from contimg_publisher import service  # astropy and watchdog: only where needed
        return service.run(path)
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


# --- formatting -------------------------------------------------------------------------------

def _table(rows: list[list[str]], header: list[str]) -> str:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(str(c).ljust(w) for c, w in zip(header, widths, strict=True)).rstrip()]
    lines += ["  ".join(str(c).ljust(w) for c, w in zip(r, widths, strict=True)).rstrip()
              for r in rows]
    return "\n".join(lines)


def _one_line(text: str | None, limit: int = 80) -> str:
    if not text:
        return "-"
    text = text.replace("\n", "\\n")
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _open(cfg: Config) -> RegistryBackend:
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
        if registry.version() < SCHEMA_VERSION:
            version = registry.version()
            registry.close()
            raise RegistryError(f"registry {cfg.registry_shown} is at schema version {version}, "
                                f"this program needs {SCHEMA_VERSION}: run `contimg-publisher "
                                "migrate` (or start the daemon, which migrates)")
    registry.set_qa_gate(qa.conditions(cfg.products))
    return registry


def held_reason(row: Product, qa_reasons: dict[str, str]) -> str | None:
    """Why a waiting product is not published automatically (None: it is, or it is not
    waiting, or a manual publish was asked for)."""
    if row.status != Status.STAGING or row.publish_requested_at is not None:
        return None
    if row.data_id in qa_reasons:
        return qa_reasons[row.data_id]
    return None if row.auto_publish_enabled else HELD_BY_OPERATOR


def _product_json(cfg: Config, row: Product, qa_reasons: dict[str, str]) -> dict[str, Any]:
    from contimg_publisher import detect  # numpy and watchdog: only where needed
    data = row.to_json()
    reason = held_reason(row, qa_reasons)
    data["held"] = data["held"] or reason is not None
    data["held_reason"] = reason
    data["owned"] = detect.owns(cfg, row)
    return data


# --- commands ---------------------------------------------------------------------------------

def _daemon_paused(cfg: Config, running: bool) -> statuspage.Paused | None:
    """The running daemon's own word that it paused publishing (its lock file's note)."""
    found = outage.parse_note(lock.read_note(str(cfg.lock_path))) if running else None
    if found is None:
        return None
    since = found.get("since")
    return statuspage.Paused(str(found.get("reason") or "unknown"),
                             float(since) if isinstance(since, int | float) else None)


def _paused_json(paused: statuspage.Paused | None) -> dict[str, Any] | None:
    return None if paused is None else {"reason": paused.reason, "since": paused.since}


def _status_unreadable(cfg: Config, args: argparse.Namespace, error: RegistryError,
                       holder: str | None, running: bool,
                       paused: statuspage.Paused | None) -> int:
    """The registry cannot be read: say why, and what the daemon says, rather than only
    failing."""
    now = time.time()
    problems = ([paused.line(now)] if paused is not None else []) + [
        f"the registry cannot be read: {error}"]
    if not running:
        problems.append("no daemon holds the lock: nothing is being published")
    if args.json:
        print(json.dumps({"counts": None, "registry": cfg.registry_shown,
                          "registry_error": str(error),
                          "lock": {"path": str(cfg.lock_path), "holder": holder},
                          "daemon_running": running, "paused": _paused_json(paused),
                          "problems": problems, "ok": False}, indent=2))
    else:
        print(f"registry   {cfg.registry_shown}: cannot be read")
        print(f"daemon     {f'running, {holder}' if running else 'not running'}"
              + (" (publishing paused)" if paused is not None else ""))
        print("NEEDS ATTENTION")
        for line in problems:
            print(f"  - {line}")
    print(f"contimg-publisher: status: {error}", file=sys.stderr)
    return EXIT_FAILED


def cmd_status(cfg: Config, args: argparse.Namespace) -> int:
    """Exit 1 when something needs an operator, so cron or a Nagios-style check can alert."""
    holder = lock.holder(str(cfg.lock_path))
    running = holder is not None and "daemon" in holder
    paused = _daemon_paused(cfg, running)
    try:
        with _open(cfg) as registry:
            now = time.time()
            counts = registry.counts()
            oldest = registry.oldest_waiting()
            failures = registry.failures_since(now - 3600)
            last = registry.last_published()
            health = statuspage.snapshot(registry, limit=0, now=now,
                                         unclaimed_after=cfg.unclaimed_after_seconds)
            held = registry_mod.held(registry, [r.type for r in cfg.products])
            health.failed = registry_mod.by_status(registry, Status.FAILED)
    except RegistryError as exc:
        return _status_unreadable(cfg, args, exc, holder, running, paused)
    max_age = cfg.status_max_waiting_age_seconds
    problems = statuspage.problems(health, max_age, running, paused)
    beats = health.nodes
    data: dict[str, Any] = {
        "counts": counts,
        "oldest_waiting": None if oldest is None else {
            "data_id": oldest.data_id, "staged_at": oldest.staged_at,
            "age_seconds": round(now - oldest.staged_at, 3)},
        "failures_last_hour": failures,
        "last_published": None if last is None else {
            "data_id": last.data_id, "published_at": last.published_at,
            "published_path": last.published_path},
        "lock": {"path": str(cfg.lock_path), "holder": holder},
        "daemon_running": running,
        "paused": _paused_json(paused),
        "registry": cfg.registry_shown,
        "success_rate": {
            "last_hour": {"published": health.published_hour, "failures": health.failures_hour,
                          "rate": health.success_rate_hour},
            "last_day": {"published": health.published_day, "failures": health.failures_day,
                         "rate": health.success_rate_day}},
        "max_waiting_age_seconds": max_age,
        "unclaimed": [u.to_json(now) for u in health.unclaimed],
        "unclaimed_after_seconds": cfg.unclaimed_after_seconds,
        "held": [{"data_id": r.data_id, "data_type": r.data_type, "reason": why,
                  "staged_at": r.staged_at} for r, why in held],
        "failed": [{"data_id": r.data_id, "data_type": r.data_type,
                    "publish_error": r.publish_error} for r in health.failed],
        "nodes": [b.to_json() for b in beats],
        "problems": problems,
        "ok": not problems,
    }
    if args.json:
        print(json.dumps(data, indent=2))
        return EXIT_FAILED if problems else EXIT_OK
    print(f"registry   {cfg.registry_shown}")
    print(f"daemon     {f'running, {holder}' if running else 'not running'}"
          + (f" (lock held by {holder})" if holder and not running else "")
          + (" (publishing paused)" if paused is not None else ""))
    for b in beats:
        print(f"node       {b.node}: pid {b.pid} on {b.host}, last heard from "
              f"{statuspage.format_age(b.age_seconds)} ago"
              + (" (STOPPED? no heartbeat)" if b.stale else ""))
    print("products   " + ", ".join(f"{counts[s]} {s}" for s in STATUSES))
    if oldest is not None:
        waited = statuspage.format_age(now - oldest.staged_at)
        print(f"oldest waiting  {oldest.data_id} (waiting {waited})")
    print(f"failures in the last hour  {failures}")
    print(f"success rate  last hour {statuspage.format_rate(health.success_rate_hour)} "
          f"({health.published_hour} published, {health.failures_hour} failed attempts); "
          f"last day {statuspage.format_rate(health.success_rate_day)} "
          f"({health.published_day} published, {health.failures_day} failed attempts)")
    if last is not None:
        print(f"last published  {last.data_id} at {_when(last.published_at)}")
    if held:
        print(f"held  {len(held)} waiting product{'s' if len(held) != 1 else ''} not "
              "published automatically (`contimg-publisher show DATA_ID`)")
        for r, why in held:
            print(f"  {r.data_id}  {why}")
    if health.failed:
        print(f"failed  {len(health.failed)} product{'s' if len(health.failed) != 1 else ''}"
              " waiting for an operator (`contimg-publisher show DATA_ID`, then `retry`)")
        for r in health.failed:
            print(f"  {r.data_id}  {_one_line(r.publish_error, 100)}")
    if health.unclaimed:
        print(f"unclaimed in staging  {len(health.unclaimed)} file"
              f"{'s' if len(health.unclaimed) != 1 else ''} that no product owns "
              "(nothing is deleted; publish, move or remove them by hand)")
        for u in health.unclaimed:
            print(f"  {u.path}  unchanged for {statuspage.format_age(now - u.changed_at)}: "
                  f"{u.reason}")
    if problems:
        print("NEEDS ATTENTION")
        for line in problems:
            print(f"  - {line}")
        return EXIT_FAILED
    print("ok: nothing needs an operator")
    return EXIT_OK


def cmd_list(cfg: Config, args: argparse.Namespace) -> int:
    if args.limit < 0:
        raise UsageError("--limit must be >= 0")
    with _open(cfg) as registry:
        rows = registry.products(status=args.status, data_type=args.data_type,
                                 limit=args.limit or None)
        reasons = registry_mod.qa_holds(registry, [r.data_id for r in rows
                                                   if r.status == Status.STAGING])
    if args.json:
        print(json.dumps([_product_json(cfg, r, reasons) for r in rows], indent=2))
        return EXIT_OK

    def shown(r: Product) -> str:
        if r.status == Status.PUBLISHED:
            return r.published_path or "-"
        held = held_reason(r, reasons)
        return f"held: {held}" if held else r.publish_error or r.stage_path

    print(_table([[r.data_id, r.data_type, r.status, str(r.publish_attempts),
                   _when(r.published_at or r.staged_at), _one_line(shown(r), 70)]
                  for r in rows],
                 ["DATA_ID", "TYPE", "STATUS", "ATTEMPTS", "WHEN", "PATH / ERROR"]))
    return EXIT_OK


def _show_text(row: Product, history: list[Any], relations: list[dict[str, str]],
               held: str | None = None, owned: bool = True) -> str:
    out = [f"{row.data_id}  ({row.data_type}, {row.status}"
           + (", held" if held or not row.auto_publish_enabled else "") + ")",
           f"  staged      {row.stage_path}",
           f"  published   {row.published_path or '-'}",
           f"  size        {row.size_bytes if row.size_bytes is not None else '-'} bytes",
           f"  checksum    {_checksum_text(row)}",
           f"  staged at   {_when(row.staged_at)}",
           f"  published at {_when(row.published_at)} ({row.publish_mode or '-'})",
           f"  attempts    {row.publish_attempts}",
           f"  next try    {_when(row.next_attempt_at) if row.status == 'staging' else '-'}",
           f"  last error  {_one_line(row.publish_error, 200)}"]
    if held:
        out.append(f"  held        {held}")
    if not owned:
        out.append("  owner       another writer: no product rule of this configuration "
                   "owns this row (its type and path); the daemon leaves it as it is")
    if row.metadata:
        pairs = ", ".join(f"{k}={v}" for k, v in sorted(row.metadata.items()))
        out.append(f"  metadata    {pairs}")
    if row.sidecars:
        out.append("  sidecars    " + ", ".join(row.sidecars))
    for rel in relations:
        out.append(f"  {rel['parent']} {rel['type']} {rel['child']}")
    if history:
        out.append("  failure history:")
        out.append(_table([[_when(f.at), str(f.attempt), f.kind, f"{f.host}:{f.pid}",
                            _one_line(f.error, 100)] for f in history],
                          ["    AT", "ATTEMPT", "KIND", "WHERE", "ERROR"]))
    return "\n".join(out)


def _checksum_text(row: Product) -> str:
    if row.checksum_pending:
        return "- (computed by the copy that publishes it)"
    return row.checksum or "-"


def cmd_show(cfg: Config, args: argparse.Namespace) -> int:
    with _open(cfg) as registry:
        row = registry.get(args.data_id)
        if row is None:
            print(f"contimg-publisher: show: no product {args.data_id!r}", file=sys.stderr)
            return EXIT_FAILED
        history = registry.history(row.data_id)
        relations = registry.relationships(row.data_id)
        reasons = registry_mod.qa_holds(registry, [row.data_id])
    data = _product_json(cfg, row, reasons)
    if args.json:
        data["failures"] = [f.to_json() for f in history]
        data["relationships"] = relations
        print(json.dumps(data, indent=2))
    else:
        print(_show_text(row, history, relations, data["held_reason"], data["owned"]))
    return EXIT_OK


def cmd_retry(cfg: Config, args: argparse.Namespace) -> int:
    if not args.data_ids and not args.all_failed:
        raise UsageError("retry: name DATA_IDs or give --all-failed")
    if args.data_ids and args.all_failed:
        raise UsageError("retry: DATA_IDs and --all-failed exclude each other")
    with _open(cfg) as registry:
        changed = registry.retry(args.data_ids, all_failed=args.all_failed)
        missing = [d for d in args.data_ids if d not in changed]
        for data_id in changed:
            print(f"{data_id}: due again")
        for data_id in missing:
            row = registry.get(data_id)
            why = "no such product" if row is None else f"status {row.status}, nothing to retry"
            print(f"{data_id}: {why}", file=sys.stderr)
    return EXIT_FAILED if missing else EXIT_OK


def cmd_publish(cfg: Config, args: argparse.Namespace) -> int:
    from contimg_publisher import service  # astropy and watchdog: only where needed
    result = service.publish_now(cfg, args.data_id, logs.get_logger(),
                                 override_qa=args.override_qa)
    if isinstance(result, str):
        print(f"contimg-publisher: publish: {result}", file=sys.stderr)
        return EXIT_FAILED
    if result.status is Attempt.PUBLISHED:
        print(f"{result.data_id}: published to {result.published_path}")
        return EXIT_OK
    if result.status is Attempt.REJECTED:
        print(f"contimg-publisher: publish: {result.data_id}: rejected ({result.error})",
              file=sys.stderr)
        return EXIT_FAILED
    print(f"contimg-publisher: publish: {result.data_id}: {result.status}"
          f" ({result.kind or 'error'}: {result.error})", file=sys.stderr)
    return EXIT_FAILED


def _hold(cfg: Config, data_id: str, held: bool) -> int:
    with _open(cfg) as registry:
        if not registry.set_hold(data_id, held):
            print(f"contimg-publisher: no product {data_id!r}", file=sys.stderr)
            return EXIT_FAILED
    print(f"{data_id}: {'held: not published automatically' if held else 'released'}")
    return EXIT_OK


def cmd_hold(cfg: Config, args: argparse.Namespace) -> int:
    return _hold(cfg, args.data_id, True)


def cmd_release(cfg: Config, args: argparse.Namespace) -> int:
    return _hold(cfg, args.data_id, False)


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


def cmd_check_config(cfg: Config, args: argparse.Namespace) -> int:
    print(f"# {cfg.source}: valid")
    for key, value in cfg.as_dict().items():
        if key == "source":
            continue
        print(f"{key} = {json.dumps(value)}")
    return EXIT_OK


def cmd_scan(cfg: Config, args: argparse.Namespace) -> int:
    from contimg_publisher import service  # astropy and watchdog: only where needed
    report = service.scan_once(cfg, logs.get_logger())
    failed = rejected = 0
    for outcome in report.detected:
        if outcome.action in (Detected.REGISTERED, Detected.UPDATED, Detected.REJECTED,
                              Detected.VANISHED, Detected.LEFTOVER, Detected.FOUND_PUBLISHED):
            extra = f" ({outcome.reason})" if outcome.reason else ""
            print(f"{outcome.action:10} {outcome.data_id}  {outcome.stage_path}{extra}")
    for result in report.reconciled:
        print(f"{'reconciled':10} {result.data_id}  -> {result.status}")
    for result in report.published:
        if result.status is Attempt.PUBLISHED:
            print(f"{'published':10} {result.data_id}  -> {result.published_path}")
        elif result.status is Attempt.REJECTED:
            # Bad input found by the copy's read, as detection would have found it.
            rejected += 1
            print(f"{'rejected':10} {result.data_id}  ({result.error})")
        else:
            failed += 1
            print(f"{result.status:10} {result.data_id}  ({result.kind}: {result.error})")
    rejected += sum(o.action == 'rejected' for o in report.detected)
    print(f"scan: {sum(o.action in ('registered', 'updated') for o in report.detected)} "
          f"registered, {sum(r.status is Attempt.PUBLISHED for r in report.published)} published, "
          f"{failed} failed, {rejected} rejected, "
          f"{report.waiting} still settling")
    return EXIT_FAILED if failed else EXIT_OK


COMMANDS = {
    "status": cmd_status, "list": cmd_list, "show": cmd_show, "retry": cmd_retry,
    "publish": cmd_publish, "hold": cmd_hold, "release": cmd_release, "migrate": cmd_migrate,
    "check-config": cmd_check_config, "scan": cmd_scan,
}
