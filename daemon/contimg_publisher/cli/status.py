"""`status`: the health summary, as text or as the status object (statusreport).

Exit 1 when something needs an operator, so cron or a Nagios-style check can alert.
"""

from __future__ import annotations

import argparse
import json
import sys

from contimg_publisher import statusreport
from contimg_publisher.cli.common import EXIT_FAILED, EXIT_OK, open_for_reading
from contimg_publisher.cli.text import age, one_line, plural, rate, when
from contimg_publisher.config import Config
from contimg_publisher.registry import STATUSES, RegistryError


def daemon_line(daemon: statusreport.Daemon, lock_holder_shown: bool) -> str:
    holder, running = daemon.holder, daemon.running
    return (f"daemon     {f'running, {holder}' if running else 'not running'}"
            + (f" (lock held by {holder})" if lock_holder_shown and holder and not running
               else "")
            + (" (publishing paused)" if daemon.paused is not None else ""))


def attention_lines(problems: list[str]) -> list[str]:
    return ["NEEDS ATTENTION", *(f"  - {line}" for line in problems)]


def unreadable_text(cfg: Config, daemon: statusreport.Daemon, problems: list[str]) -> str:
    return "\n".join([f"registry   {cfg.registry_shown}: cannot be read",
                      daemon_line(daemon, lock_holder_shown=False),
                      *attention_lines(problems)])


def status_text(cfg: Config, report: statusreport.Report) -> str:
    """The summary, section by section; the verdict last."""
    lines = [f"registry   {cfg.registry_shown}", daemon_line(report.daemon, True)]
    lines += _nodes(report) + _products(report) + _held(report) + _failed(report)
    lines += _events(cfg, report) + _unclaimed(report) + _stale(cfg, report)
    lines += _findings(report)
    if report.problems:
        lines += attention_lines(report.problems)
    else:
        lines.append("ok: nothing needs an operator")
    return "\n".join(lines)


def _nodes(report: statusreport.Report) -> list[str]:
    return [f"node       {b.node}: pid {b.pid} on {b.host}, last heard from "
            f"{age(b.age_seconds)} ago" + (" (STOPPED? no heartbeat)" if b.stale else "")
            for b in report.health.nodes]


def _products(report: statusreport.Report) -> list[str]:
    counts, oldest, last, health = report.counts, report.oldest, report.last, report.health
    lines = ["products   " + ", ".join(f"{counts[s]} {s}" for s in STATUSES)]
    if oldest is not None:
        lines.append(f"oldest waiting  {oldest.data_id} "
                     f"(waiting {age(report.now - oldest.staged_at)})")
    lines.append(f"failures in the last hour  {report.failures}")
    lines.append(f"success rate  last hour {rate(health.success_rate_hour)} "
                 f"({health.published_hour} published, {health.failures_hour} failed "
                 f"attempts); last day {rate(health.success_rate_day)} "
                 f"({health.published_day} published, {health.failures_day} failed attempts)")
    if last is not None:
        lines.append(f"last published  {last.data_id} at {when(last.published_at)}")
    return lines


def _held(report: statusreport.Report) -> list[str]:
    held = report.held
    if not held:
        return []
    return [f"held  {len(held)} waiting product{plural(len(held))} not published "
            "automatically (`contimg-publisher show DATA_ID`)",
            *(f"  {r.data_id}  {why}" for r, why in held)]


def _failed(report: statusreport.Report) -> list[str]:
    failed = report.health.failed
    if not failed:
        return []
    return [f"failed  {len(failed)} product{plural(len(failed))} waiting for an operator "
            "(`contimg-publisher show DATA_ID`, then `retry`)",
            *(f"  {r.data_id}  {one_line(r.publish_error, 100)}" for r in failed)]


def _events(cfg: Config, report: statusreport.Report) -> list[str]:
    if not report.health.sinks:
        return ["events     no sink configured ([notify] url, command): kept, sent nowhere"]
    lines = []
    for k in report.health.sinks:
        waited = "" if k.oldest_undelivered_at is None else \
            f", the oldest waiting {age(report.now - k.oldest_undelivered_at)}"
        failing = f"; {k.attempts} failed attempts, last: {one_line(k.last_error, 80)}" \
            if k.attempts else ""
        dead = f"; {k.dead} given up on" if k.dead else ""
        target = cfg.sink_targets.get(k.sink)
        lines.append(f"events     {k.sink}: {k.undelivered} undelivered{waited}{failing}{dead}"
                     + (f"; sent to {target}" if target else ""))
    return lines


def _unclaimed(report: statusreport.Report) -> list[str]:
    unclaimed = report.health.unclaimed
    if not unclaimed:
        return []
    return [f"unclaimed in staging  {len(unclaimed)} file{plural(len(unclaimed))} that no "
            "product owns (nothing is deleted; publish, move or remove them by hand)",
            *(f"  {u.path}  unchanged for {age(report.now - u.changed_at)}: {u.reason}"
              for u in unclaimed)]


def _stale(cfg: Config, report: statusreport.Report) -> list[str]:
    stale = report.stale
    if not stale:
        return []
    where = f"`contimg-publisher quarantine` moves them to {cfg.quarantine_dir}" \
        if cfg.quarantine_dir is not None else "nothing is deleted; set [hygiene] " \
        "quarantine_dir to move them out with `contimg-publisher quarantine`"
    return [f"stale in staging  {len(stale)} rejected or unclaimed file{plural(len(stale))} "
            f"unchanged for over {age(cfg.hygiene_report_after_seconds)} ({where})",
            *(f"  {item.kind:9} {item.path}  unchanged for "
              f"{age(report.now - item.changed_at)}: {one_line(item.reason)}"
              for item in stale)]


def _findings(report: statusreport.Report) -> list[str]:
    health = report.health
    if not health.findings:
        return []
    total = health.finding_total
    return [f"archive audit  {total} open finding{plural(total)} (last full pass "
            f"{when(health.audit_last_pass)})",
            *(f"  {f.kind:16} {f.path}  {one_line(f.detail)}" for f in health.findings)]


def cmd_status(cfg: Config, args: argparse.Namespace) -> int:
    daemon = statusreport.daemon_state(cfg)
    try:
        with open_for_reading(cfg) as registry:
            report = statusreport.read(cfg, registry, daemon)
    except RegistryError as exc:
        # The registry cannot be read: say why, and what the daemon says, rather than only
        # failing.
        problems, data = statusreport.unreadable(cfg, exc, daemon)
        print(json.dumps(data, indent=2) if args.json
              else unreadable_text(cfg, daemon, problems))
        print(f"contimg-publisher: status: {exc}", file=sys.stderr)
        return EXIT_FAILED
    if args.json:
        print(json.dumps(statusreport.as_json(cfg, report), indent=2))
    else:
        print(status_text(cfg, report))
    return EXIT_FAILED if report.problems else EXIT_OK
