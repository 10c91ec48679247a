"""What the main loop does with the publish thread's results.

Each outcome is logged and counted once (a product waiting for room is said once, not at
every try), the watch is kept in step with the daemon's own renames out of staging (their
events are dropped, see watch.OwnMoves), and a publish that died in the thread is
resolved by the loop rather than left `publishing` under this process's live lease until
a restart.
"""

from __future__ import annotations

import os
import queue
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from contimg_publisher import detect, metrics, paths, publish, reconcile, watch, worker, writers
from contimg_publisher.config import Config
from contimg_publisher.registry import TRANSIENT, Product, RegistryBackend, RegistryGone
from contimg_publisher.scanpass import log_result
from contimg_publisher.states import Attempt, FailureKind


@dataclass
class Results:
    """What the loop keeps of the results between turns, and what it keeps in step."""

    own_moves: watch.OwnMoves
    changes: queue.SimpleQueue[watch.Change | str]  # the watch's, for an event given back
    tracker: writers.WriteTracker
    waiting_for_space: set[str] = field(default_factory=set)  # whose wait was logged
    last_published: str | None = None  # for STATUS=
    # Publishes that died inside the publish thread, resolved by the loop.
    abandoned: list[str] = field(default_factory=list)


def event_path(product: Product) -> str:
    """The product's staged path as the watch names it in its events (os.fsdecode form)."""
    return os.fsdecode(product.stage_bytes)


def _not_moved(kept: Results, products: Iterable[Product]) -> None:
    """The publishes from these paths did not happen: an event the watch dropped for one
    (another hand moved the file) is handled as any other."""
    for product in products:
        change = kept.own_moves.release(event_path(product))
        if change is not None:
            kept.changes.put(change)


def _moved_out(kept: Results, detector: detect.Detector, product: Product) -> None:
    """What the event of our own rename out of staging would have done (the tracker and the
    detector forget the path; the registry need not be asked whether a row still waits
    there, its row is the one just published)."""
    path = event_path(product)
    kept.own_moves.published(path)
    kept.tracker.moved(path, "")
    detector.drop(path)


def collect(kept: Results, detector: detect.Detector, products: list[Product],
            outcome: worker.Outcome, log: Any, observed: metrics.Metrics, max_attempts: int,
            wake_delivery: Callable[[], None]) -> Exception | None:
    """A batch the publish thread finished (its results, or what it raised). Returns the
    registry's error when the registry is gone or unavailable, for the loop to stop or
    pause on; the batch's rows are then resolved once the registry is back."""
    if not isinstance(outcome, Exception):
        for product, result in zip(products, outcome, strict=True):
            _after_publish(kept, detector, product, result, log, observed, max_attempts)
        if any(result.status is Attempt.PUBLISHED for result in outcome):
            # The batch's events are committed; never waited for. Once a batch, not once a
            # product: each wake-up is the delivery thread taking the GIL.
            wake_delivery()
        return None
    _not_moved(kept, products)
    if isinstance(outcome, RegistryGone):
        return outcome
    if isinstance(outcome, TRANSIENT):  # nothing was removed; resolved once back
        kept.abandoned.extend(product.data_id for product in products)
        return outcome
    _crashed(kept, products, outcome, log, observed)
    return None


def _after_publish(kept: Results, detector: detect.Detector, product: Product,
                   result: publish.Result, log: Any, observed: metrics.Metrics,
                   max_attempts: int) -> None:
    if result.status is Attempt.PUBLISHED:
        _moved_out(kept, detector, product)
    else:
        _not_moved(kept, [product])
    if result.status is Attempt.DEFERRED:
        if result.data_id in kept.waiting_for_space:
            return  # said once; tried again after the backoff, quietly
        kept.waiting_for_space.add(result.data_id)
    else:
        kept.waiting_for_space.discard(result.data_id)
    log_result(log, result, max_attempts)
    observed.observe_result(result, product.size_bytes)
    if result.status is Attempt.PUBLISHED:
        kept.last_published = f"{result.data_id} at {time.strftime('%H:%M:%S')}"
    if result.kind == FailureKind.SOURCE_CHANGED:
        detector.note(product.stage_bytes)


def _crashed(kept: Results, products: list[Product], exc: Exception, log: Any,
            observed: metrics.Metrics) -> None:
    """The publish thread raised on this batch: said per product, resolved by the loop."""
    for product in products:
        log.error("publish_crashed", data_id=product.data_id,
                  data_type=product.data_type, stage_path=product.stage_path,
                  error=f"{type(exc).__name__}: {exc}",
                  action="resolved from disk and the row by this process")
        observed.observe_crash()
        kept.abandoned.append(product.data_id)


def resolve_abandoned(kept: Results, cfg: Config, registry: RegistryBackend, owner: str,
                      log: Any) -> None:
    """A RegistryError here leaves them for the next turn (the loop logs it)."""
    resolved = reconcile.resolve_own(cfg, registry, owner, kept.abandoned, log)
    kept.abandoned = []
    for result in resolved:
        _log_reconciled(log, result)


def reconciled(log: Any, detector: detect.Detector, done: list[publish.Result],
               exhausted: list[str], max_attempts: int, startup: bool) -> None:
    """Interrupted publishes resolved, each said; a legacy row requeued has never been
    described, so its file is looked at now (at start-up the first scan does that)."""
    for result in done:
        _log_reconciled(log, result)
        if result.status is Attempt.REQUEUED and not startup:
            detector.note(paths.undisplay(result.stage_path))
    for data_id in exhausted:
        log.error("max_attempts_reached", data_id=data_id, max_attempts=max_attempts,
                  error="attempts already at the limit when the daemon started",
                  action=f"contimg-publisher show {data_id}; then retry")


def _log_reconciled(log: Any, result: publish.Result) -> None:
    log.warning("reconciled", data_id=result.data_id, data_type=result.data_type,
                stage_path=result.stage_path, outcome=result.status,
                published_path=result.published_path)
