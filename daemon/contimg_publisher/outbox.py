"""Deliver the outbox's events to the configured sinks, in a thread of its own.

Publishing only writes events (Registry.mark_published, in the transaction that records the
publish); this thread reads them and moves each sink's cursor, through its own registry
connection, so a sink that is slow or down never delays a publish or the main loop. Each
sink takes the events in order: its oldest undelivered event (its head) is sent until the
sink takes it, with backoff, and the ones after it wait (for that sink only). A delivery is
recorded after the sink took it, so a kill in between sends it again: at least once, with
the same event_id, which the webhook also carries as its Idempotency-Key.

On a registry several nodes share, delivery is one daemon's duty at a time
(registry.lead(Duty.OUTBOX)): the others' threads stand by, so each event reaches each sink
once, and the one holding the duty renews it before every attempt. Its lease outlasts an
attempt (twice the sinks' timeouts), so a daemon that was killed hands the duty over
within that lease and a living one never loses it in the middle of an attempt.
"""

from __future__ import annotations

import contextlib
import email.utils
import http.client
import json
import os
import signal
import socket
import ssl
import subprocess
import threading
import time
from dataclasses import dataclass
from typing import Any, Protocol
from urllib.parse import urlsplit

from contimg_publisher import __version__, logs, redact
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
from contimg_publisher.states import Duty, Sink

POLL_SECONDS = 2.0  # events written by other processes (`scan`, `publish`) are found this fast
ANSWER_MAX_BYTES = 2048  # of a refusal's body or a command's stderr, kept for the error text


@dataclass(frozen=True)
class Outcome:
    """One attempt: taken by the sink, or why not (and how long the sink asked to wait)."""

    ok: bool
    error: str | None = None
    retry_after: float | None = None


def body(event: Event) -> bytes:
    """The JSON every sink gets, the same bytes at every attempt."""
    return json.dumps(event.to_json(), sort_keys=True, separators=(",", ":"),
                      default=str).encode()


def shown_url(url: str) -> str:
    """The URL as logs show it (redact.url: no password, no token)."""
    return redact.url(url)


class Target(Protocol):
    name: Sink

    def deliver(self, event: Event) -> Outcome: ...

    def cancel(self) -> None: ...

    def describe(self) -> str: ...


class Webhook:
    """POST of the event as JSON; any 2xx answer is delivery. Separate connect and read
    timeouts (http.client: urllib has one timeout for both), TLS verified by the system's
    trust store, redirects not followed (a 3xx is a failure that names the new place)."""

    name = Sink.WEBHOOK

    def __init__(self, url: str, connect_timeout: float, read_timeout: float) -> None:
        self.url = url
        self.connect_timeout = connect_timeout
        self.read_timeout = read_timeout
        self._conn: http.client.HTTPConnection | None = None

    def describe(self) -> str:
        return shown_url(self.url)

    def deliver(self, event: Event) -> Outcome:
        parts = urlsplit(self.url)
        host = parts.hostname or ""
        target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        conn: http.client.HTTPConnection
        if parts.scheme == "https":
            conn = http.client.HTTPSConnection(host, parts.port, timeout=self.connect_timeout,
                                               context=ssl.create_default_context())
        else:
            conn = http.client.HTTPConnection(host, parts.port, timeout=self.connect_timeout)
        self._conn = conn
        stage = "connect"
        try:
            conn.connect()  # TCP and, for https, the TLS handshake: the connect timeout
            assert conn.sock is not None
            conn.sock.settimeout(self.read_timeout)
            stage = "send"
            conn.request("POST", target, body=body(event), headers={
                "Content-Type": "application/json",
                "Idempotency-Key": event.event_id,
                "User-Agent": f"contimg-publisher/{__version__}"})
            stage = "answer"
            resp = conn.getresponse()
            answer = resp.read(ANSWER_MAX_BYTES)
        except TimeoutError:
            limit = self.connect_timeout if stage == "connect" else self.read_timeout
            key = "connect_timeout_seconds" if stage == "connect" else "read_timeout_seconds"
            what = "no connection" if stage == "connect" else "no answer"
            return Outcome(False, f"{what} within {limit:g} s ([notify] {key})")
        except ssl.SSLError as exc:
            return Outcome(False, f"TLS: {exc.reason or exc}")
        except (OSError, http.client.HTTPException) as exc:
            text = exc.strerror if isinstance(exc, OSError) and exc.strerror else \
                f"{type(exc).__name__}: {exc}"
            return Outcome(False, f"{stage}: {text}")
        finally:
            self._conn = None
            conn.close()
        if 200 <= resp.status < 300:
            return Outcome(True)
        snippet = answer.decode("utf-8", "replace").strip().replace("\n", " ")[:200]
        where = resp.getheader("Location")
        text = f"HTTP {resp.status} {resp.reason}" + (f" (to {where})" if where else "") + \
            (f": {snippet}" if snippet else "")
        return Outcome(False, text, retry_after(resp.getheader("Retry-After")))

    def cancel(self) -> None:
        """Wake a request blocked in a read (shutdown): it fails, and is sent again later."""
        conn = self._conn
        if conn is not None and conn.sock is not None:
            with contextlib.suppress(OSError):
                conn.sock.shutdown(socket.SHUT_RDWR)


def retry_after(value: str | None) -> float | None:
    """Retry-After in seconds (a number or an HTTP date), None when absent or unreadable."""
    if not value:
        return None
    if value.strip().isdigit():
        return float(value.strip())
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


class Command:
    """The event's JSON on the program's standard input; exit status 0 is delivery. Run
    without a shell, in a session of its own so a timeout kills what it started too."""

    name = Sink.COMMAND

    def __init__(self, argv: tuple[str, ...], timeout: float) -> None:
        self.argv = argv
        self.timeout = timeout
        self._proc: subprocess.Popen[bytes] | None = None

    def describe(self) -> str:
        return redact.text(" ".join(self.argv))

    def deliver(self, event: Event) -> Outcome:
        env = dict(os.environ, CONTIMG_EVENT_ID=event.event_id, CONTIMG_EVENT_TYPE=event.type,
                   CONTIMG_DATA_ID=event.data_id)
        try:
            proc = subprocess.Popen(self.argv, stdin=subprocess.PIPE,
                                    stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                    env=env, start_new_session=True, close_fds=True)
        except OSError as exc:
            return Outcome(False, f"cannot run {self.argv[0]}: {exc.strerror or exc}")
        self._proc = proc
        try:
            try:
                _out, err = proc.communicate(body(event), timeout=self.timeout)
            except subprocess.TimeoutExpired:
                self._kill(proc)
                proc.communicate()
                return Outcome(False, f"still running after {self.timeout:g} s ([notify] "
                                      "command_timeout_seconds); killed")
        finally:
            self._proc = None
        if proc.returncode == 0:
            return Outcome(True)
        tail = err[-ANSWER_MAX_BYTES:].decode("utf-8", "replace").strip().replace("\n", " ")
        how = (f"killed by signal {-proc.returncode}" if proc.returncode < 0
               else f"exit status {proc.returncode}")
        return Outcome(False, how + (f": {tail[-300:]}" if tail else ""))

    @staticmethod
    def _kill(proc: subprocess.Popen[bytes]) -> None:
        with contextlib.suppress(OSError):
            os.killpg(proc.pid, signal.SIGKILL)

    def cancel(self) -> None:
        proc = self._proc
        if proc is not None:
            self._kill(proc)


def duty_lease(cfg: Config) -> float:
    """How long the delivery duty is held without a renewal: twice the longest attempt a
    sink can take, and at least a minute."""
    return max(60.0, 2 * (cfg.notify_connect_timeout_seconds + cfg.notify_read_timeout_seconds),
               2 * cfg.notify_command_timeout_seconds)


def targets(cfg: Config) -> list[Target]:
    """The configured sinks, in the order config.notify_sinks names them."""
    out: list[Target] = []
    if cfg.notify_url:
        out.append(Webhook(cfg.notify_url, cfg.notify_connect_timeout_seconds,
                           cfg.notify_read_timeout_seconds))
    if cfg.notify_command:
        out.append(Command(cfg.notify_command, cfg.notify_command_timeout_seconds))
    return out


class Delivery:
    """The delivery thread. The main loop only calls wake() (a new publish), reconfigure()
    (SIGHUP) and stop(); none of them waits for a sink."""

    def __init__(self, config: Config, metrics: Any = None, owner: str | None = None) -> None:
        self.config = config
        self.metrics = metrics  # metrics.Metrics; its counters are thread-safe
        # Who holds the delivery duty on a shared registry: the daemon's lease owner.
        self.owner = owner or f"{socket.gethostname()}:{os.getpid()}:outbox"
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._next: dict[str, float] = {}  # sink -> monotonic time of its next attempt
        self._current: Target | None = None
        self.thread: threading.Thread | None = None

    def start(self) -> None:
        self.thread = threading.Thread(target=self._run, name="contimg-outbox", daemon=True)
        self.thread.start()

    def wake(self) -> None:
        self._wake.set()

    def reconfigure(self, config: Config) -> None:
        """New [notify] values apply from the next attempt, which is made at once: an
        operator who fixed a URL need not wait out the backoff."""
        self.config = config
        self._next = {}
        self._wake.set()

    def stop(self, timeout: float = 5.0) -> None:
        """Stop; a delivery in flight is cut short (sent again at the next start)."""
        self._stop.set()
        self._wake.set()
        current = self._current
        if current is not None:
            current.cancel()
        if self.thread is not None:
            self.thread.join(timeout)

    def _run(self) -> None:
        registry: RegistryBackend | None = None
        known: tuple[str, ...] = ()
        leading: bool | None = None  # whether this daemon holds the duty (None: not asked)
        pause = 0.0  # while the registry cannot be used: backoff, said once
        while not self._stop.is_set():
            cfg = self.config
            wait = POLL_SECONDS
            try:
                if registry is None:
                    registry = open_registry(cfg, migrate=False)
                if cfg.notify_sinks != known:
                    registry.add_sinks(cfg.notify_sinks)
                    known = cfg.notify_sinks
                now_leading = registry.lead(Duty.OUTBOX, self.owner, duty_lease(cfg))
                if now_leading != leading:
                    logs.get_logger().info(
                        "outbox_duty", leading=now_leading, owner=self.owner,
                        reason="this daemon delivers the outbox" if now_leading else
                        "another daemon of the shared registry delivers the outbox; this one "
                        "takes over if that one stops")
                    leading = now_leading
                if now_leading:
                    wait = self._pass(registry, cfg)
                if pause:
                    logs.get_logger().info("outbox_resumed", reason="the registry can be "
                                           "used again")
                pause = 0.0
            except TRANSIENT as exc:
                if not pause:
                    logs.get_logger().warning(
                        "outbox_paused", error=str(unavailable(exc, str(cfg.registry))),
                        reason="events are delivered once the registry can be used again")
                pause = wait = min(60.0, max(1.0, pause * 2))
            except (RegistryError, Exception) as exc:  # the thread must not die silently
                logs.get_logger().error("outbox_error", error=f"{type(exc).__name__}: {exc}",
                                        reason="delivery is tried again in 10 s")
                if registry is not None and not isinstance(exc, TRANSIENT):
                    with contextlib.suppress(Exception):
                        registry.close()
                    registry, known = None, ()
                wait = 10.0
            self._wake.wait(wait)
            self._wake.clear()
        if registry is not None:
            if leading:
                with contextlib.suppress(Exception):  # else its lease lapses by itself
                    registry.resign(Duty.OUTBOX, self.owner)
            registry.close()

    def _pass(self, registry: RegistryBackend, cfg: Config) -> float:
        """One attempt for each sink that is due and has an event; returns how long to wait
        before the next pass (0: a sink took an event, more may wait)."""
        wait = POLL_SECONDS
        for target in targets(cfg):
            if self._stop.is_set():
                return 0.0
            now = time.monotonic()
            due = self._next.get(target.name, 0.0)
            if now < due:
                wait = min(wait, due - now)
                continue
            event = registry.outbox_head(target.name)
            if event is None:
                continue
            self._current = target
            try:
                outcome = target.deliver(event)
            finally:
                self._current = None
            if outcome.ok:
                self._delivered(registry, target, event)
                wait = 0.0
            elif self._stop.is_set():
                return 0.0  # cut short by stop(): not the sink's failure
            else:
                wait = min(wait, self._failed(registry, cfg, target, event, outcome))
        return wait

    def _delivered(self, registry: RegistryBackend, target: Target, event: Event) -> None:
        self._next.pop(target.name, None)
        attempts = registry.record_delivered(target.name, event.seq)
        if self.metrics is not None:
            self.metrics.observe_delivery(target.name, True)
        logs.get_logger().info("event_delivered", sink=str(target.name),
                               event_id=event.event_id, sequence=event.seq,
                               data_id=event.data_id, attempts=attempts)

    def _failed(self, registry: RegistryBackend, cfg: Config, target: Target, event: Event,
                outcome: Outcome) -> float:
        # An answer may name a URL (a redirect's Location): kept and shown without secrets.
        error = redact.text(outcome.error or "failed")
        attempts, dead = registry.record_delivery_failure(
            target.name, event.seq, error, cfg.error_max_chars, cfg.notify_max_attempts)
        log = logs.get_logger()
        if self.metrics is not None:
            self.metrics.observe_delivery(target.name, False, dead=dead)
        fields = {"sink": str(target.name), "target": target.describe(),
                  "event_id": event.event_id, "sequence": event.seq, "data_id": event.data_id,
                  "attempt": attempts, "error": error}
        if dead:
            log.error("event_dead_lettered", **fields, max_attempts=cfg.notify_max_attempts,
                      reason="given up on for this sink; the events after it go on",
                      action="fix the consumer, then `contimg-publisher events "
                             "--redeliver-dead` sends it and those after it again")
            self._next.pop(target.name, None)
            return 0.0
        delay = backoff_delay(attempts, cfg.notify_retry_initial_seconds,
                              cfg.notify_retry_max_seconds)
        if outcome.retry_after is not None:
            delay = min(cfg.notify_retry_max_seconds, max(delay, outcome.retry_after))
        self._next[target.name] = time.monotonic() + delay
        log.warning("event_delivery_failed", **fields, retry_in_seconds=round(delay, 1),
                    reason="this sink's later events wait behind it; publishing goes on")
        return delay
