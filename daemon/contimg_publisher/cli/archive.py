"""`audit`, `rebuild` and `quarantine`: the products area read back against the registry,
rows made again from it, and staging's leftovers moved aside."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import TYPE_CHECKING, Any

from contimg_publisher import hygiene, lock, logs
from contimg_publisher.cli.common import EXIT_FAILED, EXIT_OK, UsageError, open_for_reading
from contimg_publisher.cli.text import one_line, plural
from contimg_publisher.config import Config
from contimg_publisher.registry import Quarantined, open_registry

if TYPE_CHECKING:
    from contimg_publisher import audit, rebuild

# --- audit -------------------------------------------------------------------------------------

def audit_json(cfg: Config, report: audit.Report) -> dict[str, Any]:
    return {"ok": not report.findings, "products_root": str(cfg.products_root),
            "checked": report.checked, "bytes_read": report.bytes_read,
            "seconds": round(report.seconds, 3),
            "findings": [f.to_json() for f in report.findings],
            "skipped": [{"path": p, "reason": why} for p, why in report.skipped]}


def audit_text(report: audit.Report) -> str:
    lines = [f"{f.kind:16} {f.path}" + (f"  ({f.data_id})" if f.data_id else "")
             + f"  {f.detail}" for f in report.findings]
    lines += [f"{'skipped':16} {path}  {why}" for path, why in report.skipped]
    lines.append(f"audit: {report.checked} products read back ({report.bytes_read} bytes in "
                 f"{report.seconds:.1f} s), {len(report.findings)} finding"
                 f"{plural(len(report.findings))}")
    return "\n".join(lines)


def cmd_audit(cfg: Config, args: argparse.Namespace) -> int:
    """Exit 1 with the list when anything is wrong. Only reads: nothing in the products area
    or the registry is changed (the daemon's own pass keeps the findings table)."""
    from contimg_publisher import (
        audit,  # numpy (FITS reading): only where needed
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

    with open_for_reading(cfg) as registry:
        report = audit.run(cfg, registry,
                           audit.Throttle(args.bytes_per_second), sub, progress)
    print(json.dumps(audit_json(cfg, report), indent=2) if args.json else audit_text(report))
    return EXIT_FAILED if report.findings else EXIT_OK


# --- rebuild -----------------------------------------------------------------------------------

def rebuild_json(report: rebuild.Report) -> dict[str, Any]:
    return {"created": [{"data_id": r.data_id, "data_type": r.data_type,
                         "published_path": r.published_path, "size_bytes": r.size_bytes,
                         "checksum": r.checksum, "sidecars": list(r.sidecars)}
                        for r in report.created],
            "already_recorded": report.recorded,
            "skipped": [{"path": p, "reason": why} for p, why in report.skipped]}


def rebuild_text(report: rebuild.Report) -> str:
    lines = [f"{'rebuilt':8} {r.data_id}  {r.published_path}  {r.checksum}"
             for r in report.created]
    lines += [f"{'skipped':8} {path}  {why}" for path, why in report.skipped]
    lines.append(f"rebuild: {len(report.created)} rows created, {report.recorded} products "
                 f"already recorded, {len(report.skipped)} skipped")
    return "\n".join(lines)


def cmd_rebuild(cfg: Config, args: argparse.Namespace) -> int:
    """Under the lock (so never beside a running daemon), on the registry as it is or a new
    one: a lost registry is exactly the case this is for."""
    from contimg_publisher import rebuild  # numpy (FITS reading): only where needed
    with lock.acquire(str(cfg.lock_path), "rebuild", wait_seconds=0), \
            open_registry(cfg) as registry:
        report = rebuild.rebuild(cfg, registry)
    print(json.dumps(rebuild_json(report), indent=2) if args.json else rebuild_text(report))
    return EXIT_FAILED if report.skipped else EXIT_OK


# --- quarantine --------------------------------------------------------------------------------

def stale_text(items: list[hygiene.Stale]) -> str:
    lines = [f"{'would move':10} {item.kind:9} {item.path}  {one_line(item.reason)}"
             for item in items]
    lines.append(f"quarantine: {len(items)} file{plural(len(items))} would be moved")
    return "\n".join(lines)


def quarantine_json(moved: list[Quarantined], kept: list[tuple[str, str]]) -> dict[str, Any]:
    return {"moved": [m.to_json() for m in moved],
            "kept": [{"path": p, "reason": why} for p, why in kept]}


def quarantine_text(moved: list[Quarantined], kept: list[tuple[str, str]]) -> str:
    lines = [f"{'moved':6} {m.original_path} -> {m.quarantine_path}  ({m.how})" for m in moved]
    lines += [f"{'kept':6} {path}  {why}" for path, why in kept]
    lines.append(f"quarantine: {len(moved)} moved, {len(kept)} left in place")
    return "\n".join(lines)


def cmd_quarantine(cfg: Config, args: argparse.Namespace) -> int:
    if cfg.quarantine_dir is None and not args.dry_run:
        raise UsageError("quarantine: no [hygiene] quarantine_dir is configured; nothing is "
                         "moved (`--dry-run` lists what would be)")
    with open_for_reading(cfg) as registry:
        if args.dry_run:
            now = time.time()
            items = hygiene.stale(cfg, registry, now)
            print(json.dumps([s.to_json(now) for s in items], indent=2) if args.json
                  else stale_text(items))
            return EXIT_OK
        moved, kept = hygiene.quarantine(cfg, registry, logs.get_logger())
    print(json.dumps(quarantine_json(moved, kept), indent=2) if args.json
          else quarantine_text(moved, kept))
    return EXIT_FAILED if kept else EXIT_OK
