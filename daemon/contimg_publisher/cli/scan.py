"""`scan` (one pass, then exit) and `run` (the daemon): both hand the work to service."""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from typing import TYPE_CHECKING

from contimg_publisher import logs
from contimg_publisher.cli.common import EXIT_FAILED, EXIT_OK
from contimg_publisher.config import Config
from contimg_publisher.states import Attempt, Detected

if TYPE_CHECKING:
    from contimg_publisher.detect import Outcome
    from contimg_publisher.publish import Result

# What `scan` prints a line for; the others (unchanged, busy, ...) are counted nowhere.
SHOWN = (Detected.REGISTERED, Detected.UPDATED, Detected.REJECTED, Detected.VANISHED,
         Detected.LEFTOVER, Detected.FOUND_PUBLISHED, Detected.DEFERRED)


def run_daemon(path: str) -> int:
    from contimg_publisher import service  # astropy and watchdog: only where needed
    return service.run(path)


def scan_text(detected: Sequence[Outcome], reconciled: Sequence[Result],
              published: Sequence[Result], waiting: int) -> tuple[str, bool]:
    """The pass as `scan` prints it, and whether a publish failed."""
    lines = []
    failed = rejected = 0
    for outcome in detected:
        if outcome.action in SHOWN:
            extra = f" ({outcome.reason})" if outcome.reason else ""
            lines.append(f"{outcome.action:10} {outcome.data_id}  {outcome.stage_path}{extra}")
    for result in reconciled:
        lines.append(f"{'reconciled':10} {result.data_id}  -> {result.status}")
    for result in published:
        if result.status is Attempt.PUBLISHED:
            lines.append(f"{Attempt.PUBLISHED:10} {result.data_id}  -> {result.published_path}")
        elif result.status is Attempt.REJECTED:
            # Bad input found by the copy's read, as detection would have found it.
            rejected += 1
            lines.append(f"{Attempt.REJECTED:10} {result.data_id}  ({result.error})")
        else:
            failed += 1
            lines.append(f"{result.status:10} {result.data_id}  ({result.kind}: {result.error})")
    rejected += sum(o.action == Detected.REJECTED for o in detected)
    registered = sum(o.action in (Detected.REGISTERED, Detected.UPDATED) for o in detected)
    lines.append(f"scan: {registered} registered, "
                 f"{sum(r.status is Attempt.PUBLISHED for r in published)} published, "
                 f"{failed} failed, {rejected} rejected, {waiting} still settling")
    return "\n".join(lines), failed > 0


def cmd_scan(cfg: Config, args: argparse.Namespace) -> int:
    from contimg_publisher import service  # astropy and watchdog: only where needed
    report = service.scan_once(cfg, logs.get_logger())
    text, failed = scan_text(report.detected, report.reconciled, report.published,
                             report.waiting)
    print(text)
    return EXIT_FAILED if failed else EXIT_OK
