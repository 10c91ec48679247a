"""Prometheus metrics and the status page, served by the daemon on one address.

What the registry already knows (products by status, the oldest waiting product, the
last publish, the file's size) is read at scrape time by a custom collector, so the
numbers are right whichever process changed the registry (the daemon, `scan`, `retry`,
an older tool). What only the daemon sees as it happens (publishes, failures by kind,
durations, detection latency, reloads) goes into counters and histograms fed from the
main loop's events. Counters restart at zero with the process, as Prometheus expects.

The server (statusserver) caps its connections and their deadlines, so a local user with
many idle connections cannot take the daemon's descriptors or threads. Each answer reads
the registry through its own short-lived connection, so a scrape never shares a
connection with the main loop.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import os
import socket
import time
from collections.abc import Iterable, Iterator
from enum import StrEnum
from typing import Any

import apsw
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from contimg_publisher import __version__, logs, space, statuspage, statusreport, statusserver
from contimg_publisher.config import Config, split_listen
from contimg_publisher.registry import (
    FAILURE_KINDS,
    STATUSES,
    RegistryBackend,
    RegistryError,
    open_registry,
)
from contimg_publisher.states import Attempt, Detected, FailureKind, Sink

PREFIX = "contimg_publisher"

PUBLISH_BUCKETS = (0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800, 3600)
LATENCY_BUCKETS = (0.5, 1, 2, 3, 5, 10, 30, 60, 120, 300, 600, 1800, 3600, 21600)
# Failures the daemon can see that the registry has no kind for.
EXTRA_KINDS = (Attempt.LOST, "crashed")


class Reload(StrEnum):
    """How a configuration reload ended (the `result` label of the reloads counter)."""

    OK = "ok"
    FAILED = "failed"


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@contextlib.contextmanager
def _reader(config: Config) -> Iterator[RegistryBackend]:
    registry = open_registry(config, migrate=False, create=False)
    try:
        yield registry
    finally:
        registry.close()


class RegistryCollector(Collector):
    """Gauges read from the registry file at each scrape."""

    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics

    def describe(self) -> Iterable[Any]:
        return []  # the samples come from the registry; nothing to check at registration

    def collect(self) -> Iterable[Any]:
        config = self.metrics.config
        now = time.time()
        readable = GaugeMetricFamily(
            f"{PREFIX}_registry_readable",
            "1 when this scrape could read the registry, 0 when it could not")
        products = GaugeMetricFamily(
            f"{PREFIX}_products", "Products in the registry, by type and status",
            labels=["type", "status"])
        oldest = GaugeMetricFamily(
            f"{PREFIX}_oldest_waiting_age_seconds",
            "Age of the longest-waiting product that is not held (0 when none waits)")
        last = GaugeMetricFamily(
            f"{PREFIX}_last_publish_timestamp_seconds",
            "Unix time of the last successful publish (absent before the first)")
        size = GaugeMetricFamily(f"{PREFIX}_registry_size_bytes",
                                 "Size of the registry database file")
        unclaimed = GaugeMetricFamily(
            f"{PREFIX}_unclaimed_files",
            "Files in product folders of the staging area that no product owns, unchanged "
            "for [detect] unclaimed_after_seconds")
        unclaimed_age = GaugeMetricFamily(
            f"{PREFIX}_unclaimed_oldest_age_seconds",
            "Time since the oldest unclaimed file last changed (0 when there is none)")
        undelivered = GaugeMetricFamily(
            f"{PREFIX}_events_undelivered",
            "Outbox events a configured sink has not taken yet", labels=["sink"])
        undelivered_age = GaugeMetricFamily(
            f"{PREFIX}_events_oldest_undelivered_age_seconds",
            "Age of the oldest event a configured sink has not taken (0 when none waits)",
            labels=["sink"])
        dead = GaugeMetricFamily(
            f"{PREFIX}_events_dead",
            "Events a configured sink gave up on after [notify] max_attempts",
            labels=["sink"])
        findings = GaugeMetricFamily(
            f"{PREFIX}_audit_findings",
            "Open findings of the fixity audit, by kind (missing, size_changed, "
            "checksum_changed, dark_file, ...)", labels=["kind"])
        last_pass = GaugeMetricFamily(
            f"{PREFIX}_audit_last_pass_timestamp_seconds",
            "Unix time the last full pass of the background audit finished (absent before "
            "the first)")
        node_age = GaugeMetricFamily(
            f"{PREFIX}_node_heartbeat_age_seconds",
            "Time since each node's daemon last renewed its heartbeat (a shared registry)",
            labels=["node", "host", "pid"])
        node_stale = GaugeMetricFamily(
            f"{PREFIX}_node_stale",
            "1 for a node's daemon whose heartbeat stopped, else 0 (a shared registry)",
            labels=["node", "host", "pid"])
        try:
            with _reader(config) as registry, registry.read():
                finding_counts = registry.finding_counts()
                audit_state = registry.audit_state()
                by_type = registry.counts_by_type()
                waiting = registry.oldest_unheld_waiting()
                newest = registry.last_published()
                size_bytes = registry.size_bytes()
                strays = registry.unclaimed(now - config.unclaimed_after_seconds)
                sinks = registry.sink_states(config.notify_sinks)
                beats = registry.heartbeats()
        except (RegistryError, apsw.Error, OSError) as exc:
            self.metrics.note_scrape_error(f"{type(exc).__name__}: {exc}")
            readable.add_metric([], 0)
            yield readable
            return
        readable.add_metric([], 1)
        types = {rule.type for rule in config.products} | {t for t, _ in by_type}
        for data_type in sorted(types):
            for status in STATUSES:
                products.add_metric([data_type, status], by_type.get((data_type, status), 0))
        oldest.add_metric([], 0 if waiting is None else max(0.0, now - waiting.staged_at))
        if newest is not None and newest.published_at is not None:
            last.add_metric([], newest.published_at)
        size.add_metric([], size_bytes)
        unclaimed.add_metric([], len(strays))
        unclaimed_age.add_metric([], max((now - u.changed_at for u in strays), default=0.0))
        for sink in sinks:
            undelivered.add_metric([sink.sink], sink.undelivered)
            undelivered_age.add_metric([sink.sink], 0.0 if sink.oldest_undelivered_at is None
                                       else max(0.0, now - sink.oldest_undelivered_at))
            dead.add_metric([sink.sink], sink.dead)
        for kind, n in sorted(finding_counts.items()):
            findings.add_metric([kind], n)
        for b in beats:
            node_age.add_metric([b.node, b.host, str(b.pid)], b.age_seconds)
            node_stale.add_metric([b.node, b.host, str(b.pid)], 1 if b.stale else 0)
        yield from (readable, products, oldest, size, unclaimed, unclaimed_age, undelivered,
                    undelivered_age, dead, findings)
        if beats:
            yield from (node_age, node_stale)
        if newest is not None:
            yield last
        if audit_state.get("last_pass_finished") is not None:
            last_pass.add_metric([], float(audit_state["last_pass_finished"]))
            yield last_pass


class FilesystemCollector(Collector):
    """Free and total space of the filesystems the daemon writes (statvfs at each scrape):
    a full products disk is seen coming, not found by a failing copy."""

    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics

    def describe(self) -> Iterable[Any]:
        return []

    def collect(self) -> Iterable[Any]:
        config = self.metrics.config
        free = GaugeMetricFamily(
            f"{PREFIX}_filesystem_free_bytes",
            "Bytes an unprivileged writer may still use on the filesystem of each root "
            "(statvfs f_bavail)", labels=["root"])
        size = GaugeMetricFamily(f"{PREFIX}_filesystem_size_bytes",
                                 "Size of the filesystem of each root", labels=["root"])
        roots = {"stage": str(config.stage_root), "products": str(config.products_root)}
        if not config.registry_is_server:
            roots["registry"] = os.path.dirname(str(config.registry)) or "."
        for name, path in roots.items():
            try:
                room = space.Room.of(os.statvfs(path))
            except OSError:
                continue  # not there (yet): no sample rather than a made-up one
            free.add_metric([name], room.free_bytes)
            size.add_metric([name], room.size_bytes)
        yield from (free, size)


class Metrics:
    """The daemon's collectors; `observe_*` are called from the main loop."""

    def __init__(self, config: Config, start_time: float | None = None) -> None:
        disable_created_metrics()  # the *_created series only double the size of each scrape
        self.config = config
        self.started_at = time.time() if start_time is None else start_time
        self.registry = CollectorRegistry(auto_describe=True)
        self.last_scrape_error: str | None = None
        r = self.registry
        self.published = Counter(f"{PREFIX}_published", "Products published by this daemon",
                                 ["type"], registry=r)
        self.published_bytes = Counter(f"{PREFIX}_published_bytes",
                                       "Bytes of products published by this daemon (their "
                                       "size, whether copied or linked)",
                                       ["type"], registry=r)
        self.failures = Counter(f"{PREFIX}_failures", "Failed publish attempts, by kind",
                                ["kind"], registry=r)
        self.rejected = Counter(f"{PREFIX}_rejected", "Staged paths rejected as not valid "
                                "products", ["type"], registry=r)
        self.publish_duration = Histogram(
            f"{PREFIX}_publish_duration_seconds", "Time to publish one product (copy, verify, "
            "commit), successful publishes only", ["type"], buckets=PUBLISH_BUCKETS, registry=r)
        self.detection_latency = Histogram(
            f"{PREFIX}_detection_latency_seconds", "From a product's last write to its "
            "registration (includes the settle time)", ["type"], buckets=LATENCY_BUCKETS,
            registry=r)
        self.start_time = Gauge(f"{PREFIX}_start_time_seconds",
                                "Unix time the daemon started", registry=r)
        self.reloads = Counter(f"{PREFIX}_config_reloads", "Configuration reloads (SIGHUP), "
                               "by result", ["result"], registry=r)
        self.last_reload_ok = Gauge(f"{PREFIX}_config_last_reload_successful",
                                    "1 when the last reload applied, 0 when it was refused",
                                    registry=r)
        self.last_reload_time = Gauge(f"{PREFIX}_config_last_reload_timestamp_seconds",
                                      "Unix time of the last reload attempt (the start time "
                                      "before any)", registry=r)
        self.audit_bytes = Counter(f"{PREFIX}_audit_bytes", "Bytes the background audit "
                                   "read back from the products area", registry=r)
        self.info = Gauge(f"{PREFIX}_build_info", "Always 1; the version as a label",
                          ["version"], registry=r)
        # The daemon's own view: 0 while it pauses publishing because the registry cannot be
        # written or read (a scrape may still read it: a full disk does not stop reads).
        self.paused_reason: str | None = None
        self.paused_since: float | None = None
        self.registry_available = Gauge(
            f"{PREFIX}_registry_available", "1 when the daemon can write the registry, 0 "
            "while publishing is paused because it cannot", registry=r)
        self.registry_available.set(1)
        self.registry_unavailable_seconds = Gauge(
            f"{PREFIX}_registry_unavailable_seconds", "How long publishing has been paused "
            "because the registry cannot be used (0 when it can)", registry=r)
        self.registry_unavailable_seconds.set_function(self._paused_seconds)
        self.delivered = Counter(f"{PREFIX}_events_delivered", "Outbox events a sink took, "
                                 "by sink", ["sink"], registry=r)
        self.delivery_failures = Counter(f"{PREFIX}_event_delivery_failures",
                                         "Failed attempts to deliver an outbox event, by sink",
                                         ["sink"], registry=r)
        self.dead_lettered = Counter(f"{PREFIX}_events_dead_lettered", "Outbox events given "
                                     "up on after [notify] max_attempts, by sink", ["sink"],
                                     registry=r)
        for sink in Sink:
            for counter in (self.delivered, self.delivery_failures, self.dead_lettered):
                counter.labels(sink)
        self.info.labels(__version__).set(1)
        self.start_time.set(self.started_at)
        self.last_reload_ok.set(1)
        self.last_reload_time.set(self.started_at)
        for result in Reload:
            self.reloads.labels(result)
        for kind in (*FAILURE_KINDS, *EXTRA_KINDS):
            self.failures.labels(kind)
        self.configure(config)
        r.register(RegistryCollector(self))
        r.register(FilesystemCollector(self))

    def configure(self, config: Config) -> None:
        """Give every configured product type its series from the start, so a rate() or an
        alert has a zero to compare against before the first event."""
        self.config = config
        for rule in config.products:
            for counter in (self.published, self.published_bytes, self.rejected):
                counter.labels(rule.type)
            self.publish_duration.labels(rule.type)
            self.detection_latency.labels(rule.type)

    # --- events from the main loop ---------------------------------------------------------

    def observe_result(self, result: Any, size_bytes: int | None = None) -> None:
        """One publish outcome (a publish.Result); size_bytes: the product's size, which a
        same-filesystem link publishes without copying a byte."""
        if result.status is Attempt.PUBLISHED:
            self.published.labels(result.data_type).inc()
            size = size_bytes if size_bytes is not None else result.bytes
            self.published_bytes.labels(result.data_type).inc(max(0, int(size or 0)))
            self.publish_duration.labels(result.data_type).observe(max(0.0, result.seconds))
        elif result.status.failed:
            kind = result.kind if result.kind in FAILURE_KINDS else FailureKind.OTHER
            self.failures.labels(kind).inc()
        elif result.status is Attempt.REJECTED:  # found by the publish's read of the file
            self.rejected.labels(result.data_type).inc()
        elif result.status is Attempt.LOST:
            self.failures.labels(Attempt.LOST).inc()

    def observe_delivery(self, sink: str, ok: bool, dead: bool = False) -> None:
        """One delivery attempt, from the delivery thread (prometheus_client counters take
        increments from any thread)."""
        (self.delivered if ok else self.delivery_failures).labels(sink).inc()
        if dead:
            self.dead_lettered.labels(sink).inc()
    def observe_audit_bytes(self, n: int) -> None:
        """Called from the audit thread (prometheus_client counters are thread-safe)."""
        self.audit_bytes.inc(n)

    def observe_crash(self) -> None:
        self.failures.labels("crashed").inc()

    def observe_detect(self, outcome: Any, now: float | None = None) -> None:
        """One detection outcome (a detect.Outcome)."""
        if outcome.action is Detected.REJECTED:
            self.rejected.labels(outcome.data_type).inc()
        elif outcome.action in (Detected.REGISTERED, Detected.UPDATED) and \
                outcome.product is not None:
            ident = outcome.product.identity
            if ident is not None and ident.mtime_ns:
                now = time.time() if now is None else now
                latency = max(0.0, now - ident.mtime_ns / 1e9)
                self.detection_latency.labels(outcome.data_type).observe(latency)

    def observe_reload(self, ok: bool, config: Config | None = None,
                       now: float | None = None) -> None:
        self.reloads.labels(Reload.OK if ok else Reload.FAILED).inc()
        self.last_reload_ok.set(1 if ok else 0)
        self.last_reload_time.set(time.time() if now is None else now)
        if ok and config is not None:
            self.configure(config)

    def observe_registry(self, reason: str | None, since: float | None) -> None:
        """The daemon paused publishing (reason, since: Unix time) or resumed (None)."""
        self.paused_reason, self.paused_since = reason, since
        self.registry_available.set(0 if reason is not None else 1)

    def _paused_seconds(self) -> float:
        since = self.paused_since
        return 0.0 if since is None else max(0.0, time.time() - since)

    def note_scrape_error(self, error: str) -> None:
        self.last_scrape_error = error

    def exposition(self) -> bytes:
        return generate_latest(self.registry)


# --- the HTTP server ------------------------------------------------------------------------

class _Handler(statusserver.BufferedHandler):
    server: _Server  # type: ignore[assignment]
    server_version = f"contimg-publisher/{__version__}"

    def do_GET(self) -> None:  # noqa: N802 - the name http.server dispatches to
        self._serve(body=True)

    def do_HEAD(self) -> None:  # noqa: N802
        self._serve(body=False)

    def _serve(self, body: bool) -> None:
        path = self.path.split("?", 1)[0]
        try:
            if path == "/metrics":
                status, ctype, data = 200, CONTENT_TYPE_LATEST, self.server.metrics.exposition()
            elif path in ("/", "/index.html"):
                ctype = "text/html; charset=utf-8"
                status, data = self._page()
            elif path == "/status.json":
                ctype = "application/json"
                status, data = self._status_json()
            elif path == "/healthz":
                status, ctype, data = 200, "text/plain; charset=utf-8", b"ok\n"
            else:
                status, ctype, data = 404, "text/plain; charset=utf-8", b"not found\n"
        except (RegistryError, apsw.Error, OSError) as exc:
            status, ctype = 503, "text/plain; charset=utf-8"
            data = f"registry unavailable: {type(exc).__name__}: {exc}\n".encode()
        except Exception as exc:  # one bad request must not take the server thread down
            status, ctype = 500, "text/plain; charset=utf-8"
            data = f"internal error: {type(exc).__name__}: {exc}\n".encode()
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(data)))
        self.send_header("Cache-Control", "no-store")
        self.end_headers()
        if body:
            self.wfile.write(data)

    def _status_json(self) -> tuple[int, bytes]:
        """The object `status --json` prints, made by the same function; 503 with the
        command's unreadable-registry object when the registry cannot be read."""
        config = self.server.metrics.config
        daemon = statusreport.daemon_state(config)
        try:
            with _reader(config) as registry:
                data = statusreport.as_json(config, statusreport.read(config, registry, daemon))
        except (RegistryError, apsw.Error, OSError) as exc:
            _problems, data = statusreport.unreadable(config, exc, daemon)
            return 503, json.dumps(data, indent=2).encode("utf-8")
        return 200, json.dumps(data, indent=2).encode("utf-8")

    def _page(self) -> tuple[int, bytes]:
        metrics = self.server.metrics
        config = metrics.config
        paused = statuspage.Paused(metrics.paused_reason, metrics.paused_since) \
            if metrics.paused_reason is not None else None
        try:
            with _reader(config) as registry:
                health = statuspage.snapshot(registry,
                                             unclaimed_after=config.unclaimed_after_seconds,
                                             sinks=config.notify_sinks)
        except (RegistryError, apsw.Error, OSError) as exc:
            if paused is None:
                raise
            # What the daemon knows is worth more than a bare 503: why it is paused.
            return 503, statuspage.render_unreadable(
                f"{type(exc).__name__}: {exc}", paused, started_at=metrics.started_at
                ).encode("utf-8")
        return 200, statuspage.render(health, started_at=metrics.started_at,
                                      max_waiting_age=config.status_max_waiting_age_seconds,
                                      paused=paused,
                                      max_undelivered_age=config.status_max_undelivered_age_seconds,
                                      targets=config.sink_targets).encode("utf-8")

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
        """Requests are not logged: a scrape every few seconds would flood the journal."""


class _Server(statusserver.BoundedServer):
    def __init__(self, address: tuple[str, int], metrics: Metrics,
                 listener: socket.socket | None = None) -> None:
        self.metrics = metrics
        super().__init__(address, _Handler, on_event=_say, listener=listener)


def _say(event: str, **fields: Any) -> None:
    """What the server's thread has to tell an operator (descriptors ran out, or came
    back)."""
    log = logs.get_logger()
    if event.endswith("out_of_descriptors"):
        log.error(event, **fields, reason="new connections to the status port wait; "
                                          "publishing goes on")
    else:
        log.info(event, **fields)


class Server:
    """The metrics and status page server, in threads of its own (see statusserver).

    `inherited`: the listening socket systemd passed (activation.listening_socket); the
    server answers on a duplicate of it, so a stop (a reload that changes [metrics]) leaves
    systemd's socket open for the next start. Without it, the server binds `listen`."""

    def __init__(self, metrics: Metrics, listen: str,
                 inherited: socket.socket | None = None) -> None:
        self.metrics = metrics
        self.listen = listen
        self.inherited = inherited is not None
        listener = None
        if inherited is not None:
            listener = inherited.dup()
            self.host = str(listener.getsockname()[0])
            port = 0
        else:
            self.host, port = split_listen(listen)
        # OSError if the port is taken, or the unit allows no Internet socket of our own
        self._server = _Server((self.host, port), metrics, listener)
        self.port = self._server.server_address[1]

    @property
    def address(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"

    def start(self) -> Server:
        self._server.start()
        return self

    def stop(self) -> None:
        self._server.stop(timeout=5)
