"""The operator command: thin wrappers over the modules that do the work.

Exit status: 0 done, 1 the operation failed, 2 bad usage or bad config.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NoReturn

from contimg_publisher import (
    __version__,
    hygiene,
    lock,
    logs,
    redact,
    roots,
    rules,
    space,
    statuspage,
    statusreport,
    unitnet,
)
from contimg_publisher import config as config_mod
from contimg_publisher import registry as registry_mod
from contimg_publisher.config import Config, ConfigError
from contimg_publisher.registry import (
    HELD_BY_OPERATOR,
    STATUSES,
    Event,
    Product,
    RegistryBackend,
    RegistryError,
    open_registry,
    refuse_new_over_archive,
)
from contimg_publisher.states import Attempt, Delivery, Detected, Status
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
    p = sub.add_parser("events", help="outbox events not yet delivered to every sink, oldest "
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
    p = sub.add_parser("audit", help="read the products area back against the registry: "
                                     "missing or changed products, unrecorded files; exit 1 "
                                     "when anything is wrong")
    p.add_argument("--json", action="store_true")
    p.add_argument("--path", metavar="SUBPATH",
                   help="only this folder of the products area (relative to products_root)")
    p.add_argument("--bytes-per-second", type=float, default=0.0, metavar="N",
                   help="read back at most N bytes a second (default: unlimited)")
    p = sub.add_parser("rebuild", help="create rows for archived products that have none")
    p.add_argument("--from-archive", action="store_true", required=True,
                   help="describe them from the products area (required)")
    p.add_argument("--json", action="store_true")
    p = sub.add_parser("quarantine", help="move rejected and unclaimed files older than "
                                          "[hygiene] report_after_seconds out of staging, "
                                          "into [hygiene] quarantine_dir")
    p.add_argument("--dry-run", action="store_true", help="list them, move nothing")
    p.add_argument("--json", action="store_true")
    p = sub.add_parser("migrate", help="bring the registry to the current schema; with "
                       "--from, copy an SQLite registry into the configured PostgreSQL one")
    p.add_argument("--from", dest="from_sqlite", metavar="SQLITE_FILE",
                   help="an SQLite registry to copy, every row and value, into the (empty) "
                        "PostgreSQL registry of [paths] registry; its products belong to "
                        "this node ([node] name)")
    p = sub.add_parser("check-config", help="validate the config and print the effective "
                                            "values")
    p.add_argument("--unit-drop-in", action="store_true",
                   help="print instead the systemd drop-in that lets the unit reach the "
                        "registry server and webhook this config names (their addresses, "
                        "resolved now)")
    p = sub.add_parser("backup", help="an online, checked copy of the SQLite registry into "
                                      "DEST as registry-<UTC time>.sqlite3")
    p.add_argument("dest", metavar="DEST", help="the backup folder (created if missing)")
    p.add_argument("--keep", type=int, metavar="N",
                   help="then keep only the newest N backups in DEST")
    p.add_argument("--json", action="store_true")
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
    text = redact.text(text).replace("\n", "\\n")
    return text if len(text) <= limit else text[: limit - 1] + "…"


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
        _wait_for_migration(registry, cfg.busy_timeout_seconds)
        if registry.version() < registry.schema_version:
            version = registry.version()
            registry.close()
            raise RegistryError(f"registry {cfg.registry_shown} is at schema version {version}, "
                                f"this program needs {registry.schema_version}: run "
                                "`contimg-publisher "
                                "migrate` (or start the daemon, which migrates)")
    return registry


def _products_room(cfg: Config) -> space.Room | None:
    """Room on the products filesystem, when publishing there is a copy (None: a rename)."""
    try:
        if os.stat(cfg.stage_root).st_dev == os.stat(cfg.products_root).st_dev:
            return None
        return space.Room.of(os.statvfs(cfg.products_root))
    except OSError:
        return None


def wait_reasons(cfg: Config, registry: RegistryBackend, rows: list[Product]) -> dict[str, str]:
    """Why waiting rows wait: the QA gate's reasons, then the room a copy needs."""
    waiting = [r for r in rows if r.status == Status.STAGING]
    reasons = registry_mod.qa_holds(registry, [r.data_id for r in waiting])
    room = _products_room(cfg) if waiting else None
    if room is None:
        return reasons
    for row in waiting:
        if row.data_id not in reasons and row.size_bytes is not None:
            shortfall = room.shortfall(row.size_bytes, cfg.min_free_bytes)
            if shortfall is not None:
                reasons[row.data_id] = shortfall
    return reasons


def held_reason(row: Product, qa_reasons: dict[str, str]) -> str | None:
    """Why a waiting product is not published automatically (None: it is, or it is not
    waiting, or a manual publish was asked for)."""
    if row.status != Status.STAGING or row.publish_requested_at is not None:
        return None
    if row.data_id in qa_reasons:
        return qa_reasons[row.data_id]
    return None if row.auto_publish_enabled else HELD_BY_OPERATOR


def _product_json(cfg: Config, row: Product, qa_reasons: dict[str, str]) -> dict[str, Any]:
    data = row.to_json()
    reason = held_reason(row, qa_reasons)
    data["held"] = data["held"] or reason is not None
    data["held_reason"] = reason
    data["owned"] = rules.owns(cfg, row)
    return data


# --- commands ---------------------------------------------------------------------------------

def _status_unreadable(cfg: Config, args: argparse.Namespace, error: RegistryError,
                       daemon: statusreport.Daemon) -> int:
    """The registry cannot be read: say why, and what the daemon says, rather than only
    failing."""
    problems, data = statusreport.unreadable(cfg, error, daemon)
    if args.json:
        print(json.dumps(data, indent=2))
    else:
        holder, running = daemon.holder, daemon.running
        print(f"registry   {cfg.registry_shown}: cannot be read")
        print(f"daemon     {f'running, {holder}' if running else 'not running'}"
              + (" (publishing paused)" if daemon.paused is not None else ""))
        print("NEEDS ATTENTION")
        for line in problems:
            print(f"  - {line}")
    print(f"contimg-publisher: status: {error}", file=sys.stderr)
    return EXIT_FAILED


def cmd_status(cfg: Config, args: argparse.Namespace) -> int:
    """Exit 1 when something needs an operator, so cron or a Nagios-style check can alert."""
    daemon = statusreport.daemon_state(cfg)
    try:
        with _open(cfg) as registry:
            report = statusreport.read(cfg, registry, daemon)
    except RegistryError as exc:
        return _status_unreadable(cfg, args, exc, daemon)
    problems = report.problems
    if args.json:
        print(json.dumps(report.data, indent=2))  # a URL anywhere: without secrets
        return EXIT_FAILED if problems else EXIT_OK
    now, holder, running, paused = report.now, daemon.holder, daemon.running, daemon.paused
    counts, oldest, failures, last = report.counts, report.oldest, report.failures, report.last
    health, held, stale, beats = report.health, report.held, report.stale, report.health.nodes
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
    if not health.sinks:
        print("events     no sink configured ([notify] url, command): kept, sent nowhere")
    for k in health.sinks:
        waited = "" if k.oldest_undelivered_at is None else \
            f", the oldest waiting {statuspage.format_age(now - k.oldest_undelivered_at)}"
        failing = f"; {k.attempts} failed attempts, last: {_one_line(k.last_error, 80)}" \
            if k.attempts else ""
        dead = f"; {k.dead} given up on" if k.dead else ""
        target = cfg.sink_targets.get(k.sink)
        print(f"events     {k.sink}: {k.undelivered} undelivered{waited}{failing}{dead}"
              + (f"; sent to {target}" if target else ""))
    if health.unclaimed:
        print(f"unclaimed in staging  {len(health.unclaimed)} file"
              f"{'s' if len(health.unclaimed) != 1 else ''} that no product owns "
              "(nothing is deleted; publish, move or remove them by hand)")
        for u in health.unclaimed:
            print(f"  {u.path}  unchanged for {statuspage.format_age(now - u.changed_at)}: "
                  f"{u.reason}")
    if stale:
        where = f"`contimg-publisher quarantine` moves them to {cfg.quarantine_dir}" \
            if cfg.quarantine_dir is not None else "nothing is deleted; set [hygiene] " \
            "quarantine_dir to move them out with `contimg-publisher quarantine`"
        print(f"stale in staging  {len(stale)} rejected or unclaimed file"
              f"{'s' if len(stale) != 1 else ''} unchanged for over "
              f"{statuspage.format_age(cfg.hygiene_report_after_seconds)} ({where})")
        for item in stale:
            print(f"  {item.kind:9} {item.path}  unchanged for "
                  f"{statuspage.format_age(now - item.changed_at)}: {_one_line(item.reason)}")
    if health.findings:
        print(f"archive audit  {health.finding_total} open finding"
              f"{'s' if health.finding_total != 1 else ''} (last full pass "
              f"{_when(health.audit_last_pass)})")
        for f in health.findings:
            print(f"  {f.kind:16} {f.path}  {_one_line(f.detail)}")
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
        reasons = wait_reasons(cfg, registry, rows)
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
        reasons = wait_reasons(cfg, registry, [row])
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
        rows = registry.by_status(Status.FAILED) if args.all_failed else \
            [row for d in args.data_ids if (row := registry.get(d)) is not None]
        # A row under a staging root the configuration no longer names would wait where
        # nothing looks: it keeps its operator state, with the reason (roots.py).
        refused = {row.data_id: why for row in rows
                   if (why := roots.registered_elsewhere(cfg, row)) is not None}
        wanted = [row.data_id for row in rows if row.data_id not in refused] \
            if args.all_failed else [d for d in args.data_ids if d not in refused]
        changed = registry.retry(wanted) if wanted else []
        missing = [d for d in args.data_ids if d not in changed and d not in refused]
        for data_id in changed:
            print(f"{data_id}: due again")
        for data_id, why in refused.items():
            print(f"{data_id}: not retried: {why}", file=sys.stderr)
        for data_id in missing:
            row = registry.get(data_id)
            why = "no such product" if row is None else f"status {row.status}, nothing to retry"
            print(f"{data_id}: {why}", file=sys.stderr)
    return EXIT_FAILED if missing or refused else EXIT_OK


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


def _event_json(event: Event, states: dict[str, dict[str, Any]]) -> dict[str, Any]:
    return {**event.to_json(), "deliveries": states}


def _event_line(event: Event, states: dict[str, dict[str, Any]], now: float) -> list[str]:
    def one(sink: str, st: dict[str, Any]) -> str:
        text = f"{sink}: {st['state']}"
        if st["state"] != Delivery.DELIVERED and st.get("attempts"):
            text += f" ({st['attempts']} attempts: {_one_line(st.get('error'), 60)})"
        return text
    return [str(event.seq), event.event_id, event.data_id,
            statuspage.format_age(now - event.created_at),
            "; ".join(one(k, v) for k, v in states.items()) or "no sink configured"]


EVENT_HEADER = ["SEQ", "EVENT_ID", "DATA_ID", "AGE", "SINKS"]


def cmd_events(cfg: Config, args: argparse.Namespace) -> int:
    """The outbox: what waits for a consumer. Exit 0 whatever waits (`status` judges)."""
    if args.limit < 0:
        raise UsageError("--limit must be >= 0")
    sinks = cfg.notify_sinks
    with _open(cfg) as registry:
        if args.redeliver_dead:
            again = registry.redeliver_dead(sinks)
            for sink in sinks:
                print(f"{sink}: {again.get(sink, 0)} events to deliver again")
            return EXIT_OK
        with registry.read():
            rows = registry.events(sinks, everything=args.everything, limit=args.limit or None)
            last = registry.last_event_seq()
        now = time.time()
        if not args.follow:
            if args.json:
                print(json.dumps([_event_json(e, st) for e, st in rows], indent=2))
            elif rows:
                print(_table([_event_line(e, st, now) for e, st in rows], EVENT_HEADER))
            else:
                print("no undelivered events" if sinks else
                      "no sink configured ([notify] url, command): events are kept, sent "
                      "nowhere")
            return EXIT_OK
        return _follow(registry, sinks, rows, last, args.json)


def _follow(registry: RegistryBackend, sinks: tuple[str, ...],
            rows: list[tuple[Event, dict[str, dict[str, Any]]]], last: int,
            as_json: bool) -> int:
    """Print the rows, then each new event and each change of state of one, until
    SIGINT or SIGTERM (exit 0)."""
    stop: list[int] = []

    def on_signal(signum: int, _frame: Any) -> None:
        stop.append(signum)

    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, on_signal)
    shown: dict[int, dict[str, dict[str, Any]]] = {}
    if not as_json:
        print("  ".join(EVENT_HEADER), flush=True)

    def emit(event: Event, states: dict[str, dict[str, Any]]) -> None:
        if as_json:
            print(json.dumps(_event_json(event, states)), flush=True)
        else:
            print("  ".join(_event_line(event, states, time.time())), flush=True)

    for event, states in rows:
        emit(event, states)
        shown[event.seq] = states
    while not stop:
        time.sleep(0.5)
        watched = [seq for seq, st in shown.items()
                   if any(v["state"] == Delivery.PENDING for v in st.values())]
        low = min(watched, default=last + 1) - 1
        with registry.read():
            fresh = registry.events(sinks, everything=True, after=low)
        for event, states in fresh:
            if event.seq > last or (event.seq in shown and shown[event.seq] != states):
                emit(event, states)
            shown[event.seq] = states
            last = max(last, event.seq)
        for seq in [s for s, st in shown.items()
                    if not any(v["state"] == Delivery.PENDING for v in st.values())]:
            del shown[seq]
    return EXIT_OK


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
    if args.unit_drop_in:
        try:
            text = unitnet.drop_in(cfg)
        except unitnet.DropInError as exc:
            print(f"contimg-publisher: check-config --unit-drop-in: {exc}; no drop-in printed",
                  file=sys.stderr)
            return EXIT_FAILED
        print(text, end="")
        return EXIT_OK
    print(f"# {cfg.source}: valid")
    for key, value in cfg.as_dict().items():
        if key == "source":
            continue
        print(f"{key} = {json.dumps(value)}")
    return EXIT_OK


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
    if args.json:
        print(json.dumps({"path": str(made.path), "size_bytes": made.size_bytes,
                          "products": made.products, "schema_version": made.schema_version,
                          "integrity": "ok", "removed": [str(p) for p in made.removed]}))
    else:
        print(f"{made.path}: {made.size_bytes} bytes, {made.products} products, schema "
              f"version {made.schema_version}, integrity_check ok")
        for old in made.removed:
            print(f"removed {old} (--keep {args.keep})")
    return EXIT_OK


def cmd_scan(cfg: Config, args: argparse.Namespace) -> int:
    from contimg_publisher import service  # astropy and watchdog: only where needed
    report = service.scan_once(cfg, logs.get_logger())
    failed = rejected = 0
    for outcome in report.detected:
        if outcome.action in (Detected.REGISTERED, Detected.UPDATED, Detected.REJECTED,
                              Detected.VANISHED, Detected.LEFTOVER, Detected.FOUND_PUBLISHED,
                              Detected.DEFERRED):
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


def cmd_audit(cfg: Config, args: argparse.Namespace) -> int:
    """Exit 1 with the list when anything is wrong. Only reads: nothing in the products area
    or the registry is changed (the daemon's own pass keeps the findings table)."""
    from contimg_publisher import (
        audit,  # numpy (detect): only where needed
        paths,
    )
    sub: tuple[bytes, ...] = ()
    if args.path:
        try:
            sub = paths.relative_components(os.fsencode(str(cfg.products_root)),
                                            os.fsencode(args.path))
        except paths.UnsafePath as exc:
            raise UsageError(f"audit: --path {exc.path}: {exc.reason}") from None
    if args.bytes_per_second < 0:
        raise UsageError("audit: --bytes-per-second must be >= 0")

    def progress(report: audit.Report) -> None:
        print(f"audit: {report.checked} products checked, {report.bytes_read} bytes read, "
              f"{len(report.findings)} findings so far", file=sys.stderr)

    with _open(cfg) as registry:
        report = audit.run(cfg, registry,
                           audit.Throttle(args.bytes_per_second), sub, progress)
    ok = not report.findings
    if args.json:
        print(json.dumps({"ok": ok, "products_root": str(cfg.products_root),
                          "checked": report.checked, "bytes_read": report.bytes_read,
                          "seconds": round(report.seconds, 3),
                          "findings": [f.to_json() for f in report.findings],
                          "skipped": [{"path": p, "reason": why} for p, why in report.skipped]},
                         indent=2))
    else:
        for f in report.findings:
            print(f"{f.kind:16} {f.path}" + (f"  ({f.data_id})" if f.data_id else "")
                  + f"  {f.detail}")
        for path, why in report.skipped:
            print(f"{'skipped':16} {path}  {why}")
        print(f"audit: {report.checked} products read back ({report.bytes_read} bytes in "
              f"{report.seconds:.1f} s), {len(report.findings)} finding"
              f"{'s' if len(report.findings) != 1 else ''}")
    return EXIT_OK if ok else EXIT_FAILED


def cmd_rebuild(cfg: Config, args: argparse.Namespace) -> int:
    """Under the lock (so never beside a running daemon), on the registry as it is or a new
    one: a lost registry is exactly the case this is for."""
    from contimg_publisher import rebuild  # numpy (detect): only where needed
    with lock.acquire(str(cfg.lock_path), "rebuild", wait_seconds=0), \
            open_registry(cfg) as registry:
        report = rebuild.rebuild(cfg, registry)
    if args.json:
        print(json.dumps({"created": [{"data_id": r.data_id, "data_type": r.data_type,
                                       "published_path": r.published_path,
                                       "size_bytes": r.size_bytes, "checksum": r.checksum,
                                       "sidecars": list(r.sidecars)} for r in report.created],
                          "already_recorded": report.recorded,
                          "skipped": [{"path": p, "reason": why}
                                      for p, why in report.skipped]}, indent=2))
    else:
        for r in report.created:
            print(f"{'rebuilt':8} {r.data_id}  {r.published_path}  {r.checksum}")
        for path, why in report.skipped:
            print(f"{'skipped':8} {path}  {why}")
        print(f"rebuild: {len(report.created)} rows created, {report.recorded} products "
              f"already recorded, {len(report.skipped)} skipped")
    return EXIT_FAILED if report.skipped else EXIT_OK


def cmd_quarantine(cfg: Config, args: argparse.Namespace) -> int:
    if cfg.quarantine_dir is None and not args.dry_run:
        raise UsageError("quarantine: no [hygiene] quarantine_dir is configured; nothing is "
                         "moved (`--dry-run` lists what would be)")
    with _open(cfg) as registry:
        if args.dry_run:
            now = time.time()
            items = hygiene.stale(cfg, registry, now)
            if args.json:
                print(json.dumps([s.to_json(now) for s in items], indent=2))
            else:
                for item in items:
                    print(f"{'would move':10} {item.kind:9} {item.path}  "
                          f"{_one_line(item.reason)}")
                print(f"quarantine: {len(items)} file{'s' if len(items) != 1 else ''} "
                      "would be moved")
            return EXIT_OK
        moved, kept = hygiene.quarantine(cfg, registry, logs.get_logger())
    if args.json:
        print(json.dumps({"moved": [m.to_json() for m in moved],
                          "kept": [{"path": p, "reason": why} for p, why in kept]}, indent=2))
    else:
        for m in moved:
            print(f"{'moved':6} {m.original_path} -> {m.quarantine_path}  ({m.how})")
        for path, why in kept:
            print(f"{'kept':6} {path}  {why}")
        print(f"quarantine: {len(moved)} moved, {len(kept)} left in place")
    return EXIT_FAILED if kept else EXIT_OK


COMMANDS = {
    "status": cmd_status, "list": cmd_list, "show": cmd_show, "retry": cmd_retry,
    "publish": cmd_publish, "hold": cmd_hold, "release": cmd_release, "migrate": cmd_migrate,
    "check-config": cmd_check_config, "scan": cmd_scan, "events": cmd_events,
    "audit": cmd_audit,
    "rebuild": cmd_rebuild, "quarantine": cmd_quarantine, "backup": cmd_backup,
}
