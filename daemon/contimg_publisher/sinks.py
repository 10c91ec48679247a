"""What a sink is, what it is sent, and the webhook sink.

Every attempt at a sink is bounded as a whole: the webhook's by one deadline for its send
and its whole answer (after a bounded connect), so a server that answers a byte at a time
is cut off at the deadline like one that answers nothing.
"""

from __future__ import annotations

import contextlib
import email.utils
import http.client
import json
import socket
import ssl
import threading
import time
from dataclasses import dataclass
from typing import Protocol
from urllib.parse import urlsplit

from contimg_publisher import __version__, redact
from contimg_publisher.registry import Event
from contimg_publisher.states import Sink

ANSWER_MAX_BYTES = 2048  # of a refusal's body or a command's stderr, kept for the error text


@dataclass(frozen=True)
class Outcome:
    """One attempt: taken by the sink, or why not (and how long the sink asked to wait)."""

    ok: bool
    error: str | None = None
    retry_after: float | None = None


class Target(Protocol):
    name: Sink

    def deliver(self, event: Event) -> Outcome: ...

    def cancel(self) -> None: ...

    def describe(self) -> str: ...


def body(event: Event) -> bytes:
    """The JSON every sink gets, the same bytes at every attempt."""
    return json.dumps(event.to_json(), sort_keys=True, separators=(",", ":"),
                      default=str).encode()


def shown_url(url: str) -> str:
    """The URL as logs show it (redact.url: no password, no token)."""
    return redact.url(url)


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


class Cutoff:
    """Shuts a connection's socket down when its time is up. http.client's timeout applies
    to each read of the socket, so a server sending a byte at a time would never reach it;
    this ends the whole phase at its deadline, and the read in progress fails at once."""

    def __init__(self, conn: http.client.HTTPConnection) -> None:
        self.conn = conn
        self.fired = False
        self._timer: threading.Timer | None = None

    def arm(self, seconds: float) -> None:
        self.disarm()
        self._timer = threading.Timer(seconds, self._fire)
        self._timer.daemon = True
        self._timer.start()

    def disarm(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _fire(self) -> None:
        self.fired = True
        shut(self.conn)


def shut(conn: http.client.HTTPConnection) -> None:
    """Wake whatever waits on the connection's socket: it fails at once."""
    sock = conn.sock
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_RDWR)


class Webhook:
    """POST of the event as JSON; any 2xx answer is delivery. The connect (TCP and TLS) has
    connect_timeout; sending the event and reading the whole answer then has read_timeout,
    one deadline for all of it. TLS verified by the system's trust store, redirects not
    followed (a 3xx is a failure that names the new place)."""

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
        cutoff = Cutoff(conn)
        stage = "connect"
        try:
            cutoff.arm(self.connect_timeout)  # the TLS handshake is several reads
            conn.connect()
            assert conn.sock is not None
            cutoff.arm(self.read_timeout)  # from here on, one deadline for everything
            conn.sock.settimeout(self.read_timeout)
            stage = "send"
            conn.request("POST", target, body=body(event), headers={
                "Content-Type": "application/json",
                "Idempotency-Key": event.event_id,
                "User-Agent": f"contimg-publisher/{__version__}"})
            stage = "answer"
            resp = conn.getresponse()
            stage = "body"
            answer = resp.read(ANSWER_MAX_BYTES)
        except (TimeoutError, ssl.SSLError, OSError, http.client.HTTPException) as exc:
            if cutoff.fired or isinstance(exc, TimeoutError):
                return Outcome(False, self._late(stage))
            if isinstance(exc, ssl.SSLError):
                return Outcome(False, f"TLS: {exc.reason or exc}")
            text = exc.strerror if isinstance(exc, OSError) and exc.strerror else \
                f"{type(exc).__name__}: {exc}"
            return Outcome(False, f"{stage}: {text}")
        finally:
            cutoff.disarm()
            self._conn = None
            conn.close()
        if 200 <= resp.status < 300:
            return Outcome(True)
        snippet = answer.decode("utf-8", "replace").strip().replace("\n", " ")[:200]
        where = resp.getheader("Location")
        text = f"HTTP {resp.status} {resp.reason}" + (f" (to {where})" if where else "") + \
            (f": {snippet}" if snippet else "")
        return Outcome(False, text, retry_after(resp.getheader("Retry-After")))

    def _late(self, stage: str) -> str:
        if stage == "connect":
            return (f"no connection within {self.connect_timeout:g} s ([notify] "
                    "connect_timeout_seconds)")
        what = "answer not complete" if stage == "body" else "no answer"
        return f"{what} within {self.read_timeout:g} s ([notify] read_timeout_seconds)"

    def cancel(self) -> None:
        """Wake a request blocked in a read (shutdown): it fails, and is sent again later."""
        conn = self._conn
        if conn is not None:
            shut(conn)
