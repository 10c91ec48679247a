"""When each of the main loop's duties is next due, in one place.

The loop sleeps until the earliest deadline (or a wake-up), then does what is due. Times
are time.monotonic() seconds; a duty without a deadline is never due.
"""

from __future__ import annotations

from enum import StrEnum


class Due(StrEnum):
    """The loop's timed duties."""

    RESCAN = "rescan"                  # walk the staging area ([detect] rescan_seconds)
    RECONCILE = "reconcile"            # resolve interrupted publishes ([publish] reconcile)
    HEARTBEAT = "heartbeat"            # the registry's record that this daemon is alive
    STATUS = "status"                  # STATUS= for systemd
    WATCHDOG = "watchdog"              # WATCHDOG=1 for systemd
    WATCH_RETRY = "watch_retry"        # set up a watch that could not be set up
    REGISTRY_RETRY = "registry_retry"  # try an unavailable registry again
    SETTLE = "settle"                  # the next staged path whose settle time ends
    CLAIM = "claim"                    # the next row due to be published
    TURN = "turn"                      # detection's turn after a batch handed over


class Deadlines:
    """Named deadlines: `due` says which have come, `next_timeout` how long to sleep."""

    def __init__(self) -> None:
        self._at: dict[Due, float] = {}

    def set(self, name: Due, at: float | None) -> None:
        """Due at `at`; None: not due at all."""
        if at is None:
            self._at.pop(name, None)
        else:
            self._at[name] = at

    def after(self, name: Due, seconds: float, now: float) -> None:
        self._at[name] = now + seconds

    def at(self, name: Due) -> float | None:
        return self._at.get(name)

    def is_due(self, name: Due, now: float) -> bool:
        at = self._at.get(name)
        return at is not None and now >= at

    def due(self, now: float) -> list[Due]:
        """The duties whose time has come, earliest first."""
        return sorted((n for n, at in self._at.items() if now >= at), key=self._at.__getitem__)

    def next_timeout(self, now: float, among: frozenset[Due] | None = None,
                     cap: float | None = 1.0) -> float:
        """Seconds until the earliest deadline (of `among`, or of all), at most `cap`; 0 if
        one is past; `cap` (or 1 s) when none is set."""
        times = [at - now for n, at in self._at.items() if among is None or n in among]
        if cap is not None:
            times.append(cap)
        return max(0.0, min(times)) if times else 1.0
