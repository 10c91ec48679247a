"""The daemon: one main loop that owns all state.

Threads only feed the loop: watchdog's observer puts changes on a queue, the
publish worker (with its own registry connection) puts results on another, and
signal handlers only record the signal. Each of them writes a byte to a wake
pipe; the loop sleeps on that pipe until the next timer, then does the work:
reload, detection, claiming, reconciliation, sd_notify.
"""

from __future__ import annotations

import contextlib
import errno
import os
import queue
import select
import signal
import threading
import time
import traceback
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from contimg_publisher import (
    __version__,
    activation,
    audit,
    detect,
    fdlimit,
    lock,
    logs,
    metrics,
    outage,
    outbox,
    paths,
    publish,
    qa,
    reconcile,
    watch,
    writers,
)
from contimg_publisher import config as config_mod
from contimg_publisher import registry as registry_mod
from contimg_publisher.config import Config, ConfigError
from contimg_publisher.registry import (
    TRANSIENT,
    Product,
    RegistryBackend,
    RegistryError,
    RegistryGone,
    open_registry,
    refuse_new_over_archive,
    unavailable,
)
from contimg_publisher.states import Attempt, Detected, Status

try:
    from systemd import daemon as sd_daemon
except ImportError:  # pragma: no cover - systemd-python is a dependency; keep running without
    sd_daemon = None


_NOTIFY_FAILED: list[str] = []  # the first failure to reach systemd, said once


def notify(*lines: str) -> bool:
    """sd_notify; a no-op returning False outside systemd (NOTIFY_SOCKET unset).

    A socket that cannot be reached (gone, refused, full) must not stop publishing: the
    first failure is logged, and the call returns False."""
    socket_path = os.environ.get("NOTIFY_SOCKET")
    if sd_daemon is None or not socket_path:
        return False
    try:
        return bool(sd_daemon.notify("\n".join(lines)))
    except OSError as exc:
        if not _NOTIFY_FAILED:
            _NOTIFY_FAILED.append(socket_path)
            logs.get_logger().warning(
                "notify_failed", notify_socket=socket_path, sent=lines[0],
                error=f"cannot reach systemd's notify socket: {exc.strerror or exc}",
                reason="publishing goes on; systemd may report a start timeout or a "
                       "watchdog timeout for this service")
        return False


def monotonic_usec() -> int:
    return time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000


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


def _internet_refused(exc: BaseException) -> bool:
    """socket() refused by the unit's RestrictAddressFamilies= (seccomp: EAFNOSUPPORT)."""
    return isinstance(exc, OSError) and exc.errno == errno.EAFNOSUPPORT


@dataclass
class Worker:
    """The publish thread: copies run here so the main loop keeps pinging the watchdog.

    It takes a batch of claimed rows at a time, whose durable steps share their commits and
    fsyncs (Publisher.publish_many)."""

    config: Config
    owner: str
    wake: Any
    gate: writers.WriterGate
    jobs: queue.SimpleQueue[tuple[list[Product], Config, str] | None] = field(
        default_factory=queue.SimpleQueue)
    results: queue.SimpleQueue[tuple[list[Product], list[publish.Result] | Exception]] = \
        field(default_factory=queue.SimpleQueue)
    stop_batch: threading.Event = field(default_factory=threading.Event)  # rest back
    cancel: threading.Event = field(default_factory=threading.Event)      # copy too
    busy: list[Product] | None = None
    busy_since: float = 0.0  # monotonic time the batch in `busy` was handed over
    thread: threading.Thread | None = None

    def start(self) -> None:
        self.thread = threading.Thread(target=self._run, name="contimg-publish", daemon=True)
        self.thread.start()

    def submit(self, products: list[Product], config: Config, mode: str = "auto") -> None:
        self.busy = products
        self.busy_since = time.monotonic()
        self.jobs.put((products, config, mode))

    def stop(self) -> None:
        self.jobs.put(None)

    def _run(self) -> None:
        registry: RegistryBackend | None = None
        gated: Config | None = None  # the configuration whose gate and records it has
        while (job := self.jobs.get()) is not None:
            products, cfg, mode = job
            try:
                if registry is None:
                    registry = open_registry(cfg, migrate=False)
                elif cfg is not gated:  # reloaded: the commits point the new records
                    registry.set_qa_gate(qa.conditions(cfg.products), qa.records(cfg.products))
                gated = cfg
                publisher = publish.Publisher(cfg, registry, self.owner, logs.get_logger(),
                                              self.gate)
                result: Any = publisher.publish_many(products, mode=mode, cancel=self.cancel,
                                                     stop=self.stop_batch)
            except Exception as exc:  # the loop must hear about every job, whatever happened
                result = exc
            self.results.put((products, result))
            self.wake()
        if registry is not None:
            registry.close()


class Daemon:
    def __init__(self, config_path: str, cfg: Config) -> None:
        self.config_path = config_path
        self.config = cfg
        self.log = logs.get_logger()
        self.owner = lock.owner_id()
        self.signals: list[int] = []
        self.changes: queue.SimpleQueue[watch.Change | str] = queue.SimpleQueue()
        self.wake_r, self.wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self.registry: RegistryBackend | None = None
        self.lock: lock.Lock | None = None
        self.watcher: watch.Watcher | None = None
        # The products the publish thread is moving out of staging: the watch drops the
        # events of those renames, and the loop does what they would have asked for.
        self.own_moves = watch.OwnMoves()
        self.waiting_for_space: set[str] = set()  # data_ids whose wait for room was logged
        self.detector: detect.Detector | None = None
        self.worker: Worker | None = None
        self.delivery: outbox.Delivery | None = None  # the outbox's sinks, a thread of its own
        self.auditor: audit.Auditor | None = None
        # Which process has a staged file open for writing: the kernel's leases, or the
        # watch's close-write events where leases do not answer (set up by _probe_writers).
        self.gate = writers.WriterGate(leases=True, tracker=writers.WriteTracker())
        self.stopping = False
        self.rescan_requested = False
        self.next_rescan = 0.0
        self.next_reconcile = 0.0
        self.next_status = 0.0
        self.next_heartbeat = 0.0
        self.last_published: str | None = None
        # Publishes that died inside the publish thread: resolved by the loop, not left
        # `publishing` under this process's live lease until a restart.
        self.abandoned: list[str] = []
        self.next_due: float | None = None  # when the next row is due, asked once per wake
        self.sweep: Iterator[int] | None = None  # stray temporary files, a folder at a time
        self.exit_code = 0
        # While the registry cannot be used: publishing pauses, the loop retries with
        # backoff (see outage). A stage_root change whose rows could not be parked then.
        self.outage: outage.Outage | None = None
        self.pending_park: Path | None = None
        # While turns fail for lack of descriptors: said once, waited out with backoff.
        self.shortage: fdlimit.Shortage | None = None
        self.last_ping = 0.0
        self.status_note = ""
        self.started_at = time.time()
        self.metrics = metrics.Metrics(cfg, start_time=self.started_at)
        self.metrics_server: metrics.Server | None = None
        # The status port's socket when systemd opened it (the shipped unit allows no
        # Internet socket of the daemon's own): kept for the process's whole life.
        self.passed = activation.listening_socket()
        usec = os.environ.get("WATCHDOG_USEC")
        pid = os.environ.get("WATCHDOG_PID")
        self.watchdog_interval = (int(usec) / 1e6 / 2 if usec and usec.isdigit() and (
            not pid or pid == str(os.getpid())) else None)

    # --- plumbing -------------------------------------------------------------------------

    def wake(self) -> None:
        with contextlib.suppress(BlockingIOError, OSError):
            os.write(self.wake_w, b"x")

    def _on_signal(self, signum: int, _frame: Any) -> None:
        self.signals.append(signum)  # the loop acts on it; the wakeup fd wakes the loop

    def _install_signals(self) -> None:
        signal.set_wakeup_fd(self.wake_w, warn_on_full_buffer=False)
        for signum in (signal.SIGHUP, signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, self._on_signal)

    def _sleep(self, timeout: float) -> None:
        if timeout > 0:
            with contextlib.suppress(InterruptedError):
                select.select([self.wake_r], [], [], timeout)
        with contextlib.suppress(BlockingIOError):
            while os.read(self.wake_r, 4096):
                pass

    # --- start-up -------------------------------------------------------------------------

    def start(self) -> None:
        cfg = self.config
        self._install_signals()
        notify("STATUS=opening the registry")
        refuse_new_over_archive(cfg.registry, cfg.products_root)
        while not self._prepare():
            if self.stopping:
                return
        self.worker = Worker(cfg, self.owner, self.wake, self.gate)
        self.worker.start()
        # On a shared registry each is one daemon's duty at a time (registry.lead).
        self.delivery = outbox.Delivery(cfg, self.metrics, owner=self.owner)
        self.delivery.start()
        self._start_auditor()
        self._start_metrics()
        self.log.info("started", stage_root=str(cfg.stage_root),
                      products_root=str(cfg.products_root), registry=cfg.registry_shown,
                      config=self.config_path, pid=os.getpid(), watching=self._watching())
        notify("READY=1", f"STATUS={self._status_line()}", f"MAINPID={os.getpid()}")
        self._start_sweep()

    def _prepare(self) -> bool:
        """Open and lock the registry, reconcile, scan: True when done. While the registry
        is unavailable (a full disk or immutable files at boot) it says so as the main loop
        does, keeps systemd's start timeout extended, waits for the next try and returns
        False: under Restart=on-failure an exit would become a restart loop."""
        cfg = self.config
        try:
            if self.registry is None:
                self.registry = open_registry(cfg)  # with the rules' gate and records
            if self.lock is None:
                self.lock = lock.acquire(str(cfg.lock_path), "daemon", wait_seconds=0)
            # Before anything can publish: a sink configured for the first time hears of
            # every publish from this start on.
            self.registry.add_sinks(cfg.notify_sinks)
            notify(f"STATUS=reconciling interrupted publishes ({cfg.registry_shown})")
            self._reconcile(startup=True)
            park_outside_root(cfg, self.registry, self.log)
            if self.detector is None:
                self.detector = detect.Detector(cfg, self.registry, gate=self.gate)
                self._start_watcher()
                self._probe_writers()
            notify(f"STATUS=scanning {cfg.stage_root}")
            self._rescan(startup=True)
        except TRANSIENT as exc:
            self._registry_unavailable(exc)
        else:
            if self.outage is not None:
                self._registry_available()
            return True
        assert self.outage is not None
        deadline = self.outage.next_try
        while not self.stopping and (left := deadline - time.monotonic()) > 0:
            notify(f"EXTEND_TIMEOUT_USEC={int((left + 30) * 1e6)}")
            self._sleep(min(left, 10.0))
            # Only a stop is acted on before READY; a reload waits for the loop.
            if any(s in (signal.SIGTERM, signal.SIGINT) for s in self.signals):
                self.stopping = True
        return False

    def _start_sweep(self) -> None:
        """Stray temporary files (left by a process that died) are looked for once per start
        and per change of products_root, in slices between publishes: the walk grows with
        the archive, so it never delays READY or a publish."""
        assert self.registry is not None
        self.sweep = reconcile.stray_temp_sweep(self.config, self.registry, self.owner,
                                                self.log)

    def _advance_sweep(self, budget: float = 0.02) -> None:
        assert self.worker is not None
        if self.sweep is None or self.worker.busy is not None:
            return
        until = time.monotonic() + budget
        for _removed in self.sweep:
            if time.monotonic() >= until:
                return
        self.sweep = None

    def _start_auditor(self) -> None:
        """The fixity audit in a thread of its own; it reads only while the publish thread
        has nothing in hand (see audit.Auditor)."""
        worker = self.worker
        self.auditor = audit.Auditor(self.config,
                                     idle=lambda: worker is None or worker.busy is None,
                                     on_bytes=self.metrics.observe_audit_bytes,
                                     owner=self.owner)
        self.auditor.start()

    def _stop_auditor(self) -> None:
        if self.auditor is not None:
            self.auditor.stop()
            self.auditor = None

    def _start_metrics(self) -> None:
        """Serve /metrics and the status page; a daemon that cannot bind keeps publishing."""
        cfg = self.config
        for reason in self.passed.refused:
            self.log.warning("socket_not_used", error=reason)
        self.passed = activation.Passed(self.passed.listener)  # said once
        inherited = self.passed.listener
        if not cfg.metrics_enabled:
            if inherited is not None:
                self.log.warning("metrics_disabled_socket_passed",
                                 listen=str(inherited.getsockname()[0:2]),
                                 error="[metrics] enabled = false, but systemd opened the "
                                       "status port (contimg-publisher.socket): connections "
                                       "to it wait unanswered",
                                 action="mask contimg-publisher.socket")
            return
        try:
            self.metrics_server = metrics.Server(self.metrics, cfg.metrics_listen,
                                                 inherited=inherited).start()
        except (OSError, ValueError) as exc:
            self.log.error("metrics_unavailable", listen=cfg.metrics_listen,
                           error=f"{type(exc).__name__}: {exc}",
                           action="free the port or change [metrics] listen, then reload"
                           if inherited is None and not _internet_refused(exc) else
                           "start contimg-publisher.socket (the unit lets the daemon open "
                           "no Internet socket of its own), or free its port")
            return
        self.log.info("metrics_listening", listen=self.metrics_server.address,
                      url=f"http://{self.metrics_server.address}/",
                      from_systemd=self.metrics_server.inherited)
        if self.metrics_server.inherited and \
                self.metrics_server.address != cfg.metrics_listen:
            self.log.warning("metrics_listen_differs", listen=self.metrics_server.address,
                             configured=cfg.metrics_listen,
                             error="systemd's socket (contimg-publisher.socket, ListenStream=) "
                                   "decides the status port; [metrics] listen is not used",
                             action="make them agree")
        if not metrics.is_loopback(self.metrics_server.host):
            self.log.warning("metrics_exposed", listen=self.metrics_server.address,
                             error="metrics and the status page are reachable from other "
                                   "hosts, without authentication")

    def _stop_metrics(self) -> None:
        if self.metrics_server is not None:
            self.metrics_server.stop()
            self.metrics_server = None

    def _watching(self) -> bool:
        return self.watcher is not None and self.watcher.healthy()

    def _start_watcher(self) -> None:
        root = str(self.config.stage_root)
        os.makedirs(root, exist_ok=True)
        self.watcher = watch.Watcher(root, self.changes, wake=self.wake, log=self.log,
                                     own=self.own_moves)
        if not self.watcher.start():
            self.watcher = None

    def _probe_writers(self) -> None:
        """Say once which method tells that a staged file is still being written."""
        probe = writers.lease_method_probe(str(self.config.stage_root))
        self.gate.leases = probe.method is writers.Method.LEASE
        self.log.info("writer_check", method=str(probe.method), reason=probe.reason,
                      stage_root=str(self.config.stage_root))

    def _reconcile(self, startup: bool = False) -> None:
        cfg = self.config
        assert self.registry is not None
        results = reconcile.reconcile(cfg, self.registry, self.owner, self.log, sweep=False)
        for result in results:
            self.log.warning("reconciled", data_id=result.data_id, data_type=result.data_type,
                             stage_path=result.stage_path, outcome=result.status,
                             published_path=result.published_path)
            if result.status is Attempt.REQUEUED and self.detector is not None:
                # A legacy row requeued has never been described: look at its file now.
                self.detector.note(paths.undisplay(result.stage_path))
        exhausted = self.registry.mark_exhausted(
            cfg.max_attempts, owns=lambda row: detect.owns(cfg, row))
        for data_id in exhausted:
            self.log.error("max_attempts_reached", data_id=data_id,
                           max_attempts=cfg.max_attempts,
                           error="attempts already at the limit when the daemon started",
                           action=f"contimg-publisher show {data_id}; then retry")
        self.next_reconcile = time.monotonic() + cfg.reconcile_seconds

    def _rescan(self, startup: bool = False) -> None:
        assert self.detector is not None
        started = time.monotonic()
        if startup:
            notify(f"EXTEND_TIMEOUT_USEC={int(max(60, self.config.rescan_seconds) * 1e6)}")
        stats = self.detector.scan()
        self.log.info("rescan", seconds=round(time.monotonic() - started, 3), **stats)
        self._log_walk_problems()
        self.next_rescan = time.monotonic() + self.config.rescan_seconds
        self.rescan_requested = False

    def _log_walk_problems(self) -> None:
        """Folders of the staging area a walk did not enter: each said once while it lasts."""
        assert self.detector is not None
        for problem in self.detector.take_problems():
            self.log.warning("folder_not_walked", path=problem.path, problem=problem.kind,
                             error=problem.reason,
                             action="what lies below it is not published; move it to a "
                                    "shallower folder or remove it")

    # --- the loop -------------------------------------------------------------------------

    def run(self) -> int:
        self.start()
        while True:
            self._handle_signals()
            if self.stopping:
                break
            if self.outage is not None and not outage.due(self.outage, time.monotonic()):
                self._ping()  # paused: signals and the watchdog only, until the next try
                self._sleep(self._paused_timeout())
                continue
            retried = self.outage is not None
            try:
                if retried:
                    self._retry_registry()
                self._step()
                timeout = self._timeout()
            except RegistryGone as exc:
                self._registry_gone(exc)
                break
            except TRANSIENT as exc:
                self._registry_unavailable(exc)
                self._ping()
                timeout = self._paused_timeout()
            except (RegistryError, OSError) as exc:
                if fdlimit.exhausted(exc):
                    timeout = self._out_of_descriptors(exc)
                else:
                    # A staging area that went away: say so and try again on the next
                    # turn; the watchdog still sees a loop that turns.
                    self.log.error("loop_error", error=f"{type(exc).__name__}: {exc}")
                    self._sleep(1.0)
                    timeout = 0.0
            except Exception as exc:  # one odd path or event never ends the daemon
                self.log.error("loop_error", error=f"{type(exc).__name__}: {exc}",
                               traceback=traceback.format_exc(limit=-8))
                self._sleep(1.0)
                timeout = 0.0
            else:
                if retried and self.outage is not None:
                    self._registry_available()
                if self.shortage is not None:
                    self._descriptors_available()
            self._sleep(timeout)
        status = self._shutdown()
        return self.exit_code or status

    # --- out of descriptors -----------------------------------------------------------------

    def _out_of_descriptors(self, exc: BaseException) -> float:
        """A turn failed for lack of descriptors: said once, then the loop waits a growing
        pause (pinging the watchdog) instead of failing again at once."""
        error = f"{type(exc).__name__}: {exc}"
        if self.shortage is None:
            self.shortage = fdlimit.Shortage(time.monotonic(), error)
            soft, hard = fdlimit.limits()
            self.log.error("descriptors_exhausted", error=error, limit_soft=soft,
                           limit_hard=hard, retry_in_seconds=self.shortage.pause,
                           reason="publishing waits until descriptors are free again; "
                                  "retried with backoff, resumes by itself",
                           action="see what holds this process's descriptors (ls -l "
                                  f"/proc/{os.getpid()}/fd) or the system's (fs.file-nr)")
            pause = self.shortage.pause
        else:
            pause = self.shortage.again()
        self._ping()
        return pause

    def _descriptors_available(self) -> None:
        assert self.shortage is not None
        was, self.shortage = self.shortage, None
        self.log.info("descriptors_available", seconds=round(time.monotonic() - was.since, 1),
                      failed_turns=was.turns, error_was=was.error,
                      open_descriptors=fdlimit.open_count(), reason="publishing resumed")

    # --- the registry unavailable ---------------------------------------------------------

    def _registry_unavailable(self, exc: Exception) -> None:
        """Publishing pauses: nothing is claimed, registered or removed until a retry
        proves the registry takes commits again. Said once, then at most once a minute."""
        error = str(unavailable(exc, self.config.registry_shown))
        now = time.monotonic()
        if self.outage is None:
            self.outage = outage.begin(error, now, time.time())
            self.log.error("registry_unavailable", registry=self.config.registry_shown,
                           error=error, retry_in_seconds=outage.RETRY_INITIAL_SECONDS,
                           reason="publishing paused: nothing leaves staging without its "
                                  "record; retried with backoff, resumes by itself",
                           action=_outage_action(self.config))
        elif outage.failed_again(self.outage, error, now):
            self.log.warning("registry_still_unavailable", registry=self.config.registry_shown,
                             error=error, seconds=round(self.outage.seconds(now), 1),
                             tries=self.outage.tries,
                             retry_in_seconds=round(self.outage.next_try - now, 1))
        self._say_outage()

    def _retry_registry(self) -> None:
        """A real write first (a turn with nothing to record proves nothing), then what a
        reload could not record while the registry was unavailable."""
        assert self.registry is not None
        self.registry.probe()
        if self.pending_park is not None:
            park_outside_root(self.config, self.registry, self.log, self.pending_park)
            self.pending_park = None

    def _registry_available(self) -> None:
        assert self.outage is not None
        was = self.outage
        self.outage = None
        self.log.info("registry_available", registry=self.config.registry_shown,
                      seconds=round(was.seconds(time.monotonic()), 1), tries=was.tries,
                      error_was=was.reason, reason="publishing resumed")
        self._say_outage()

    def _say_outage(self) -> None:
        """The pause (or its end) in STATUS=, the metrics and the lock file's note."""
        self.metrics.observe_registry(None if self.outage is None else self.outage.reason,
                                      None if self.outage is None else self.outage.since)
        if self.lock is not None:
            self.lock.note(outage.note(self.outage))
        notify(f"STATUS={self._status_line()}")
        self.next_status = time.monotonic() + 5.0

    def _paused_timeout(self) -> float:
        """Until the next try, the next STATUS= refresh or the next watchdog ping."""
        assert self.outage is not None
        now = time.monotonic()
        deadlines = [self.outage.next_try, self.next_status]
        if self.watchdog_interval:
            deadlines.append(self.last_ping + self.watchdog_interval * 0.9)
        return max(0.0, min(deadlines) - now)

    def _step(self) -> None:
        cfg = self.config
        assert self.detector is not None and self.worker is not None and \
            self.registry is not None
        self.registry.check_identity()  # a stat: every turn, before anything is recorded
        now = time.monotonic()
        detecting = not self._publish_turn(now)
        if detecting:
            self._drain_changes()
        if self.watcher is not None and not self.watcher.healthy():
            self.log.warning("watch_restarting", stage_root=str(cfg.stage_root))
            self.watcher.stop()
            self._start_watcher()
            self.rescan_requested = True
        if self.watcher is None and now >= self.next_rescan - cfg.rescan_seconds + 60:
            self._start_watcher()  # retry a watch that could not be set up
        if detecting and (self.rescan_requested or now >= self.next_rescan):
            self._rescan()
        self._collect_results()
        if detecting:
            for outcome in self.detector.process():
                self._after_detect(outcome)
        if self.abandoned and self.worker.busy is None:
            self._resolve_abandoned()
        if self.worker.busy is None:
            self._claim_next()
        self._advance_sweep()
        if time.monotonic() >= self.next_reconcile:
            self._reconcile()
        self._heartbeat()
        self._ping()

    def _publish_turn(self, now: float) -> bool:
        """Whether detection waits for the batch in flight. Two threads busy in Python at
        once hand the GIL to each other at every system call, which on two cores costs more
        than either does: a burst drains fastest when registering and publishing take turns,
        as in `scan`. A batch still running after PUBLISH_TURN_SECONDS is in a long copy
        (system calls, no Python to compete with), and detection goes on beside it."""
        assert self.worker is not None
        worker = self.worker
        return worker.busy is not None and worker.results.empty() and \
            now - worker.busy_since < PUBLISH_TURN_SECONDS

    def _heartbeat(self) -> None:
        """This daemon is alive (the registry's heartbeats, which `status` lists per node)."""
        assert self.registry is not None
        now = time.monotonic()
        if now >= self.next_heartbeat:
            self.registry.heartbeat(self.owner, self.started_at, __version__)
            self.next_heartbeat = now + registry_mod.HEARTBEAT_SECONDS

    def _drain_changes(self) -> None:
        assert self.detector is not None
        for _ in range(100_000):
            try:
                change = self.changes.get_nowait()
            except queue.Empty:
                return
            tracker = self.gate.tracker
            assert tracker is not None
            if isinstance(change, str):  # watch.RESCAN, the only string the watcher queues
                self.rescan_requested = True
                tracker.clear()  # a close-write may be among the events lost
                continue
            if change.kind == "modified":
                tracker.modified(change.path)
            elif change.kind == "closed":
                tracker.closed_after_write(change.path)
            elif change.kind in ("deleted", "moved_out"):
                tracker.moved(change.path, change.dest)
            if change.kind in ("deleted", "moved_out"):
                self.detector.forget(change.path)
            elif change.kind in ("created", "moved_in") and os.path.isdir(change.path) and \
                    not os.path.islink(change.path):
                self.detector.note(change.path)
                self.detector.note_folder(change.path)
                self._log_walk_problems()
            else:
                self.detector.note(change.path)

    def _after_detect(self, outcome: detect.Outcome) -> None:
        log_outcome(self.log, outcome)
        self.metrics.observe_detect(outcome)
        if outcome.action in TIDY_ACTIONS:
            assert self.registry is not None
            publisher = publish.Publisher(self.config, self.registry, self.owner, self.log,
                                          self.gate)
            log_tidied(self.log, publisher.tidy(outcome))

    def _claim_next(self) -> None:
        """Once per wake-up: when is the next row due (an indexed read, no write transaction
        while idle), and if it is now, claim a batch as `scan` does."""
        assert self.registry is not None and self.worker is not None
        self.next_due = self.registry.next_due_at()
        if self.next_due is None or self.next_due > time.time():
            return
        claimed = self.registry.claim(self.owner, self.config.lease_seconds, limit=SCAN_BATCH,
                                      max_bytes=SCAN_BATCH_BYTES)
        if claimed:
            self.own_moves.expect([_event_path(p) for p in claimed])
            self.worker.submit(claimed, self.config)

    def _collect_results(self) -> None:
        assert self.worker is not None
        while True:
            try:
                products, results = self.worker.results.get_nowait()
            except queue.Empty:
                return
            self.worker.busy = None
            if isinstance(results, Exception):
                for product in products:
                    self._not_moved(product)
            if isinstance(results, RegistryGone):
                self._registry_gone(results)
                continue
            if isinstance(results, TRANSIENT):  # nothing was removed; resolved once back
                self._registry_unavailable(results)
                self.abandoned.extend(product.data_id for product in products)
                continue
            if isinstance(results, Exception):
                for product in products:
                    self.log.error("publish_crashed", data_id=product.data_id,
                                   data_type=product.data_type, stage_path=product.stage_path,
                                   error=f"{type(results).__name__}: {results}",
                                   action="resolved from disk and the row by this process")
                    self.metrics.observe_crash()
                    self.abandoned.append(product.data_id)
                continue
            for product, result in zip(products, results, strict=True):
                self._after_publish(product, result)
            if self.delivery is not None and any(
                    result.status is Attempt.PUBLISHED for result in results):
                # The batch's events are committed; never waited for. Once a batch, not once
                # a product: each wake-up is the delivery thread taking the GIL.
                self.delivery.wake()

    def _not_moved(self, product: Product) -> None:
        """The publish from this path did not happen: an event the watch dropped for it
        (another hand moved the file) is handled as any other."""
        change = self.own_moves.release(_event_path(product))
        if change is not None:
            self.changes.put(change)

    def _moved_out(self, product: Product) -> None:
        """What the event of our own rename out of staging would have done (see _drain_changes:
        the tracker and the detector forget the path; the registry need not be asked whether
        a row still waits there, its row is the one just published)."""
        path = _event_path(product)
        self.own_moves.published(path)
        if self.gate.tracker is not None:
            self.gate.tracker.moved(path, "")
        if self.detector is not None:
            self.detector.drop(path)

    def _after_publish(self, product: Product, result: publish.Result) -> None:
        if result.status is Attempt.PUBLISHED:
            self._moved_out(product)
        else:
            self._not_moved(product)
        if result.status is Attempt.DEFERRED:
            if result.data_id in self.waiting_for_space:
                return  # said once; tried again after the backoff, quietly
            self.waiting_for_space.add(result.data_id)
        else:
            self.waiting_for_space.discard(result.data_id)
        log_result(self.log, result, self.config.max_attempts)
        self.metrics.observe_result(result, product.size_bytes)
        if result.status is Attempt.PUBLISHED:
            self.last_published = f"{result.data_id} at {time.strftime('%H:%M:%S')}"
        if result.kind == "source_changed" and self.detector is not None:
            self.detector.note(os.fsencode(product.stage_path) if product.stage_path_bytes
                               is None else product.stage_path_bytes)

    def _registry_gone(self, exc: RegistryError) -> None:
        """The registry file was deleted or replaced under the daemon: publish nothing more,
        remove nothing, say so loudly, and exit non-zero (systemd's restart then meets the
        start-up check, which will not create an empty registry beside the archive)."""
        self.log.critical("registry_gone", registry=self.config.registry_shown, error=str(exc),
                          action="restore the registry file (from the copy the daemon had "
                                 "open, or a backup), then start the daemon")
        notify(f"STATUS=stopped: {exc}")
        self.exit_code = 1
        self.stopping = True

    def _resolve_abandoned(self) -> None:
        """A RegistryError here leaves them for the next turn (the loop logs it)."""
        assert self.registry is not None
        results = reconcile.resolve_own(self.config, self.registry, self.owner,
                                        self.abandoned, self.log)
        self.abandoned = []
        for result in results:
            self.log.warning("reconciled", data_id=result.data_id, data_type=result.data_type,
                             stage_path=result.stage_path, outcome=result.status,
                             published_path=result.published_path)

    def _timeout(self) -> float:
        now = time.monotonic()
        deadlines = [self.next_rescan, self.next_reconcile, now + 1.0]
        if self._publish_turn(now):
            assert self.worker is not None
            deadlines.append(self.worker.busy_since + PUBLISH_TURN_SECONDS)
        elif self.detector is not None and (check := self.detector.next_check()) is not None:
            deadlines.append(now + (check - time.time()))
        if self.worker is not None and self.worker.busy is None and self.next_due is not None:
            deadlines.append(now + (self.next_due - time.time()))  # asked by _claim_next
        if self.watchdog_interval:
            deadlines.append(self.last_ping + self.watchdog_interval)
        return max(0.0, min(deadlines) - now)

    def _ping(self) -> None:
        now = time.monotonic()
        if now >= self.next_status:
            notify(f"STATUS={self._status_line()}")
            self.next_status = now + 5.0
        if self.watchdog_interval and now - self.last_ping >= self.watchdog_interval * 0.9:
            notify("WATCHDOG=1")
            self.last_ping = now

    def _status_line(self) -> str:
        if self.outage is not None:
            return outage.status_line(self.outage)
        assert self.registry is not None
        try:
            c = self.registry.counts()
        except TRANSIENT as exc:  # the loop's next turn pauses on it
            return f"registry unavailable: {unavailable(exc, self.config.registry_shown)}"
        watching = "watching" if self._watching() else "scanning every " \
            f"{self.config.rescan_seconds:g} s"
        line = (f"{watching} {self.config.stage_root}: {c['staging']} waiting, "
                f"{c['publishing']} publishing, {c['failed']} failed, {c['rejected']} rejected; "
                f"last publish: {self.last_published or 'none yet'}")
        return f"{self.status_note}; {line}" if self.status_note else line

    # --- signals --------------------------------------------------------------------------

    def _handle_signals(self) -> None:
        while self.signals:
            signum = self.signals.pop(0)
            if signum == signal.SIGHUP:
                self._reload()
            elif signum in (signal.SIGTERM, signal.SIGINT):
                self.stopping = True

    def _reload(self) -> None:
        notify("RELOADING=1", f"MONOTONIC_USEC={monotonic_usec()}")
        try:
            new = config_mod.load(self.config_path)
        except ConfigError as exc:
            self.status_note = f"reload failed ({exc.key}: {exc.reason}); running on the " \
                "previous configuration"
            self.log.error("reload_failed", config=exc.path, key=exc.key, error=exc.reason)
            self.metrics.observe_reload(False)
            notify("READY=1", f"STATUS={self._status_line()}")
            return
        try:  # a record's table without a column the new rules name: keep the old gate
            assert self.registry is not None
            self.registry.set_qa_gate(qa.conditions(new.products), qa.records(new.products))
        except RegistryError as exc:
            self.status_note = f"reload failed ({exc}); running on the previous configuration"
            self.log.error("reload_failed", config=self.config_path, key="products.record",
                           error=str(exc))
            self.metrics.observe_reload(False)
            notify("READY=1", f"STATUS={self._status_line()}")
            return
        old = self.config
        kept = []
        if new.registry != old.registry or new.lock_path != old.lock_path:
            kept.append("paths.registry/lock_file (take effect at restart)")
            new = _with(new, registry=old.registry, lock_file=old.lock_file)
        self.config = new
        logs.configure(new.log_level, new.log_format, new.error_max_chars)
        self.log = logs.get_logger()
        assert self.detector is not None and self.registry is not None
        self.detector.reconfigure(new)
        if self.delivery is not None:
            self.delivery.reconfigure(new)
        if self.auditor is not None:
            self.auditor.reconfigure(new)
        if new.stage_root != old.stage_root:
            if self.watcher is not None:
                self.watcher.stop()
            self._start_watcher()
            assert self.registry is not None
            try:
                park_outside_root(new, self.registry, self.log, old.stage_root)
            except TRANSIENT as exc:  # parked by the first retry that can write
                self.pending_park = old.stage_root
                self._registry_unavailable(exc)
            assert self.gate.tracker is not None
            self.gate.tracker.clear()
            self._probe_writers()
        if new.products_root != old.products_root:
            self._start_sweep()
        self.rescan_requested = True
        self.status_note = ""
        self.metrics.observe_reload(True, new)
        if (new.metrics_enabled, new.metrics_listen) != (old.metrics_enabled,
                                                          old.metrics_listen):
            self._stop_metrics()
            self._start_metrics()
        self.log.info("reload_ok", config=self.config_path,
                      changed=sorted(k for k, v in new.as_dict().items()
                                     if old.as_dict().get(k) != v and k != "source"),
                      kept=kept)
        notify("READY=1", f"STATUS={self._status_line()}")

    # --- shutdown -------------------------------------------------------------------------

    def _shutdown(self) -> int:
        notify("STOPPING=1", "STATUS=stopping")
        in_flight = self.worker.busy if self.worker and self.worker.busy else []
        self.log.info("stopping", in_flight=in_flight[0].data_id if in_flight else None,
                      batch=len(in_flight))
        if self.watcher is not None:
            self.watcher.stop()
        if self.delivery is not None:
            self.delivery.stop()  # a delivery in flight is cut short: sent again next start
        self._stop_auditor()
        if self.worker is not None:
            self.worker.stop_batch.set()  # the product in hand is finished, the rest go back
            deadline = time.monotonic() + self.config.stop_timeout_seconds
            while self.worker.busy is not None and time.monotonic() < deadline:
                self._sleep(min(0.5, deadline - time.monotonic()))
                self._collect_results()
                self._ping()
            if self.worker.busy is not None:
                self.worker.cancel.set()  # the copy stops, removes its temporary file, requeues
                while self.worker.busy is not None:
                    self._sleep(0.5)
                    self._collect_results()
            self.worker.stop()
            if self.worker.thread is not None:
                self.worker.thread.join(timeout=10)
        self._stop_metrics()
        if self.registry is not None:
            with contextlib.suppress(RegistryError):
                self.registry.end_heartbeat(self.owner)
            self.registry.close()
        if self.lock is not None:
            self.lock.release()
        self.log.info("stopped")
        return 0


def _outage_action(cfg: Config) -> str:
    """What an operator can do about a registry that cannot be used, per backend."""
    if cfg.registry_is_server:
        return ("start the PostgreSQL server, restore the network to it, or make it "
                "writable again (free space, promote a standby)")
    return ("free space, make the registry files writable again (chattr -i, remount "
            "read-write) or end the process that holds its write lock")


def _event_path(product: Product) -> str:
    """The product's staged path as the watch names it in its events (os.fsdecode form)."""
    return os.fsdecode(product.stage_bytes)


def _with(cfg: Config, **changes: Any) -> Config:
    from dataclasses import replace
    return replace(cfg, **changes)


# --- one-shot work for the CLI --------------------------------------------------------------

TIDY_ACTIONS = (Detected.LEFTOVER, Detected.LATE_SIDECAR)


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


# The daemon and `scan` publish in batches that share their commits and folder fsyncs; the
# byte bound keeps a batch of large copies from holding its claims (and their commits) for
# long, and a lone large product is a batch of its own.
SCAN_BATCH = 256
SCAN_BATCH_BYTES = 256 << 20
# How long detection waits for a batch in flight (Daemon._publish_turn): longer than a batch
# of small products takes, shorter than a copy worth overlapping.
PUBLISH_TURN_SECONDS = 0.5


@dataclass
class PassReport:
    detected: list[detect.Outcome] = field(default_factory=list)
    published: list[publish.Result] = field(default_factory=list)
    reconciled: list[publish.Result] = field(default_factory=list)
    waiting: int = 0


def scan_once(cfg: Config, log: Any) -> PassReport:
    """`scan`: one pass under the lock: reconcile, detect and register, publish what is due."""
    report = PassReport()
    owner = lock.owner_id()
    refuse_new_over_archive(cfg.registry, cfg.products_root)
    with lock.acquire(str(cfg.lock_path), "scan", wait_seconds=cfg.lock_wait_seconds), \
            open_registry(cfg) as registry:
        report.reconciled = reconcile.reconcile(cfg, registry, owner, log)
        park_outside_root(cfg, registry, log)
        registry.mark_exhausted(cfg.max_attempts, owns=lambda row: detect.owns(cfg, row))
        detector = detect.Detector(cfg, registry)
        detector.scan()
        for problem in detector.take_problems():
            log.warning("folder_not_walked", path=problem.path, problem=problem.kind,
                        error=problem.reason)
        # Paths that finish settling within one settle time are taken in this same pass.
        report.detected = detector.settle(deadline=time.time() + cfg.settle_seconds + 0.5)
        report.waiting = len(detector.pending)
        publisher = publish.Publisher(cfg, registry, owner, log)
        for outcome in report.detected:
            if outcome.action in TIDY_ACTIONS:
                log_tidied(log, publisher.tidy(outcome))
        while claimed := registry.claim(owner, cfg.lease_seconds, limit=SCAN_BATCH,
                                        max_bytes=SCAN_BATCH_BYTES):
            report.published += publisher.publish_many(claimed)
    return report


def publish_now(cfg: Config, data_id: str, log: Any, wait_seconds: float | None = None,
                override_qa: str | None = None) -> publish.Result | str:
    """`publish DATA_ID`: under the lock if it is free; otherwise handed to the daemon that
    holds it, waiting for the outcome. Returns the result, or a string saying what blocked.

    A product the QA gate holds is published only with `override_qa`, the operator's
    reason, which is logged with the gate's."""
    wait = cfg.lock_wait_seconds if wait_seconds is None else wait_seconds
    deadline = time.monotonic() + wait
    owner = lock.owner_id()
    refuse_new_over_archive(cfg.registry, cfg.products_root)
    with open_registry(cfg) as registry:
        row = registry.get(data_id)
        if row is None:
            return f"{data_id}: no such product"
        if row.status == Status.PUBLISHED:
            return f"{data_id}: already published at {row.published_path}"
        if row.status == Status.REJECTED:
            return f"{data_id}: rejected ({row.publish_error}); fix the staged file first"
        if not detect.owns(cfg, row):
            return (f"{data_id}: no product rule of this configuration owns it (type "
                    f"{row.data_type!r} at {row.stage_path}); it is another writer's row")
        gate = registry_mod.qa_holds(registry, [data_id]).get(data_id)
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
                            row.status != "publishing":
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
