"""Publisher: claimed rows through the publish protocol, one batch at a time, and the
tidying that detection asks for; the entry points the daemon and the commands call."""

from __future__ import annotations

import os
import threading
from typing import Any

from contimg_publisher import detect, writers
from contimg_publisher.config import Config
from contimg_publisher.publish.batch import Batch
from contimg_publisher.publish.context import Context
from contimg_publisher.publish.folders import Folders
from contimg_publisher.publish.job import Job
from contimg_publisher.publish.lease import LeaseKeeper
from contimg_publisher.publish.outcome import Mode, Result
from contimg_publisher.publish.protocol import run as run_protocol
from contimg_publisher.publish.steps import armed
from contimg_publisher.publish.tidy import (
    LateSidecar,
    Tidied,
    publish_late_sidecars,
    remove_leftover,
    tidy,
)
from contimg_publisher.registry import Product, RegistryBackend
from contimg_publisher.states import Attempt


class Publisher:
    """Publishes claimed rows; one instance per thread (it uses that thread's Registry)."""

    def __init__(self, config: Config, registry: RegistryBackend, owner: str,
                 log: Any = None, gate: writers.WriterGate | None = None) -> None:
        armed()  # a test's unknown crash point is refused before anything is claimed
        self.config = config
        self.registry = registry
        self.owner = owner
        self.log = log
        self.gate = gate if gate is not None else writers.WriterGate()
        self.context = Context(config, registry, owner, log, self.gate)
        self.lease = LeaseKeeper(self.context)

    def publish(self, product: Product, mode: str = Mode.AUTO,
                cancel: threading.Event | None = None) -> Result:
        """Publish one row this process has claimed; failures are recorded, not raised."""
        return self.publish_many([product], mode, cancel)[0]

    def publish_many(self, products: list[Product], mode: str = Mode.AUTO,
                     cancel: threading.Event | None = None,
                     stop: threading.Event | None = None) -> list[Result]:
        """Publish rows this process has claimed, grouping the durable steps.

        Every product goes through every step of the protocol, in order (protocol.py);
        the steps are only shared, so a crash anywhere leaves each row exactly where a
        crash of a single publish would, and reconciliation is the same.

        `stop` ends the batch early: the product being placed is finished, the rest go back
        to waiting (a shutdown that does not wait for a whole batch); `cancel` also stops
        the copy in hand.
        """
        batch = Batch(self.context, Folders(self.config), self.lease, stop)
        self.lease.start(products)  # just claimed
        jobs = [Job(p, mode, Result(p.data_id, p.data_type, Attempt.RETRY_DUE, p.stage_path),
                    cancel)
                for p in products]
        try:
            run_protocol(batch, jobs)
        finally:
            for fd in batch.owned_fds:
                os.close(fd)
            batch.folders.close()
        return [job.result for job in jobs]

    def remove_leftover(self, product: Product) -> Tidied:
        """See tidy.remove_leftover."""
        return remove_leftover(self.context, product)

    def publish_late_sidecars(self, product: Product) -> list[LateSidecar]:
        """See tidy.publish_late_sidecars."""
        return publish_late_sidecars(self.context, product)

    def tidy(self, outcome: detect.Outcome) -> list[tuple[str, dict[str, Any]]]:
        """See tidy.tidy: what a detection outcome leaves to clean up, done; the events
        to log."""
        return tidy(self.context, outcome)
