"""The status port's listening socket, when systemd made it (socket activation).

The shipped unit lets the daemon create no Internet socket of its own
(RestrictAddressFamilies=AF_UNIX), so the status port is opened by
contimg-publisher.socket and passed in (LISTEN_FDS). The daemon keeps that socket for its
whole life; anything else passed is closed, with the reason, rather than left open.
"""

from __future__ import annotations

import contextlib
import os
import socket
from dataclasses import dataclass

from systemd import daemon as sd_daemon

INTERNET = (socket.AF_INET, socket.AF_INET6)


@dataclass(frozen=True)
class Passed:
    """What systemd passed: the status port's socket (or None), and why others were not
    used."""

    listener: socket.socket | None
    refused: tuple[str, ...] = ()


def listening_socket() -> Passed:
    """Take the sockets systemd passed to this process (and clear LISTEN_* from the
    environment, so no child sees them): the first listening TCP socket is the status
    port's."""
    listener: socket.socket | None = None
    refused: list[str] = []
    for fd in sd_daemon.listen_fds(unset_environment=True):
        try:
            sock = socket.socket(fileno=fd)
        except OSError as exc:
            refused.append(f"descriptor {fd}: not a socket ({exc.strerror})")
            with contextlib.suppress(OSError):
                os.close(fd)
            continue
        sock.set_inheritable(False)
        listening = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN) != 0
        if (listener is None and sock.family in INTERNET and sock.type == socket.SOCK_STREAM
                and listening):
            listener = sock
            continue
        refused.append(f"descriptor {fd}: {sock.family.name} {sock.type.name}"
                       f"{' listening' if listening else ''} is not the status port's "
                       "(one listening TCP socket is)")
        sock.close()
    return Passed(listener, tuple(refused))
