"""Deliver the outbox's events to the configured sinks, one thread per sink.

Publishing only writes events (Registry.mark_published, in the transaction that records the
publish); these threads read them and move each sink's cursor, each through its own
registry connection, so a sink that is slow or down never delays a publish, the main loop
or another sink. Each sink takes the events in order: its oldest undelivered event (its
head) is sent until the sink takes it, with backoff, and the ones after it wait (for that
sink only). A sink's thread holds nothing but its head: its queue is its cursor in the
registry. A delivery is recorded after the sink took it, so a kill in between sends it
again: at least once, with the same event_id, which the webhook also carries as its
Idempotency-Key.

On a registry several nodes share, delivery is one daemon's duty at a time
(registry.lead(Duty.OUTBOX)): the others' threads stand by, so each event reaches each sink
once, and each thread of the daemon holding the duty renews it before every attempt. Its
lease outlasts an attempt (twice the sinks' timeouts), so a daemon that was killed hands
the duty over within that lease and a living one never loses it in the middle of an
attempt.
"""

from __future__ import annotations

import contextlib
import os
import socket
import threading
import time
from typing import Any

from contimg_publisher import logs, redact
from contimg_publisher.commandsink import KILL_WAIT_SECONDS, Command
from contimg_publisher.config import Config
from contimg_publisher.registry import (
    TRANSIENT,
    Event,
    RegistryBackend,
    RegistryError,
    backoff_delay,
    open_registry,
    unavailable,
)
from contimg_publisher.sinks import Outcome, Target, Webhook
from contimg_publisher.states import Duty, Sink

POLL_SECONDS = 2.0  # events written by other processes (`scan`, `publish`) are found this fast


def duty_lease(cfg: Config) -> float:
    """How long the delivery duty is held without a renewal: twice the longest attempt a
    sink can take, and at least a minute."""
    return max(60.0, 2 * (cfg.notify_connect_timeout_seconds + cfg.notify_read_timeout_seconds),
               2 * (cfg.notify_command_timeout_seconds + KILL_WAIT_SECONDS))


def target(cfg: Config, sink: Sink) -> Target | None:
    """The sink as configured, None when it is not."""
    if sink == Sink.WEBHOOK and cfg.notify_url:
        return Webhook(cfg.notify_url, cfg.notify_connect_timeout_seconds,
                       cfg.notify_read_timeout_seconds)
    if sink == Sink.COMMAND and cfg.notify_command:
        return Command(cfg.notify_command, cfg.notify_command_timeout_seconds,
                       cfg.notify_command_environment)
    return None


class Delivery:
    """The sinks' delivery threads, one per sink configured since the start. The main loop
    only calls wake() (a new publish), reconfigure() (SIGHUP) and stop(); none of them
    waits for a sink."""

    def __init__(self, config: Config, metrics: Any = None, owner: str | None = None) -> None:
        self.config = config
        self.metrics = metrics  # metrics.Metrics; its counters are thread-safe
        # Who holds the delivery duty on a shared registry: the daemon's lease owner.
        self.owner = owner or f"{socket.gethostname()}:{os.getpid()}:outbox"
        self.stopping = threading.Event()
        self.workers: dict[Sink, SinkWorker] = {}
        self._leading: bool | None = None  # whether this daemon holds the duty (None: not asked)
        self._lock = threading.Lock()

    def start(self) -> None:
        self._spawn()

    def _spawn(self) -> None:
        """A thread for each configured sink that has none yet. A sink removed later keeps
        its thread, idle: configured again, it goes on from its cursor."""
        for sink in self.config.notify_sinks:
            if sink not in self.workers and not self.stopping.is_set():
                worker = SinkWorker(self, sink)
                self.workers[sink] = worker
                worker.start()

    def wake(self) -> None:
        for worker in list(self.workers.values()):
            worker.wake()

    def reconfigure(self, config: Config) -> None:
        """New [notify] values apply from the next attempt, which is made at once: an
        operator who fixed a URL need not wait out the backoff."""
        self.config = config
        self._spawn()
        for worker in list(self.workers.values()):
            worker.retry_now()

    def stop(self, timeout: float = 5.0) -> None:
        """Stop; deliveries in flight are cut short (sent again at the next start)."""
        self.stopping.set()
        workers = list(self.workers.values())
        for worker in workers:
            worker.cancel()
        deadline = time.monotonic() + timeout
        for worker in workers:
            worker.join(max(0.0, deadline - time.monotonic()))

    def note_leading(self, leading: bool) -> None:
        """Logged once per change for the daemon, whichever sink's thread saw it."""
        with self._lock:
            if leading == self._leading:
                return
            self._leading = leading
        logs.get_logger().info(
            "outbox_duty", leading=leading, owner=self.owner,
            reason="this daemon delivers the outbox" if leading else
            "another daemon of the shared registry delivers the outbox; this one "
            "takes over if that one stops")


class SinkWorker:
    """One sink's delivery: its own thread, registry connection, backoff and head, so its
    slowness is its own."""

    def __init__(self, delivery: Delivery, sink: Sink) -> None:
        self.delivery = delivery
        self.sink = sink
        self._wake = threading.Event()
        self._next = 0.0  # monotonic time of the next attempt (after a failure's backoff)
        self._current: Target | None = None  # the attempt in flight, for cancel()
        self._target: Target | None = None
        self._built_from: Config | None = None
        self.thread = threading.Thread(target=self._run, name=f"contimg-outbox-{sink}",
                                       daemon=True)

    def start(self) -> None:
        self.thread.start()

    def wake(self) -> None:
        self._wake.set()

    def retry_now(self) -> None:
        self._next = 0.0
        self._wake.set()

    def cancel(self) -> None:
        self._wake.set()
        current = self._current
        if current is not None:
            current.cancel()

    def join(self, timeout: float) -> None:
        self.thread.join(timeout)

    def _target_for(self, cfg: Config) -> Target | None:
        """The sink built from this config (kept while the config is: a command's
        unreaped leftovers are polled by the same object)."""
        if cfg is not self._built_from:
            self._target, self._built_from = target(cfg, self.sink), cfg
        return self._target

    def _run(self) -> None:
        stopping = self.delivery.stopping
        registry: RegistryBackend | None = None
        added = False
        leading = False
        pause = 0.0  # while the registry cannot be used: backoff, said once
        while not stopping.is_set():
            cfg = self.delivery.config
            wait = POLL_SECONDS
            try:
                dest = self._target_for(cfg)
                if dest is not None:
                    if registry is None:
                        registry = open_registry(cfg, migrate=False)
                    if not added:
                        registry.add_sinks([self.sink])
                        added = True
                    leading = registry.lead(Duty.OUTBOX, self.delivery.owner, duty_lease(cfg))
                    self.delivery.note_leading(leading)
                    if leading:
                        wait = self._attempt(registry, cfg, dest)
                    if pause:
                        logs.get_logger().info("outbox_resumed", sink=str(self.sink),
                                               reason="the registry can be used again")
                    pause = 0.0
            except TRANSIENT as exc:
                if not pause:
                    logs.get_logger().warning(
                        "outbox_paused", sink=str(self.sink),
                        error=str(unavailable(exc, str(cfg.registry))),
                        reason="events are delivered once the registry can be used again")
                pause = wait = min(60.0, max(1.0, pause * 2))
            except (RegistryError, Exception) as exc:  # the thread must not die silently
                logs.get_logger().error("outbox_error", sink=str(self.sink),
                                        error=f"{type(exc).__name__}: {exc}",
                                        reason="delivery is tried again in 10 s")
                if registry is not None and not isinstance(exc, TRANSIENT):
                    with contextlib.suppress(Exception):
                        registry.close()
                    registry, added = None, False
                wait = 10.0
            self._wake.wait(wait)
            self._wake.clear()
        if registry is not None:
            if leading:
                with contextlib.suppress(Exception):  # else its lease lapses by itself
                    registry.resign(Duty.OUTBOX, self.delivery.owner)
            registry.close()

    def _attempt(self, registry: RegistryBackend, cfg: Config, dest: Target) -> float:
        """One attempt at the head when it is due; returns how long to wait before the
        next (0: the sink took an event, more may wait)."""
        now = time.monotonic()
        if now < self._next:
            return min(POLL_SECONDS, self._next - now)
        event = registry.outbox_head(self.sink)
        if event is None:
            return POLL_SECONDS
        self._current = dest
        try:
            if self.delivery.stopping.is_set():
                return 0.0
            outcome = dest.deliver(event)
        finally:
            self._current = None
        if outcome.ok:
            self._delivered(registry, dest, event)
            return 0.0
        if self.delivery.stopping.is_set():
            return 0.0  # cut short by stop(): not the sink's failure
        return min(POLL_SECONDS, self._failed(registry, cfg, dest, event, outcome))

    def _delivered(self, registry: RegistryBackend, dest: Target, event: Event) -> None:
        self._next = 0.0
        attempts = registry.record_delivered(self.sink, event.seq)
        if self.delivery.metrics is not None:
            self.delivery.metrics.observe_delivery(self.sink, True)
        logs.get_logger().info("event_delivered", sink=str(self.sink),
                               event_id=event.event_id, sequence=event.seq,
                               data_id=event.data_id, attempts=attempts)

    def _failed(self, registry: RegistryBackend, cfg: Config, dest: Target, event: Event,
                outcome: Outcome) -> float:
        # An answer may name a URL (a redirect's Location): kept and shown without secrets.
        error = redact.text(outcome.error or "failed")
        attempts, dead = registry.record_delivery_failure(
            self.sink, event.seq, error, cfg.error_max_chars, cfg.notify_max_attempts)
        log = logs.get_logger()
        if self.delivery.metrics is not None:
            self.delivery.metrics.observe_delivery(self.sink, False, dead=dead)
        fields = {"sink": str(self.sink), "target": dest.describe(),
                  "event_id": event.event_id, "sequence": event.seq, "data_id": event.data_id,
                  "attempt": attempts, "error": error}
        if dead:
            log.error("event_dead_lettered", **fields, max_attempts=cfg.notify_max_attempts,
                      reason="given up on for this sink; the events after it go on",
                      action="fix the consumer, then `contimg-publisher events "
                             "--redeliver-dead` sends it and those after it again")
            self._next = 0.0
            return 0.0
        delay = backoff_delay(attempts, cfg.notify_retry_initial_seconds,
                              cfg.notify_retry_max_seconds)
        if outcome.retry_after is not None:
            delay = min(cfg.notify_retry_max_seconds, max(delay, outcome.retry_after))
        self._next = time.monotonic() + delay
        log.warning("event_delivery_failed", **fields, retry_in_seconds=round(delay, 1),
                    reason="this sink's later events wait behind it; publishing goes on")
        return delay
