"""What runs beside the daemon's main loop, each with start/stop/healthy, held in one place.

The loop starts them once it holds the registry, asks `unhealthy()` each turn (a service
that stopped by itself is restarted), passes a reloaded Config to each, and stops them in
the reverse order.
"""

from __future__ import annotations

import errno
import os
import queue
from collections.abc import Callable
from typing import Any, Protocol

from contimg_publisher import activation, audit, metrics, outbox, watch
from contimg_publisher.config import Config


class Service(Protocol):
    name: str

    def start(self) -> None: ...

    def stop(self) -> None: ...

    def healthy(self) -> bool: ...

    def reconfigure(self, config: Config, old: Config) -> None: ...


class Services:
    """The running services, in start order."""

    def __init__(self) -> None:
        self._all: list[Service] = []

    def start(self, service: Service) -> None:
        self._all.append(service)
        service.start()

    def reconfigure(self, config: Config, old: Config) -> None:
        for service in self._all:
            service.reconfigure(config, old)

    def unhealthy(self) -> list[Service]:
        return [service for service in self._all if not service.healthy()]

    def restart_unhealthy(self, log: Any, stage_root: str) -> bool:
        """Each service that stopped by itself restarted, and said; True when any was."""
        restarted = False
        for service in self.unhealthy():
            log.warning(f"{service.name}_restarting", stage_root=stage_root)
            service.stop()
            service.start()
            restarted = True
        return restarted

    def stop(self) -> None:
        while self._all:
            self._all.pop().stop()


class WatchService:
    """The inotify watch of the staging area. Without one (it could not be set up) the
    daemon relies on its rescans, and `retry` tries again."""

    name = "watch"

    def __init__(self, config: Config, changes: queue.SimpleQueue[watch.Change | str],
                 wake: Callable[[], None], log: Callable[[], Any],
                 own: watch.OwnMoves) -> None:
        self.config = config
        self.changes, self.wake, self.log, self.own = changes, wake, log, own
        self._watcher: watch.Watcher | None = None

    @property
    def running(self) -> bool:
        """Set up (healthy or not); False when no watch could be set up."""
        return self._watcher is not None

    def start(self) -> None:
        root = str(self.config.stage_root)
        os.makedirs(root, exist_ok=True)
        watcher = watch.Watcher(root, self.changes, wake=self.wake, log=self.log(),
                                own=self.own)
        self._watcher = watcher if watcher.start() else None

    def stop(self) -> None:
        if self._watcher is not None:
            self._watcher.stop()
            self._watcher = None

    def restart(self) -> None:
        self.stop()
        self.start()

    def healthy(self) -> bool:
        """A watch that could not be set up is not restarted every turn (see running)."""
        return self._watcher is None or self._watcher.healthy()

    def watching(self) -> bool:
        return self._watcher is not None and self._watcher.healthy()

    def reconfigure(self, config: Config, old: Config) -> None:
        self.config = config
        if config.stage_root != old.stage_root:
            self.restart()


class DeliveryService:
    """The outbox's sinks, a thread each (on a shared registry, one daemon's duty)."""

    name = "outbox"

    def __init__(self, config: Config, observer: metrics.Metrics, owner: str) -> None:
        self.delivery = outbox.Delivery(config, observer, owner=owner)

    def start(self) -> None:
        self.delivery.start()

    def stop(self) -> None:
        self.delivery.stop()  # a delivery in flight is cut short: sent again next start

    def healthy(self) -> bool:
        return True  # each sink's thread retries on its own

    def wake(self) -> None:
        self.delivery.wake()

    def reconfigure(self, config: Config, old: Config) -> None:
        self.delivery.reconfigure(config)


class AuditService:
    """The fixity audit in a thread of its own; it reads only while `idle()` (the publish
    thread has nothing in hand, see audit.Auditor)."""

    name = "audit"

    def __init__(self, config: Config, idle: Callable[[], bool], observer: metrics.Metrics,
                 owner: str) -> None:
        self.auditor = audit.Auditor(config, idle=idle, on_bytes=observer.observe_audit_bytes,
                                     owner=owner)

    def start(self) -> None:
        self.auditor.start()

    def stop(self) -> None:
        self.auditor.stop()

    def healthy(self) -> bool:
        return True  # it ends only when stopped, or when another daemon leads the audit

    def reconfigure(self, config: Config, old: Config) -> None:
        self.auditor.reconfigure(config)


def _internet_refused(exc: BaseException) -> bool:
    """socket() refused by the unit's RestrictAddressFamilies= (seccomp: EAFNOSUPPORT)."""
    return isinstance(exc, OSError) and exc.errno == errno.EAFNOSUPPORT


class MetricsService:
    """/metrics and the status page; a daemon that cannot bind keeps publishing.

    The status port's socket, when systemd opened it (the shipped unit allows no Internet
    socket of the daemon's own), is kept for the process's whole life."""

    name = "metrics"

    def __init__(self, config: Config, observer: metrics.Metrics, log: Callable[[], Any]
                 ) -> None:
        self.config = config
        self.metrics = observer
        self.log = log
        self.passed = activation.listening_socket()
        self._server: metrics.Server | None = None

    def healthy(self) -> bool:
        return True  # a server that could not bind was said once; a reload tries again

    def reconfigure(self, config: Config, old: Config) -> None:
        self.config = config
        if (config.metrics_enabled, config.metrics_listen) != (old.metrics_enabled,
                                                                old.metrics_listen):
            self.stop()
            self.start()

    def stop(self) -> None:
        if self._server is not None:
            self._server.stop()
            self._server = None

    def start(self) -> None:
        cfg, log = self.config, self.log()
        for reason in self.passed.refused:
            log.warning("socket_not_used", error=reason)
        self.passed = activation.Passed(self.passed.listener)  # said once
        inherited = self.passed.listener
        if not cfg.metrics_enabled:
            if inherited is not None:
                log.warning("metrics_disabled_socket_passed",
                            listen=str(inherited.getsockname()[0:2]),
                            error="[metrics] enabled = false, but systemd opened the "
                                  "status port (contimg-publisher.socket): connections "
                                  "to it wait unanswered",
                            action="mask contimg-publisher.socket")
            return
        try:
            server = metrics.Server(self.metrics, cfg.metrics_listen,
                                    inherited=inherited).start()
        except (OSError, ValueError) as exc:
            log.error("metrics_unavailable", listen=cfg.metrics_listen,
                      error=f"{type(exc).__name__}: {exc}",
                      action="free the port or change [metrics] listen, then reload"
                      if inherited is None and not _internet_refused(exc) else
                      "start contimg-publisher.socket (the unit lets the daemon open "
                      "no Internet socket of its own), or free its port")
            return
        self._server = server
        log.info("metrics_listening", listen=server.address, url=f"http://{server.address}/",
                 from_systemd=server.inherited)
        if server.inherited and server.address != cfg.metrics_listen:
            log.warning("metrics_listen_differs", listen=server.address,
                        configured=cfg.metrics_listen,
                        error="systemd's socket (contimg-publisher.socket, ListenStream=) "
                              "decides the status port; [metrics] listen is not used",
                        action="make them agree")
        if not metrics.is_loopback(server.host):
            log.warning("metrics_exposed", listen=server.address,
                        error="metrics and the status page are reachable from other "
                              "hosts, without authentication")
