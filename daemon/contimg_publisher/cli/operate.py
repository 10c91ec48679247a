"""`retry`, `publish`, `hold` and `release`: what an operator asks of one product."""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass, field

from contimg_publisher import logs, roots
from contimg_publisher.cli.common import EXIT_FAILED, EXIT_OK, UsageError, open_for_reading
from contimg_publisher.config import Config
from contimg_publisher.registry import RegistryBackend
from contimg_publisher.states import Attempt, Status

# --- retry -------------------------------------------------------------------------------------

@dataclass
class Retried:
    """What `retry` did: the rows due again, and those left as they are with the reason."""

    changed: list[str] = field(default_factory=list)
    refused: dict[str, str] = field(default_factory=dict)    # another staging root's rows
    missing: list[tuple[str, str]] = field(default_factory=list)  # (data_id, why)


def retry(cfg: Config, registry: RegistryBackend, data_ids: list[str],
          all_failed: bool) -> Retried:
    rows = registry.by_status(Status.FAILED) if all_failed else \
        [row for d in data_ids if (row := registry.get(d)) is not None]
    # A row under a staging root the configuration no longer names would wait where
    # nothing looks: it keeps its operator state, with the reason (roots.py).
    refused = {row.data_id: why for row in rows
               if (why := roots.registered_elsewhere(cfg, row)) is not None}
    wanted = [row.data_id for row in rows if row.data_id not in refused] \
        if all_failed else [d for d in data_ids if d not in refused]
    changed = registry.retry(wanted) if wanted else []
    missing = []
    for data_id in data_ids:
        if data_id not in changed and data_id not in refused:
            row = registry.get(data_id)
            missing.append((data_id, "no such product" if row is None
                            else f"status {row.status}, nothing to retry"))
    return Retried(changed, refused, missing)


def cmd_retry(cfg: Config, args: argparse.Namespace) -> int:
    if not args.data_ids and not args.all_failed:
        raise UsageError("retry: name DATA_IDs or give --all-failed")
    if args.data_ids and args.all_failed:
        raise UsageError("retry: DATA_IDs and --all-failed exclude each other")
    with open_for_reading(cfg) as registry:
        done = retry(cfg, registry, args.data_ids, args.all_failed)
    for data_id in done.changed:
        print(f"{data_id}: due again")
    for data_id, why in done.refused.items():
        print(f"{data_id}: not retried: {why}", file=sys.stderr)
    for data_id, why in done.missing:
        print(f"{data_id}: {why}", file=sys.stderr)
    return EXIT_FAILED if done.missing or done.refused else EXIT_OK


# --- publish -----------------------------------------------------------------------------------

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


# --- hold and release --------------------------------------------------------------------------

def _hold(cfg: Config, data_id: str, held: bool) -> int:
    with open_for_reading(cfg) as registry:
        if not registry.set_hold(data_id, held):
            print(f"contimg-publisher: no product {data_id!r}", file=sys.stderr)
            return EXIT_FAILED
    print(f"{data_id}: {'held: not published automatically' if held else 'released'}")
    return EXIT_OK


def cmd_hold(cfg: Config, args: argparse.Namespace) -> int:
    return _hold(cfg, args.data_id, True)


def cmd_release(cfg: Config, args: argparse.Namespace) -> int:
    return _hold(cfg, args.data_id, False)
