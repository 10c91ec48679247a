"""`list` and `show`: products as the registry records them, with why a waiting one waits."""

from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import dataclass
from typing import Any

from contimg_publisher import rules, space
from contimg_publisher.cli.common import EXIT_FAILED, EXIT_OK, UsageError, open_for_reading
from contimg_publisher.cli.text import one_line, table, when
from contimg_publisher.config import Config
from contimg_publisher.registry import HELD_BY_OPERATOR, Failure, Product, RegistryBackend
from contimg_publisher.states import Status

# --- why a waiting product waits ---------------------------------------------------------------

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
    reasons = registry.qa_holds([r.data_id for r in waiting])
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


def product_json(cfg: Config, row: Product, qa_reasons: dict[str, str]) -> dict[str, Any]:
    data = row.to_json()
    reason = held_reason(row, qa_reasons)
    data["held"] = data["held"] or reason is not None
    data["held_reason"] = reason
    data["owned"] = rules.owns(cfg, row)
    return data


# --- list --------------------------------------------------------------------------------------

def list_text(rows: list[Product], reasons: dict[str, str]) -> str:
    def shown(r: Product) -> str:
        if r.status == Status.PUBLISHED:
            return r.published_path or "-"
        held = held_reason(r, reasons)
        return f"held: {held}" if held else r.publish_error or r.stage_path

    return table([[r.data_id, r.data_type, r.status, str(r.publish_attempts),
                   when(r.published_at or r.staged_at), one_line(shown(r), 70)]
                  for r in rows],
                 ["DATA_ID", "TYPE", "STATUS", "ATTEMPTS", "WHEN", "PATH / ERROR"])


def cmd_list(cfg: Config, args: argparse.Namespace) -> int:
    if args.limit < 0:
        raise UsageError("--limit must be >= 0")
    with open_for_reading(cfg) as registry:
        rows = registry.products(status=args.status, data_type=args.data_type,
                                 limit=args.limit or None)
        reasons = wait_reasons(cfg, registry, rows)
    if args.json:
        print(json.dumps([product_json(cfg, r, reasons) for r in rows], indent=2))
    else:
        print(list_text(rows, reasons))
    return EXIT_OK


# --- show --------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Shown:
    """One product with what `show` tells about it."""

    row: Product
    history: list[Failure]
    relations: list[dict[str, str]]
    reasons: dict[str, str]


def read_product(cfg: Config, registry: RegistryBackend, data_id: str) -> Shown | None:
    row = registry.get(data_id)
    if row is None:
        return None
    return Shown(row, registry.history(row.data_id), registry.relationships(row.data_id),
                 wait_reasons(cfg, registry, [row]))


def show_json(cfg: Config, shown: Shown) -> dict[str, Any]:
    data = product_json(cfg, shown.row, shown.reasons)
    data["failures"] = [f.to_json() for f in shown.history]
    data["relationships"] = shown.relations
    return data


def show_text(cfg: Config, shown: Shown) -> str:
    row = shown.row
    held = held_reason(row, shown.reasons)
    out = [f"{row.data_id}  ({row.data_type}, {row.status}"
           + (", held" if held or not row.auto_publish_enabled else "") + ")",
           f"  staged      {row.stage_path}",
           f"  published   {row.published_path or '-'}",
           f"  size        {row.size_bytes if row.size_bytes is not None else '-'} bytes",
           f"  checksum    {_checksum_text(row)}",
           f"  staged at   {when(row.staged_at)}",
           f"  published at {when(row.published_at)} ({row.publish_mode or '-'})",
           f"  attempts    {row.publish_attempts}",
           f"  next try    "
           f"{when(row.next_attempt_at) if row.status == Status.STAGING else '-'}",
           f"  last error  {one_line(row.publish_error, 200)}"]
    if held:
        out.append(f"  held        {held}")
    if not rules.owns(cfg, row):
        out.append("  owner       another writer: no product rule of this configuration "
                   "owns this row (its type and path); the daemon leaves it as it is")
    if row.metadata:
        pairs = ", ".join(f"{k}={v}" for k, v in sorted(row.metadata.items()))
        out.append(f"  metadata    {pairs}")
    if row.sidecars:
        out.append("  sidecars    " + ", ".join(row.sidecars))
    for rel in shown.relations:
        out.append(f"  {rel['parent']} {rel['type']} {rel['child']}")
    if shown.history:
        out.append("  failure history:")
        out.append(table([[when(f.at), str(f.attempt), f.kind, f"{f.host}:{f.pid}",
                           one_line(f.error, 100)] for f in shown.history],
                         ["    AT", "ATTEMPT", "KIND", "WHERE", "ERROR"]))
    return "\n".join(out)


def _checksum_text(row: Product) -> str:
    if row.checksum_pending:
        return "- (computed by the copy that publishes it)"
    return row.checksum or "-"


def cmd_show(cfg: Config, args: argparse.Namespace) -> int:
    with open_for_reading(cfg) as registry:
        shown = read_product(cfg, registry, args.data_id)
    if shown is None:
        print(f"contimg-publisher: show: no product {args.data_id!r}", file=sys.stderr)
        return EXIT_FAILED
    print(json.dumps(show_json(cfg, shown), indent=2) if args.json else show_text(cfg, shown))
    return EXIT_OK
