"""The daemon: one main loop that owns all state, and a short one.

The loop runs the steps of `scan` (scanpass.Pass): the first pass at start-up, then as
the watch and the clock ask. Threads only feed it: watchdog's observer puts changes on a
queue, the publish thread (with its own registry connection) puts results on another, and
signal handlers only record the signal number. Each of them writes a byte to a wake pipe;
the loop sleeps on that pipe until the next deadline (deadlines.Deadlines), then handles
the signals (each number mapped to a method) and does what is due. What runs beside it
(the watch, the publish thread, the outbox, the audit, the status port) is a service with
start/stop/healthy (services.Services). The class keeps the loop, start-up and shutdown;
what it does on a reload, a registry outage, a descriptor shortage and a publish result
are plain functions it calls (reload, registrypause, fdlimit, results), and they never
import this module.
"""

from __future__ import annotations

import contextlib
import os
import queue
import select
import signal
import time
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

from contimg_publisher import (
    __version__,
    changes,
    fdlimit,
    lock,
    logs,
    metrics,
    outage,
    publish,
    reconcile,
    registrypause,
    reload,
    results,
    rules,
    scanpass,
    sdnotify,
    watch,
    writers,
)
from contimg_publisher import config as config_mod
from contimg_publisher import registry as registry_mod
from contimg_publisher.config import Config
from contimg_publisher.deadlines import Deadlines, Due
from contimg_publisher.registry import (
    TRANSIENT,
    Product,
    RegistryBackend,
    RegistryError,
    RegistryGone,
)
from contimg_publisher.scanpass import (  # noqa: F401 (names `scan` and the tests import)
    SCAN_BATCH,
    SCAN_BATCH_BYTES,
    TIDY_ACTIONS,
    PassReport,
    log_outcome,
    log_result,
    log_tidied,
    park_outside_root,
)
from contimg_publisher.sdnotify import monotonic_usec, notify
from contimg_publisher.services import (
    AuditService,
    DeliveryService,
    MetricsService,
    Services,
    WatchService,
)
from contimg_publisher.states import Attempt, Status
from contimg_publisher.worker import Worker

T = TypeVar("T")

WATCH_RETRY_SECONDS = 60.0  # a watch that could not be set up is tried again after this
TICK_SECONDS = 1.0          # the loop turns at least this often
# What a paused loop (the registry unavailable) still wakes for.
PAUSED = frozenset({Due.REGISTRY_RETRY, Due.STATUS, Due.WATCHDOG})


class Wakeup:
    """The wake pipe and the signals recorded for the loop."""

    def __init__(self) -> None:
        self.r, self.w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self.signals: list[int] = []

    def __call__(self) -> None:
        with contextlib.suppress(BlockingIOError, OSError):
            os.write(self.w, b"x")

    def install(self, signums: Iterator[int] | tuple[int, ...]) -> None:
        signal.set_wakeup_fd(self.w, warn_on_full_buffer=False)
        for signum in signums:
            signal.signal(signum, self._record)

    def _record(self, signum: int, _frame: Any) -> None:
        self.signals.append(signum)  # the loop acts on it; the wakeup fd wakes the loop

    def sleep(self, timeout: float) -> None:
        if timeout > 0:
            with contextlib.suppress(InterruptedError):
                select.select([self.r], [], [], timeout)
        with contextlib.suppress(BlockingIOError):
            while os.read(self.r, 4096):
                pass


class Daemon:
    def __init__(self, config_path: str, cfg: Config) -> None:
        self.config_path = config_path
        self.config = cfg
        self.log = logs.get_logger()
        self.owner = lock.owner_id()
        self.wakeup = Wakeup()
        self.handlers: dict[int, Callable[[scanpass.Pass], None]] = {
            signal.SIGHUP: self._reload, signal.SIGTERM: self._stop, signal.SIGINT: self._stop}
        self.deadlines = Deadlines()
        self.deadlines.set(Due.HEARTBEAT, 0.0)
        self.changes: queue.SimpleQueue[watch.Change | str] = queue.SimpleQueue()
        # The products the publish thread is moving out of staging: the watch drops the
        # events of those renames, and the loop does what they would have asked for.
        self.own_moves = watch.OwnMoves()
        # Which process has a staged file open for writing: the kernel's leases, or the
        # watch's close-write events where leases do not answer (set up by _probe_writers).
        self.tracker = writers.WriteTracker()
        self.gate = writers.WriterGate(leases=True, tracker=self.tracker)
        self.started_at = time.time()
        self.metrics = metrics.Metrics(cfg, start_time=self.started_at)
        self.services = Services()
        self.watch = WatchService(cfg, self.changes, self.wakeup, lambda: self.log,
                                  self.own_moves)
        self.worker = Worker(cfg, self.owner, self.wakeup, self.gate)
        # On a shared registry each is one daemon's duty at a time (registry.lead).
        self.delivery = DeliveryService(cfg, self.metrics, self.owner)
        self.audit = AuditService(cfg, lambda: self.worker.busy is None, self.metrics,
                                  self.owner)
        self.status_port = MetricsService(cfg, self.metrics, lambda: self.log)
        # Opened by start(); the lock is taken once the registry opens.
        self.lock: lock.Lock | None = None
        self.stopping = False
        self.rescan_requested = False
        self.results = results.Results(self.own_moves, self.changes, self.tracker)
        self.next_due: float | None = None  # when the next row is due, asked once per wake
        self.sweep: Iterator[int] | None = None  # stray temporary files, a folder at a time
        self.exit_code = 0
        # While the registry cannot be used: publishing pauses, the loop retries with
        # backoff (see outage). A stage_root change whose rows could not be parked then.
        self.outage: outage.Outage | None = None
        self.pending_park: Path | None = None
        # While turns fail for lack of descriptors: said once, waited out with backoff.
        self.shortage: fdlimit.Shortage | None = None
        self.status_note = ""
        self.watchdog_interval = sdnotify.watchdog_interval()

    # --- start-up -------------------------------------------------------------------------

    def start(self) -> scanpass.Pass | None:
        """The registry opened and locked, the first pass done, the services started. None
        when a stop came before the registry opened; a stop during the first pass leaves
        `stopping` set."""
        cfg = self.config
        self.wakeup.install(tuple(self.handlers))
        notify("STATUS=opening the registry")
        opened: list[scanpass.Pass] = []

        def prepare() -> scanpass.Pass:
            if not opened:
                opened.append(scanpass.Pass(cfg, self._open(), self.owner, self.log, self.gate))
                self.services.start(self.watch)
                self._watch_started()
                self._probe_writers()
            self._first_pass(opened[0])
            return opened[0]

        run = self._until_ready(prepare)
        if run is None:
            return opened[0] if opened else None
        for service in (self.worker, self.delivery, self.audit, self.status_port):
            self.services.start(service)
        self.log.info("started", stage_root=str(cfg.stage_root),
                      products_root=str(cfg.products_root), registry=cfg.registry_shown,
                      config=self.config_path, pid=os.getpid(),
                      watching=self.watch.watching())
        notify("READY=1", f"STATUS={self._status_line(run)}", f"MAINPID={os.getpid()}")
        self._start_sweep(run)
        return run

    def _open(self) -> RegistryBackend:
        cfg = self.config
        registry = scanpass.open_checked(cfg)  # with the rules' gate and records
        try:
            if self.lock is None:
                self.lock = lock.acquire(str(cfg.lock_path), "daemon", wait_seconds=0)
            # Before anything can publish: a sink configured for the first time hears of
            # every publish from this start on.
            registry.add_sinks(cfg.notify_sinks)
        except BaseException:
            registry.close()
            raise
        return registry

    def _first_pass(self, run: scanpass.Pass) -> None:
        cfg = self.config
        notify(f"STATUS=reconciling interrupted publishes ({cfg.registry_shown})")
        self._reconcile(run, startup=True)
        run.park()
        notify(f"STATUS=scanning {cfg.stage_root}")
        self._rescan(run, startup=True)

    def _until_ready(self, attempt: Callable[[], T]) -> T | None:
        """`attempt` until it is done (its value) or a stop comes (None). While the registry
        is unavailable (a full disk or immutable files at boot) it says so as the main loop
        does, keeps systemd's start timeout extended and waits for the next try: under
        Restart=on-failure an exit would become a restart loop."""
        while not self.stopping:
            try:
                done = attempt()
            except TRANSIENT as exc:
                deadline = self._registry_unavailable(exc).next_try
            else:
                if self.outage is not None:
                    self._registry_available(self.outage)
                return done
            while not self.stopping and (left := deadline - time.monotonic()) > 0:
                notify(f"EXTEND_TIMEOUT_USEC={int((left + 30) * 1e6)}")
                self.wakeup.sleep(min(left, 10.0))
                # Only a stop is acted on before READY; a reload waits for the loop.
                if any(s in (signal.SIGTERM, signal.SIGINT) for s in self.wakeup.signals):
                    self.stopping = True
        return None

    def _watch_started(self) -> None:
        """Without a watch, its set-up is tried again later (the rescans go on meanwhile)."""
        self.deadlines.set(Due.WATCH_RETRY, None if self.watch.running else
                           time.monotonic() + WATCH_RETRY_SECONDS)

    def _probe_writers(self) -> None:
        """Say once which method tells that a staged file is still being written."""
        probe = writers.lease_method_probe(str(self.config.stage_root))
        self.gate.leases = probe.method is writers.Method.LEASE
        self.log.info("writer_check", method=str(probe.method), reason=probe.reason,
                      stage_root=str(self.config.stage_root))

    def _start_sweep(self, run: scanpass.Pass) -> None:
        """Stray temporary files (left by a process that died) are looked for once per start
        and per change of products_root, in slices between publishes: the walk grows with
        the archive, so it never delays READY or a publish."""
        self.sweep = reconcile.stray_temp_sweep(self.config, run.registry, self.owner,
                                                self.log)

    def _reconcile(self, run: scanpass.Pass, startup: bool = False) -> None:
        reconciled, exhausted = run.reconcile(sweep=False)
        results.reconciled(self.log, run.detector, reconciled, exhausted,
                           self.config.max_attempts, startup)
        self.deadlines.after(Due.RECONCILE, self.config.reconcile_seconds, time.monotonic())

    def _rescan(self, run: scanpass.Pass, startup: bool = False) -> None:
        started = time.monotonic()
        if startup:
            notify(f"EXTEND_TIMEOUT_USEC={int(max(60, self.config.rescan_seconds) * 1e6)}")
        stats = run.detector.scan()
        self.log.info("rescan", seconds=round(time.monotonic() - started, 3), **stats)
        run.log_walk_problems()
        self.deadlines.after(Due.RESCAN, self.config.rescan_seconds, time.monotonic())
        self.rescan_requested = False

    # --- the loop -------------------------------------------------------------------------

    def run(self) -> int:
        run = self.start()
        if run is None:
            return self._shutdown(None)
        while True:
            self._handle_signals(run)
            if self.stopping:
                break
            self.wakeup.sleep(self._turn(run))
        status = self._shutdown(run)
        return self.exit_code or status

    def _turn(self, run: scanpass.Pass) -> float:
        """One turn of the loop; returns how long to sleep before the next."""
        if self.outage is not None and not outage.due(self.outage, time.monotonic()):
            self._ping(run)  # paused: signals and the watchdog only, until the next try
            return self.deadlines.next_timeout(time.monotonic(), PAUSED, cap=None)
        retried = self.outage
        try:
            if retried is not None:
                registrypause.retry(run, self.pending_park)
                self.pending_park = None
            self._step(run)
            timeout = self._timeout(run)
        except RegistryGone as exc:
            self._registry_gone(exc)
            return 0.0
        except TRANSIENT as exc:
            self._registry_unavailable(exc)
            self._ping(run)
            return self.deadlines.next_timeout(time.monotonic(), PAUSED, cap=None)
        except (RegistryError, OSError) as exc:
            if fdlimit.exhausted(exc):  # said once, then waited out with a growing pause
                self.shortage = fdlimit.short(self.shortage, exc, time.monotonic(), self.log)
                self._ping(run)
                return self.shortage.pause
            # A staging area that went away: say so and try again on the next turn; the
            # watchdog still sees a loop that turns.
            self.log.error("loop_error", error=f"{type(exc).__name__}: {exc}")
            self.wakeup.sleep(1.0)
            return 0.0
        except Exception as exc:  # one odd path or event never ends the daemon
            self.log.error("loop_error", error=f"{type(exc).__name__}: {exc}",
                           traceback=traceback.format_exc(limit=-8))
            self.wakeup.sleep(1.0)
            return 0.0
        if retried is not None and self.outage is not None:
            self._registry_available(self.outage)
        if self.shortage is not None:
            fdlimit.ended(self.shortage, time.monotonic(), self.log)
            self.shortage = None
        return timeout

    def _step(self, run: scanpass.Pass) -> None:
        run.registry.check_identity()  # a stat: every turn, before anything is recorded
        now = time.monotonic()
        detecting = self.worker.turn_until(now) is None
        if detecting and changes.drain(self.changes, self.tracker, run):
            self.rescan_requested = True
        if self.services.restart_unhealthy(self.log, str(self.config.stage_root)):
            self._watch_started()
            self.rescan_requested = True
        if not self.watch.running and self.deadlines.is_due(Due.WATCH_RETRY, now):
            self.watch.start()  # retry a watch that could not be set up
            self._watch_started()
        if detecting and (self.rescan_requested or self.deadlines.is_due(Due.RESCAN, now)):
            self._rescan(run)
        self._collect_results(run)
        if detecting:
            for outcome in run.detector.process():
                log_outcome(self.log, outcome)
                self.metrics.observe_detect(outcome)
                run.tidy(outcome)
        if self.results.abandoned and self.worker.busy is None:
            results.resolve_abandoned(self.results, self.config, run.registry, self.owner,
                                      self.log)
        if self.worker.busy is None:
            self._claim_next(run)
        if self.sweep is not None and self.worker.busy is None:  # between publishes
            self.sweep = reconcile.advance_sweep(self.sweep)
        now = time.monotonic()
        if self.deadlines.is_due(Due.RECONCILE, now):
            self._reconcile(run)
        if self.deadlines.is_due(Due.HEARTBEAT, now):
            # This daemon is alive (the registry's heartbeats, which `status` lists per node).
            run.registry.heartbeat(self.owner, self.started_at, __version__)
            self.deadlines.after(Due.HEARTBEAT, registry_mod.HEARTBEAT_SECONDS, now)
        self._ping(run)

    def _timeout(self, run: scanpass.Pass) -> float:
        """Until the earliest deadline, at most TICK_SECONDS."""
        now, wall = time.monotonic(), time.time()
        turn = self.worker.turn_until(now)
        check = None if turn is not None else run.detector.next_check()
        d = self.deadlines
        d.set(Due.TURN, turn)
        d.set(Due.SETTLE, None if check is None else now + (check - wall))
        d.set(Due.CLAIM, now + (self.next_due - wall)  # asked by _claim_next
              if self.worker.busy is None and self.next_due is not None else None)
        return d.next_timeout(now, cap=TICK_SECONDS)

    def _ping(self, run: scanpass.Pass) -> None:
        sdnotify.ping(self.deadlines, lambda: self._status_line(run), self.watchdog_interval,
                      time.monotonic())

    def _status_line(self, run: scanpass.Pass | None) -> str:
        return sdnotify.status_line(self.config, None if run is None else run.registry,
                                    self.outage, self.watch.watching, self.status_note,
                                    self.results.last_published)

    # --- detection and publishing ---------------------------------------------------------

    def _claim_next(self, run: scanpass.Pass) -> None:
        """Once per wake-up: when is the next row due (an indexed read, no write transaction
        while idle), and if it is now, claim a batch as `scan` does."""
        self.next_due = run.registry.next_due_at()
        if self.next_due is None or self.next_due > time.time():
            return
        claimed = run.claim()
        if claimed:
            self.own_moves.expect([results.event_path(p) for p in claimed])
            self.worker.submit(claimed, self.config)

    def _collect_results(self, run: scanpass.Pass) -> None:
        while (done := self.worker.take()) is not None:
            products, outcome = done
            error = results.collect(self.results, run.detector, products, outcome, self.log,
                                    self.metrics, self.config.max_attempts, self.delivery.wake)
            if isinstance(error, RegistryGone):
                self._registry_gone(error)
            elif error is not None:
                self._registry_unavailable(error)

    # --- the registry unavailable (registrypause) -----------------------------------------

    def _registry_unavailable(self, exc: Exception) -> outage.Outage:
        now = time.monotonic()
        self.outage = registrypause.unavailable(self.outage, exc, self.config, self.log, now)
        registrypause.tell(self.outage, self.metrics, self.lock, self.deadlines, now)
        return self.outage

    def _registry_available(self, was: outage.Outage) -> None:
        now = time.monotonic()
        self.outage = None
        registrypause.available(was, self.config, self.log, now)
        registrypause.tell(None, self.metrics, self.lock, self.deadlines, now)

    def _registry_gone(self, exc: RegistryError) -> None:
        registrypause.gone(exc, self.config, self.log)
        self.exit_code = 1
        self.stopping = True

    # --- signals --------------------------------------------------------------------------

    def _handle_signals(self, run: scanpass.Pass) -> None:
        while self.wakeup.signals:
            self.handlers[self.wakeup.signals.pop(0)](run)

    def _stop(self, _run: scanpass.Pass) -> None:
        self.stopping = True

    def _reload(self, run: scanpass.Pass) -> None:
        notify("RELOADING=1", f"MONOTONIC_USEC={monotonic_usec()}")
        loaded = reload.load(self.config_path, self.config, run.registry)
        if isinstance(loaded, reload.Failed):
            self.status_note = reload.failed(loaded, self.log, self.metrics)
        else:
            self._reconfigure(run, loaded)
        notify("READY=1", f"STATUS={self._status_line(run)}")

    def _reconfigure(self, run: scanpass.Pass, loaded: reload.Loaded) -> None:
        old, new = self.config, loaded.config
        self.config = new
        self.log = run.log = reload.logger(new)
        run.reconfigure(new)
        self.services.reconfigure(new, old)
        if new.stage_root != old.stage_root:
            self._watch_started()
            try:
                run.park(old.stage_root)
            except TRANSIENT as exc:  # parked by the first retry that can write
                self.pending_park = old.stage_root
                self._registry_unavailable(exc)
            self.tracker.clear()
            self._probe_writers()
        if new.products_root != old.products_root:
            self._start_sweep(run)
        self.rescan_requested = True
        self.status_note = ""
        reload.done(loaded, old, self.config_path, self.log, self.metrics)

    # --- shutdown -------------------------------------------------------------------------

    def _shutdown(self, run: scanpass.Pass | None) -> int:
        notify("STOPPING=1", "STATUS=stopping")
        in_flight = self.worker.busy or []
        self.log.info("stopping", in_flight=in_flight[0].data_id if in_flight else None,
                      batch=len(in_flight))
        if run is not None:
            self._finish_batch(run)
        self.services.stop()
        if run is not None:
            with contextlib.suppress(RegistryError):
                run.registry.end_heartbeat(self.owner)
            run.registry.close()
        if self.lock is not None:
            self.lock.release()
        self.log.info("stopped")
        return 0

    def _finish_batch(self, run: scanpass.Pass) -> None:
        """The product in hand is finished, the rest of its batch goes back; after
        stop_timeout_seconds the copy is cut short (its temporary file removed, requeued)."""
        self.worker.stop_batch.set()
        deadline = time.monotonic() + self.config.stop_timeout_seconds
        while self.worker.busy is not None and time.monotonic() < deadline:
            self.wakeup.sleep(min(0.5, deadline - time.monotonic()))
            self._collect_results(run)
            self._ping(run)
        if self.worker.busy is not None:
            self.worker.cancel.set()
            while self.worker.busy is not None:
                self.wakeup.sleep(0.5)
                self._collect_results(run)


# --- one-shot work for the CLI --------------------------------------------------------------

def scan_once(cfg: Config, log: Any) -> PassReport:
    """`scan`: one pass under the lock: reconcile, detect and register, publish what is due."""
    with lock.acquire(str(cfg.lock_path), "scan", wait_seconds=cfg.lock_wait_seconds), \
            scanpass.open_checked(cfg) as registry:
        return scanpass.Pass(cfg, registry, lock.owner_id(), log).run_once()


def publish_now(cfg: Config, data_id: str, log: Any, wait_seconds: float | None = None,
                override_qa: str | None = None) -> publish.Result | str:
    """`publish DATA_ID`: under the lock if it is free; otherwise handed to the daemon that
    holds it, waiting for the outcome. Returns the result, or a string saying what blocked.

    A product the QA gate holds is published only with `override_qa`, the operator's
    reason, which is logged with the gate's."""
    wait = cfg.lock_wait_seconds if wait_seconds is None else wait_seconds
    deadline = time.monotonic() + wait
    owner = lock.owner_id()
    with scanpass.open_checked(cfg) as registry:
        row = registry.get(data_id)
        if row is None:
            return f"{data_id}: no such product"
        if row.status == Status.PUBLISHED:
            return f"{data_id}: already published at {row.published_path}"
        if row.status == Status.REJECTED:
            return f"{data_id}: rejected ({row.publish_error}); fix the staged file first"
        if not rules.owns(cfg, row):
            return (f"{data_id}: no product rule of this configuration owns it (type "
                    f"{row.data_type!r} at {row.stage_path}); it is another writer's row")
        gate = registry.qa_holds([data_id]).get(data_id)
        if gate is not None:
            if not override_qa:
                return (f"{data_id}: {gate}; to publish it anyway: contimg-publisher publish "
                        f"{data_id} --override-qa REASON")
            log.warning("qa_overridden", data_id=data_id, data_type=row.data_type,
                        stage_path=row.stage_path, qa_hold=gate, reason=override_qa,
                        user=os.environ.get("SUDO_USER") or _user())
        requested = False
        while True:
            try:
                held = lock.acquire(str(cfg.lock_path), "publish", wait_seconds=0)
            except lock.LockHeld as exc:
                if "daemon" in exc.holder and not requested:
                    registry.request_publish(data_id)
                    requested = True
                if requested:
                    row = registry.get(data_id)
                    if row is not None and row.publish_requested_at is None and \
                            row.status != Status.PUBLISHING:
                        return _result_from_row(row)
                if time.monotonic() >= deadline:
                    return (f"{data_id}: {exc}; " + ("asked it to publish, no outcome yet"
                                                     if requested else "gave up waiting"))
                time.sleep(0.2)
                continue
            with held:
                reconcile.reconcile(cfg, registry, owner, log)
                claimed = registry.claim(owner, cfg.lease_seconds, data_id=data_id)
                if not claimed:
                    row = registry.get(data_id)
                    if row is not None and row.status == Status.PUBLISHED:
                        # another `publish` took it while this one waited for the lock
                        return f"{data_id}: already published at {row.published_path}"
                    status = row.status if row else "missing"
                    return f"{data_id}: cannot be claimed (status {status}; not yet described?)"
                return publish.Publisher(cfg, registry, owner, log).publish(claimed[0],
                                                                          mode="manual")


def _user() -> str:
    import getpass
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return str(os.getuid())


def _result_from_row(row: Product) -> publish.Result:
    status = Attempt.PUBLISHED if row.status == Status.PUBLISHED else \
        Attempt.EXHAUSTED if row.status == Status.FAILED else Attempt.RETRY_DUE
    return publish.Result(row.data_id, row.data_type, status, row.stage_path,
                          published_path=row.published_path, error=row.publish_error)


def run(config_path: str) -> int:
    """`run`: load, then loop until SIGTERM/SIGINT."""
    cfg = config_mod.load(config_path)
    logs.configure(cfg.log_level, cfg.log_format, cfg.error_max_chars)
    limits = fdlimit.raise_soft_limit()
    fields = {"soft_before": limits.soft_before, "soft": limits.soft, "hard": limits.hard}
    if limits.error:
        logs.get_logger().warning("descriptor_limit", **fields, error=limits.error,
                                  reason="the soft limit could not be raised to the hard one")
    else:
        logs.get_logger().info("descriptor_limit", **fields)
    daemon = Daemon(config_path, cfg)
    try:
        return daemon.run()
    except lock.LockHeld as exc:
        daemon.log.error("already_running", lock=exc.path, holder=exc.holder,
                         error=f"another publisher holds the lock: {exc.holder}")
        return 1
    except RegistryError as exc:
        daemon.log.error("registry_unusable", registry=cfg.registry_shown, error=str(exc))
        return 1
