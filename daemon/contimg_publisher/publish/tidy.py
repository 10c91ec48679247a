"""After detection: what a published product left in staging, cleaned up. A staged copy
proven identical to the archived one is removed (left by a crash before REMOVE_SOURCE, or
written again with the same bytes); a sidecar that arrived after its product was
published goes beside it."""

from __future__ import annotations

import contextlib
import os
from enum import StrEnum
from typing import Any, NamedTuple

from contimg_publisher import detect, kinds, paths, transfer
from contimg_publisher.publish.context import Context
from contimg_publisher.publish.folders import StagedAndPublished
from contimg_publisher.publish.naming import Sidecar, rule_for, sidecar_destination
from contimg_publisher.publish.sidecars import copy_sidecar, move_sidecar, staged_sidecars
from contimg_publisher.publish.sources import remove_source
from contimg_publisher.registry import Product
from contimg_publisher.states import Detected
from contimg_publisher.transfer import PublishFailure


class Tidied(StrEnum):
    """What was done with something left in staging beside a published product."""

    REMOVED = "removed"                      # the published inode's staged name, after a crash
    IDENTICAL_REMOVED = "identical_removed"  # written again with the archived bytes
    PUBLISHED = "published"                  # a late sidecar, now beside its product
    KEPT = "kept"                            # not proven identical: left where it is

    @property
    def event(self) -> str:
        return {"removed": "leftover_removed",
                "identical_removed": "identical_rerun_removed"}.get(self.value, "leftover_kept")


class LateSidecar(NamedTuple):
    """One sidecar found beside a published product's staged name, and what became of it."""

    sidecar: str        # its staged path, for display
    done: Tidied
    why: str


def tidy(ctx: Context, outcome: detect.Outcome) -> list[tuple[str, dict[str, Any]]]:
    """What a detection outcome leaves to clean up in staging, done; returns the events
    to log (name, fields). Shared by the daemon's loop and `scan`."""
    product = outcome.product
    if product is None:
        return []
    events: list[tuple[str, dict[str, Any]]] = []
    try:
        if outcome.action is Detected.LEFTOVER:
            done = remove_leftover(ctx, product)
            if done is not Tidied.KEPT:
                events.append((done.event, {
                    "data_id": product.data_id, "stage_path": outcome.stage_path,
                    "published_path": product.published_path}))
        elif outcome.action is Detected.LATE_SIDECAR:
            for sidecar, done, why in publish_late_sidecars(ctx, product):
                events.append((f"late_sidecar_{done.value}", {
                    "data_id": product.data_id, "sidecar": sidecar,
                    "published_path": product.published_path, "reason": why}))
    except (OSError, paths.UnsafePath) as exc:
        text = transfer.os_text(exc) if isinstance(exc, OSError) else \
            f"{exc.path}: {exc.reason}"
        events.append(("leftover_kept", {"data_id": product.data_id,
                                         "stage_path": outcome.stage_path, "error": text}))
    except PublishFailure as exc:
        events.append(("leftover_kept", {"data_id": product.data_id,
                                         "stage_path": outcome.stage_path,
                                         "error": str(exc)}))
    return events


def remove_leftover(ctx: Context, product: Product) -> Tidied:
    """A published product's staged copy is still there: left by a crash before
    REMOVE_SOURCE (the same inode), or written again with the same bytes (a new inode).
    Removed only when proven identical: the same inode, or the same bytes hashed again on
    both sides."""
    cfg = ctx.config
    rule = rule_for(cfg, product.data_type)
    if rule is None or product.identity is None or not product.published_path:
        return Tidied.KEPT
    stage_root = os.fsencode(str(cfg.stage_root))
    parts = paths.relative_components(stage_root, product.stage_bytes)
    published = paths.undisplay(product.published_path)
    if not os.path.lexists(published):
        return Tidied.KEPT
    with StagedAndPublished(stage_root, parts, published,
                            os.fsencode(str(cfg.products_root))) as where:
        if where.src_parent < 0:
            return Tidied.KEPT
        final = os.path.basename(published)
        found = [
            Sidecar(sc.name, sidecar_destination(sc.name, parts[-1], final, rule))
            for sc in staged_sidecars(ctx, where.src_parent, parts[-1], rule)
        ] if kinds.of(rule).has_sidecars else []
        before = transfer.exists(where.src_parent, parts[-1])
        remove_source(where.src_parent, parts[-1], product.identity, rule, found,
                      where.dest_fd, product.checksum)
        if before and not transfer.exists(where.src_parent, parts[-1]):
            return Tidied.REMOVED
        if before and kinds.of(rule) is kinds.FILE and transfer.rerun_identical(
                where.src_parent, parts[-1], where.dest_fd, final, product.checksum):
            paths.fsync_dir(where.src_parent)
            return Tidied.IDENTICAL_REMOVED
        return Tidied.KEPT


def publish_late_sidecars(ctx: Context, product: Product) -> list[LateSidecar]:
    """Sidecars that arrived after their product was published go beside it, under the
    name it was published as; one already there with the same bytes only loses its
    staged copy; one there with other bytes is kept in staging, with the reason.
    Returns what was done with each, and why."""
    cfg = ctx.config
    rule = rule_for(cfg, product.data_type)
    if rule is None or not kinds.of(rule).has_sidecars or not product.published_path:
        return []
    stage_root = os.fsencode(str(cfg.stage_root))
    parts = paths.relative_components(stage_root, product.stage_bytes)
    published = paths.undisplay(product.published_path)
    final = os.path.basename(published)
    staging_folder = os.path.join(stage_root, *parts[:-1])
    out: list[LateSidecar] = []
    with StagedAndPublished(stage_root, parts, published,
                            os.fsencode(str(cfg.products_root))) as where:
        src_parent, dest_fd = where.src_parent, where.dest_fd
        if src_parent < 0 or dest_fd < 0:
            return []
        placed: list[Sidecar] = []
        for sc in staged_sidecars(ctx, src_parent, parts[-1], rule):
            sc.dest_name = sidecar_destination(sc.name, parts[-1], final, rule)
            shown = paths.display(os.path.join(staging_folder, sc.name))
            if transfer.exists(dest_fd, sc.dest_name):
                if transfer.files_equal_across(src_parent, sc.name, dest_fd, sc.dest_name):
                    os.unlink(sc.name, dir_fd=src_parent)
                    out.append(LateSidecar(
                        shown, Tidied.IDENTICAL_REMOVED,
                        "the same bytes are already archived beside the product"))
                else:
                    out.append(LateSidecar(
                        shown, Tidied.KEPT, f"a different {paths.display(sc.dest_name)} is "
                        "already archived beside the product"))
                continue
            if paths.same_filesystem(src_parent, dest_fd):
                move_sidecar(ctx, src_parent, dest_fd, staging_folder, sc, product)
            else:
                fd = os.open(sc.name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC,
                             dir_fd=src_parent)
                try:
                    copy_sidecar(ctx, dest_fd, sc, fd, product, cfg.checksum_algorithm, None)
                finally:
                    os.close(fd)
            placed.append(sc)
            there = os.path.join(os.path.dirname(published), sc.dest_name)
            out.append(LateSidecar(shown, Tidied.PUBLISHED,
                                   f"published as {paths.display(there)}"))
        if placed:
            paths.fsync_dir(dest_fd)
            paths.fsync_dir(src_parent)
            ctx.registry.add_sidecars(product.data_id,
                                      [os.fsdecode(sc.dest_name) for sc in placed])
            # A copy leaves its staged name until the record is durable.
            for sc in placed:
                with contextlib.suppress(FileNotFoundError):
                    if not sc.placed and transfer.files_equal_across(
                            src_parent, sc.name, dest_fd, sc.dest_name):
                        os.unlink(sc.name, dir_fd=src_parent)
        if out:
            paths.fsync_dir(src_parent)
    return out
