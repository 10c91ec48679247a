"""The process's descriptor budget: raised at start, and a shortage told once and waited out.

systemd's default soft limit (1024) is small for a daemon that watches a tree with
inotify, holds registry connections and serves a status port; the unit sets
LimitNOFILE=65536 and the daemon raises its soft limit to the hard one in case it is
started some other way. Whatever still exhausts descriptors (another process's share of
the system table, a limit lowered from outside), the main loop must neither log every turn
nor retry at once: a Shortage says it once, and the loop waits a growing, bounded pause.
"""

from __future__ import annotations

import errno
import os
import resource
from dataclasses import dataclass
from typing import Any

PAUSE_INITIAL_SECONDS = 0.5
PAUSE_MAX_SECONDS = 30.0
OUT_OF_DESCRIPTORS = frozenset({errno.EMFILE, errno.ENFILE})


@dataclass(frozen=True)
class Limits:
    """RLIMIT_NOFILE before and after the raise; error: why it could not be raised."""

    soft_before: int
    soft: int
    hard: int
    error: str | None = None


def _shown(value: int) -> int:
    return -1 if value == resource.RLIM_INFINITY else value


def raise_soft_limit() -> Limits:
    """Soft limit up to the hard limit (an unprivileged process may do this)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == hard:
        return Limits(_shown(soft), _shown(soft), _shown(hard))
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    except (OSError, ValueError) as exc:  # e.g. a seccomp filter without setrlimit
        return Limits(_shown(soft), _shown(soft), _shown(hard), f"{type(exc).__name__}: {exc}")
    now_soft, now_hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    return Limits(_shown(soft), _shown(now_soft), _shown(now_hard))


def limits() -> tuple[int, int]:
    """RLIMIT_NOFILE now (soft, hard); -1 for unlimited."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    return _shown(soft), _shown(hard)


def exhausted(exc: BaseException) -> bool:
    """Whether an error, or one it was raised from, says descriptors ran out."""
    seen: BaseException | None = exc
    for _ in range(8):  # a bounded look down the chain of causes
        if seen is None:
            return False
        if isinstance(seen, OSError) and seen.errno in OUT_OF_DESCRIPTORS:
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def open_count(limit: int = 1 << 20) -> int | None:
    """How many descriptors this process has open (None when /proc cannot say). Listing
    /proc/self/fd needs a descriptor itself, so in a shortage this may be None."""
    try:
        with os.scandir("/proc/self/fd") as entries:
            n = 0
            for _ in entries:
                n += 1
                if n >= limit:
                    break
            return max(0, n - 1)  # the scandir's own descriptor
    except OSError:
        return None


@dataclass
class Shortage:
    """A run of main-loop turns that failed for lack of descriptors."""

    since: float        # monotonic time of the first failure
    error: str
    turns: int = 1
    pause: float = PAUSE_INITIAL_SECONDS

    def again(self) -> float:
        """One more failed turn: the pause to wait before the next one (growing, bounded)."""
        self.turns += 1
        self.pause = min(PAUSE_MAX_SECONDS, self.pause * 2)
        return self.pause


def short(shortage: Shortage | None, exc: BaseException, now: float, log: Any) -> Shortage:
    """A turn failed for lack of descriptors: said once; each further failure grows the
    pause (Shortage.pause) the loop waits, pinging the watchdog, before its next turn."""
    if shortage is not None:
        shortage.again()
        return shortage
    error = f"{type(exc).__name__}: {exc}"
    shortage = Shortage(now, error)
    soft, hard = limits()
    log.error("descriptors_exhausted", error=error, limit_soft=soft,
              limit_hard=hard, retry_in_seconds=shortage.pause,
              reason="publishing waits until descriptors are free again; "
                     "retried with backoff, resumes by itself",
              action="see what holds this process's descriptors (ls -l "
                     f"/proc/{os.getpid()}/fd) or the system's (fs.file-nr)")
    return shortage


def ended(was: Shortage, now: float, log: Any) -> None:
    """A turn went through again: the shortage is over, said once with how long it lasted."""
    log.info("descriptors_available", seconds=round(now - was.since, 1),
             failed_turns=was.turns, error_was=was.error,
             open_descriptors=open_count(), reason="publishing resumed")
