"""The daemon's pause while the registry is unavailable: when to try again and when to
speak. Pure bookkeeping; the main loop does the trying, the logging and the notifying.

An outage can last hours (a full disk over a weekend): the loop must not spin on it nor
fill the journal, yet must resume within seconds of the registry coming back, and an
operator must be told once, then reminded now and then, and told when it is over.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

RETRY_INITIAL_SECONDS = 1.0
RETRY_MAX_SECONDS = 30.0
REMIND_EVERY_SECONDS = 60.0


@dataclass
class Outage:
    """One period in which the registry could not be used; times are time.monotonic()
    except `since`, the wall-clock start operators read."""

    reason: str
    since: float
    started: float
    next_try: float
    next_reminder: float
    tries: int = 1

    def seconds(self, now: float) -> float:
        return max(0.0, now - self.started)


def begin(reason: str, now: float, wall: float) -> Outage:
    """The first failure: try again after RETRY_INITIAL_SECONDS."""
    return Outage(reason, wall, now, now + RETRY_INITIAL_SECONDS, now + REMIND_EVERY_SECONDS)


def retry_delay(tries: int) -> float:
    """1 s, doubling, at most RETRY_MAX_SECONDS: seconds after a brief lock, half a minute
    at most after the registry comes back from a long outage."""
    return float(min(RETRY_MAX_SECONDS, RETRY_INITIAL_SECONDS * 2 ** max(tries - 1, 0)))


def failed_again(outage: Outage, reason: str, now: float) -> bool:
    """A retry failed: the next one backs off. True when a reminder is due (at most one
    per REMIND_EVERY_SECONDS)."""
    outage.tries += 1
    outage.reason = reason
    outage.next_try = now + retry_delay(outage.tries)
    if now >= outage.next_reminder:
        outage.next_reminder = now + REMIND_EVERY_SECONDS
        return True
    return False


def due(outage: Outage, now: float) -> bool:
    return now >= outage.next_try


def status_line(outage: Outage) -> str:
    """systemd's STATUS= while paused."""
    return f"paused: registry unavailable: {outage.reason}"


def note(outage: Outage | None) -> str | None:
    """What the lock file says while paused (lock.Lock.note), for `status`."""
    if outage is None:
        return None
    return json.dumps({"paused": "registry unavailable", "reason": outage.reason,
                       "since": outage.since})


def parse_note(text: str | None) -> dict[str, object] | None:
    """The pause a daemon's note describes, or None (no note, or not one of ours)."""
    if not text:
        return None
    try:
        data = json.loads(text)
    except ValueError:
        return None
    if not isinstance(data, dict) or data.get("paused") != "registry unavailable":
        return None
    return data
