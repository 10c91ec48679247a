"""The publish thread: copies run here so the main loop keeps pinging the watchdog.

It takes a batch of claimed rows at a time, whose durable steps share their commits and
fsyncs (scanpass.publish_batch), over a registry connection of its own.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable
from typing import Any

from contimg_publisher import logs, publish, qa, scanpass, writers
from contimg_publisher.config import Config
from contimg_publisher.registry import Product, RegistryBackend

Outcome = list[publish.Result] | Exception

# How long the loop's detection waits for a batch in flight (Worker.turn_until): longer
# than a batch of small products takes, shorter than a copy worth overlapping.
PUBLISH_TURN_SECONDS = 0.5


class Worker:
    def __init__(self, config: Config, owner: str, wake: Callable[[], None],
                 gate: writers.WriterGate) -> None:
        self.config = config
        self.owner = owner
        self.wake = wake
        self.gate = gate
        self.jobs: queue.SimpleQueue[tuple[list[Product], Config, str] | None] = \
            queue.SimpleQueue()
        self.results: queue.SimpleQueue[tuple[list[Product], Outcome]] = queue.SimpleQueue()
        self.stop_batch = threading.Event()  # the product in hand is finished, the rest back
        self.cancel = threading.Event()      # the copy in hand stops too
        self.busy: list[Product] | None = None
        self.busy_since = 0.0  # monotonic time the batch in `busy` was handed over
        self.thread = threading.Thread(target=self._run, name="contimg-publish", daemon=True)

    name = "publish"

    def start(self) -> None:
        if self.thread.is_alive():
            return
        self.thread = threading.Thread(target=self._run, name="contimg-publish", daemon=True)
        self.thread.start()

    def stop(self) -> None:
        self.jobs.put(None)
        if self.thread.is_alive():
            self.thread.join(timeout=10)

    def healthy(self) -> bool:
        return self.thread.is_alive()

    def reconfigure(self, config: Config, old: Config) -> None:
        """Each batch is handed over with the configuration it is published under."""

    def submit(self, products: list[Product], config: Config, mode: str = "auto") -> None:
        self.busy = products
        self.busy_since = time.monotonic()
        self.jobs.put((products, config, mode))

    def turn_until(self, now: float) -> float | None:
        """Until when the loop's detection waits for the batch in flight; None: it does not.
        Two threads busy in Python at once hand the GIL to each other at every system
        call, which on two cores costs more than either does: a burst drains fastest when
        registering and publishing take turns, as in `scan`. A batch still running after
        PUBLISH_TURN_SECONDS is in a long copy (system calls, no Python to compete with),
        and detection goes on beside it."""
        if self.busy is not None and self.results.empty() and \
                now - self.busy_since < PUBLISH_TURN_SECONDS:
            return self.busy_since + PUBLISH_TURN_SECONDS
        return None

    def take(self) -> tuple[list[Product], Outcome] | None:
        """A finished batch and its results (or what it raised), if one is waiting."""
        try:
            done = self.results.get_nowait()
        except queue.Empty:
            return None
        self.busy = None
        return done

    def _run(self) -> None:
        registry: RegistryBackend | None = None
        gated: Config | None = None  # the configuration whose gate and records it has
        while (job := self.jobs.get()) is not None:
            products, cfg, mode = job
            try:
                if registry is None:
                    registry = scanpass.open_checked(cfg, migrate=False)
                elif cfg is not gated:  # reloaded: the commits point the new records
                    registry.set_qa_gate(qa.conditions(cfg.products), qa.records(cfg.products))
                gated = cfg
                result: Any = scanpass.publish_batch(cfg, registry, self.owner,
                                                     logs.get_logger(), products, self.gate,
                                                     mode=mode, cancel=self.cancel,
                                                     stop=self.stop_batch)
            except Exception as exc:  # the loop must hear about every job, whatever happened
                result = exc
            self.results.put((products, result))
            self.wake()
        if registry is not None:
            registry.close()
