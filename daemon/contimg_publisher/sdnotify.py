"""What the daemon tells systemd (sd_notify), in one module the loop's helpers share.

A socket that cannot be reached must not stop publishing, so sending never raises.
"""

from __future__ import annotations

import os
import time

from contimg_publisher import logs

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
