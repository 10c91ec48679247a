"""What the daemon tells systemd: sd_notify itself, the STATUS= line, and when STATUS= and
WATCHDOG=1 are due; in a module of its own so that the loop's helpers can say things too.

A socket that cannot be reached must not stop publishing, so sending never raises.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable

from contimg_publisher import logs, outage
from contimg_publisher import registry as registry_mod
from contimg_publisher.config import Config
from contimg_publisher.deadlines import Deadlines, Due
from contimg_publisher.registry import TRANSIENT, RegistryBackend
from contimg_publisher.states import Status

try:
    from systemd import daemon as sd_daemon
except ImportError:  # pragma: no cover - systemd-python is a dependency; keep running without
    sd_daemon = None


STATUS_SECONDS = 5.0  # STATUS= refreshed at least this often
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


def watchdog_interval() -> float | None:
    """How often WATCHDOG=1 is due (half systemd's WatchdogSec), None without a watchdog
    for this process."""
    usec = os.environ.get("WATCHDOG_USEC")
    pid = os.environ.get("WATCHDOG_PID")
    return (int(usec) / 1e6 / 2 if usec and usec.isdigit() and (
        not pid or pid == str(os.getpid())) else None)


def status_line(cfg: Config, registry: RegistryBackend | None, paused: outage.Outage | None,
                watching: Callable[[], bool], note: str, last_published: str | None) -> str:
    """STATUS=: the pause, or the counts and the last publish (after `note`, if any)."""
    if paused is not None:
        return outage.status_line(paused)
    if registry is None:
        return "starting"
    try:
        c = registry.counts()
    except TRANSIENT as exc:  # the loop's next turn pauses on it
        return f"registry unavailable: {registry_mod.unavailable(exc, cfg.registry_shown)}"
    how = "watching" if watching() else f"scanning every {cfg.rescan_seconds:g} s"
    line = (f"{how} {cfg.stage_root}: {c[Status.STAGING]} waiting, "
            f"{c[Status.PUBLISHING]} publishing, {c[Status.FAILED]} failed, "
            f"{c[Status.REJECTED]} rejected; "
            f"last publish: {last_published or 'none yet'}")
    return f"{note}; {line}" if note else line


def ping(deadlines: Deadlines, status: Callable[[], str], watchdog_interval: float | None,
         now: float) -> None:
    """STATUS= when due (or not said yet), WATCHDOG=1 when due."""
    if deadlines.at(Due.STATUS) is None or deadlines.is_due(Due.STATUS, now):
        notify(f"STATUS={status()}")
        deadlines.after(Due.STATUS, STATUS_SECONDS, now)
    if watchdog_interval and (deadlines.at(Due.WATCHDOG) is None or
                              deadlines.is_due(Due.WATCHDOG, now)):
        notify("WATCHDOG=1")
        deadlines.after(Due.WATCHDOG, watchdog_interval * 0.9, now)
