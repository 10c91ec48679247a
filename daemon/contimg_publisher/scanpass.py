"""One pass over the staging area: reconcile, detect, register, claim, publish.

`scan` runs the steps once, in order; the running daemon runs the same steps (the first
pass at start-up, then as the watch and its deadlines ask), with the copies in its publish
thread. The registry is opened here, the one way both do.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from contimg_publisher import detect, publish, reconcile, rules, writers
from contimg_publisher.config import Config
from contimg_publisher.registry import (
    Product,
    RegistryBackend,
    open_registry,
    refuse_new_over_archive,
)
from contimg_publisher.states import Attempt, Detected

# The daemon and `scan` publish in batches that share their commits and folder fsyncs; the
# byte bound keeps a batch of large copies from holding its claims (and their commits) for
# long, and a lone large product is a batch of its own.
SCAN_BATCH = 256
SCAN_BATCH_BYTES = 256 << 20

TIDY_ACTIONS = (Detected.LEFTOVER, Detected.LATE_SIDECAR)


def open_checked(cfg: Config, migrate: bool = True) -> RegistryBackend:
    """The registry the configuration names, never a new empty one beside an archive that
    already has products (the registry was lost: restore it, or `rebuild`)."""
    refuse_new_over_archive(cfg.registry, cfg.products_root)
    return open_registry(cfg, migrate=migrate)


@dataclass
class PassReport:
    detected: list[detect.Outcome] = field(default_factory=list)
    published: list[publish.Result] = field(default_factory=list)
    reconciled: list[publish.Result] = field(default_factory=list)
    waiting: int = 0


def publish_batch(cfg: Config, registry: RegistryBackend, owner: str, log: Any,
                  products: list[Product], gate: writers.WriterGate | None = None,
                  mode: str = "auto", cancel: threading.Event | None = None,
                  stop: threading.Event | None = None) -> list[publish.Result]:
    """Publish claimed rows together: their durable steps share commits and fsyncs."""
    return publish.Publisher(cfg, registry, owner, log, gate).publish_many(
        products, mode=mode, cancel=cancel, stop=stop)


class Pass:
    """The steps of a pass over one registry connection, owned by one thread."""

    def __init__(self, cfg: Config, registry: RegistryBackend, owner: str, log: Any,
                 gate: writers.WriterGate | None = None) -> None:
        self.cfg = cfg
        self.registry = registry
        self.owner = owner
        self.log = log
        self.gate = gate
        self.detector = detect.Detector(cfg, registry, gate=gate)

    def reconfigure(self, cfg: Config) -> None:
        self.cfg = cfg
        self.detector.reconfigure(cfg)

    def reconcile(self, sweep: bool) -> tuple[list[publish.Result], list[str]]:
        """Publishes a crash interrupted, resolved from disk; then the rows whose attempts
        are used up (data_ids). `sweep`: also walk the products area for stray temporary
        files (the daemon does that in slices instead, see reconcile.stray_temp_sweep)."""
        cfg = self.cfg
        results = reconcile.reconcile(cfg, self.registry, self.owner, self.log, sweep=sweep)
        exhausted = self.registry.mark_exhausted(cfg.max_attempts,
                                                 owns=lambda row: rules.owns(cfg, row))
        return results, exhausted

    def park(self, old_root: Path | None = None) -> None:
        park_outside_root(self.cfg, self.registry, self.log, old_root)

    def walk(self) -> dict[str, int]:
        """Every rule's folder walked: new or changed paths wait to settle."""
        stats = self.detector.scan()
        self.log_walk_problems()
        return stats

    def log_walk_problems(self) -> None:
        """Folders of the staging area a walk did not enter: each said once while it lasts."""
        for problem in self.detector.take_problems():
            self.log.warning("folder_not_walked", path=problem.path, problem=problem.kind,
                             error=problem.reason,
                             action="what lies below it is not published; move it to a "
                                    "shallower folder or remove it")

    def tidy(self, outcome: detect.Outcome) -> None:
        """What a detection outcome leaves in staging (a leftover, a late sidecar)."""
        if outcome.action in TIDY_ACTIONS:
            publisher = publish.Publisher(self.cfg, self.registry, self.owner, self.log,
                                          self.gate)
            log_tidied(self.log, publisher.tidy(outcome))

    def claim(self) -> list[Product]:
        return self.registry.claim(self.owner, self.cfg.lease_seconds, limit=SCAN_BATCH,
                                   max_bytes=SCAN_BATCH_BYTES)

    def publish(self, claimed: list[Product]) -> list[publish.Result]:
        return publish_batch(self.cfg, self.registry, self.owner, self.log, claimed,
                             self.gate)

    def run_once(self) -> PassReport:
        """`scan`: every step once, publishing until nothing more is due."""
        report = PassReport()
        report.reconciled, _ = self.reconcile(sweep=True)
        self.park()
        self.walk()
        # Paths that finish settling within one settle time are taken in this same pass.
        report.detected = self.detector.settle(
            deadline=time.time() + self.cfg.settle_seconds + 0.5)
        report.waiting = len(self.detector.pending)
        for outcome in report.detected:
            self.tidy(outcome)
        while claimed := self.claim():
            report.published += self.publish(claimed)
        return report


def park_outside_root(cfg: Config, registry: RegistryBackend, log: Any,
                      old_root: Path | None = None) -> None:
    """Rows registered under another staging root wait for an operator, with the reason.

    Chosen over publishing them from the old root: that folder is no longer watched, and
    the configuration no longer names it as the staging area whose files may be moved
    away. Setting the old root back and `retry` publishes them."""
    was = f"registered under {old_root}" if old_root else "registered under another " \
        "staging root"
    reason = (f"{was}; [paths] stage_root is now {cfg.stage_root}. Move the file under the "
              "new root (it is found and published again), or set stage_root back and run "
              "`contimg-publisher retry DATA_ID`")
    parked = registry.park_outside_root(str(cfg.stage_root), [r.type for r in cfg.products],
                                        reason, cfg.error_max_chars)
    for data_id in parked:
        log.error("stage_root_changed", data_id=data_id, stage_root=str(cfg.stage_root),
                  error=reason, action=f"contimg-publisher show {data_id}")


def log_tidied(log: Any, events: list[tuple[str, dict[str, Any]]]) -> None:
    """What tidying the staging area did: a warning for what had to be kept."""
    for event, fields in events:
        (log.warning if event.endswith("_kept") else log.info)(event, **fields)


def log_result(log: Any, result: publish.Result, max_attempts: int) -> None:
    """One event per publish outcome, with the fields operators search the journal by."""
    fields = {"data_id": result.data_id, "data_type": result.data_type,
              "stage_path": result.stage_path}
    if result.status is Attempt.PUBLISHED:
        log.info("published", **fields, published_path=result.published_path,
                 how=result.how, bytes_copied=result.bytes, seconds=round(result.seconds, 3),
                 supersedes=result.supersedes)
    elif result.status.failed and result.failure is not None:
        f = result.failure
        event_fields = dict(fields, error_kind=result.kind, error=result.error,
                            publish_attempt=f.attempts, max_attempts=max_attempts,
                            next_attempt_at=f.next_attempt_at)
        log.warning("publish_failed", **event_fields)
        if f.exhausted:
            log.error("max_attempts_reached", **event_fields,
                      action=f"contimg-publisher show {result.data_id}; then retry")
    elif result.status is Attempt.REQUEUED:
        log.info("publish_requeued", **fields, reason=result.error, error_kind=result.kind)
    elif result.status is Attempt.DEFERRED:
        log.warning("waiting_for_space", **fields, reason=result.error,
                    action="free space on the products filesystem (or lower [publish] "
                           "min_free_bytes); it is published once the copy fits")
    elif result.status is Attempt.REJECTED:
        log.warning("rejected", **fields, error=result.error,
                    action="fix or remove the staged file; it is examined again when it changes")
    else:
        log.error("publish_lost", **fields, error=result.error)


def log_outcome(log: Any, outcome: detect.Outcome) -> None:
    fields = {"data_id": outcome.data_id, "data_type": outcome.data_type,
              "stage_path": outcome.stage_path}
    if outcome.action is Detected.REJECTED:
        log.warning("rejected", **fields, error=outcome.reason,
                    action="fix or remove the staged file; it is examined again when it changes")
    elif outcome.action in (Detected.REGISTERED, Detected.UPDATED):
        product = outcome.product
        log.info(outcome.action, **fields, size_bytes=product.size_bytes if product else None,
                 checksum=product.checksum if product else None)
    elif outcome.action is Detected.FOUND_PUBLISHED:
        log.info("found_published", **fields, reason=outcome.reason,
                 error="the row was written again by other code (its publish was reset); "
                       "described again from the verified archived copy")
    elif outcome.action is Detected.VANISHED:
        log.warning("vanished", **fields, error="left the staging area before it was published")
    elif outcome.action is Detected.DEFERRED:
        log.warning("detect_deferred", **fields, error=outcome.reason,
                    action=f"looked at again in {detect.DEFER_SECONDS:.0f} s; the other paths "
                           "go on")
    else:
        log.debug(outcome.action, **fields)
