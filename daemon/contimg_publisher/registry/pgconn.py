"""How long one call to a PostgreSQL registry may block, and the connection settings that
hold it to that.

A node whose network to the server goes down must find out within a fraction of its
lease: its main loop renews a heartbeat and pings systemd, its publish thread renews the
claims in hand, and a statement left to TCP's own retransmissions (half a minute and
more) would let the lease expire while the daemon still believes it holds it. So every
wait has a bound derived from the configured busy timeout and the lease:

- a row lock, or a connection from the pool: `call_seconds` (lock_timeout, getconn);
- a statement: a little more (statement_timeout), so that a lock wait is still told as
  "busy" first;
- a link that stops answering: data left unacknowledged for `call_seconds` closes the
  socket (tcp_user_timeout), and keepalives probe an idle one every second;
- connecting: libpq's connect_timeout (whole seconds, at least 2);
- a transaction left open by a client that vanished: the server ends it after
  `idle_in_transaction_seconds`, so its row locks do not outlive the lease it was under.

Each of these surfaces as RegistryUnavailable (postgres.PostgresRegistry._unavailable).
"""

from __future__ import annotations

import logging
import math
import threading
from dataclasses import dataclass
from typing import Any

# A call may wait at most this fraction of the lease: a lease survives a few failed
# renewals (the publish thread renews about once a second) before it can expire.
LEASE_FRACTION = 4.0
MIN_CALL_SECONDS = 1.0
# libpq rounds connect_timeout to whole seconds and treats anything below 2 as 2.
MIN_CONNECT_SECONDS = 2
# A statement's bound over a lock wait's: a lock held too long is RegistryBusy, not a
# cancelled statement.
STATEMENT_MARGIN_SECONDS = 0.5
IDLE_IN_TRANSACTION_FACTOR = 3.0
MIN_IDLE_IN_TRANSACTION_SECONDS = 5.0


@dataclass(frozen=True)
class Limits:
    """The bounds of one registry's connections (seconds unless named otherwise)."""

    call_seconds: float
    statement_seconds: float
    idle_in_transaction_seconds: float
    connect_seconds: int

    def options(self) -> str:
        """The server-side settings, sent as libpq `options` at each connection."""
        return " ".join((
            f"-c lock_timeout={_ms(self.call_seconds)}",
            f"-c statement_timeout={_ms(self.statement_seconds)}",
            f"-c idle_in_transaction_session_timeout={_ms(self.idle_in_transaction_seconds)}",
        ))

    def connect_kwargs(self) -> dict[str, Any]:
        """libpq's client-side bounds: connecting, and a link that stops answering."""
        return {"connect_timeout": self.connect_seconds,
                "options": self.options(),
                "keepalives": 1, "keepalives_idle": 1, "keepalives_interval": 1,
                "keepalives_count": max(1, math.ceil(self.call_seconds)),
                "tcp_user_timeout": _ms(self.call_seconds)}

    @property
    def reconnect_seconds(self) -> float:
        """How long the pool keeps retrying in the background before it gives up; the next
        call then starts a fresh attempt at once (its own backoff would otherwise grow to
        minutes between attempts during a long outage)."""
        return max(5.0, 3 * self.call_seconds)


def limits(busy_timeout_seconds: float, lease_seconds: float | None = None) -> Limits:
    """The bounds for a busy timeout and, when the caller works under leases, the lease."""
    call = busy_timeout_seconds
    if lease_seconds is not None:
        call = min(call, lease_seconds / LEASE_FRACTION)
    call = max(MIN_CALL_SECONDS, call)
    return Limits(
        call_seconds=call,
        statement_seconds=call + STATEMENT_MARGIN_SECONDS,
        idle_in_transaction_seconds=max(MIN_IDLE_IN_TRANSACTION_SECONDS,
                                        IDLE_IN_TRANSACTION_FACTOR * call),
        connect_seconds=max(MIN_CONNECT_SECONDS, math.ceil(call)))


def _ms(seconds: float) -> int:
    return max(1, int(seconds * 1000))


class ConnectErrors(logging.Filter):
    """psycopg-pool's background connection attempts log a warning each (every second or
    two while the server is down): kept here instead, the last one per pool, for the one
    RegistryUnavailable the daemon reports at a bounded rate."""

    QUIET = ("error connecting in %r: %s", "reconnection attempt in pool %r failed after %s sec")

    def __init__(self) -> None:
        super().__init__()
        self._lock = threading.Lock()
        self._last: dict[str, str] = {}

    def filter(self, record: logging.LogRecord) -> bool:
        if record.msg not in self.QUIET:
            return True
        args = record.args if isinstance(record.args, tuple) else ()
        if record.msg == self.QUIET[0] and len(args) == 2:
            with self._lock:
                self._last[str(args[0])] = " ".join(str(args[1]).split())
        return False

    def last(self, pool: str) -> str | None:
        with self._lock:
            return self._last.get(pool)

    def forget(self, pool: str) -> None:
        with self._lock:
            self._last.pop(pool, None)


CONNECT_ERRORS = ConnectErrors()
logging.getLogger("psycopg.pool").addFilter(CONNECT_ERRORS)
