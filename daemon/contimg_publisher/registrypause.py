"""The main loop's side of a registry outage: what is said when the registry cannot be
used, while it stays so, when it is back, and when it is gone.

outage.py keeps the bookkeeping (when to try, when to remind); this module tells the
journal, systemd's STATUS=, the metrics and the lock file's note, so that an operator
reading any of them sees the same pause.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from contimg_publisher import lock, metrics, outage, scanpass
from contimg_publisher import registry as registry_mod
from contimg_publisher.config import Config
from contimg_publisher.deadlines import Deadlines, Due
from contimg_publisher.registry import RegistryError
from contimg_publisher.sdnotify import STATUS_SECONDS, notify


def unavailable(current: outage.Outage | None, exc: Exception, cfg: Config, log: Any,
                now: float) -> outage.Outage:
    """Publishing pauses: nothing is claimed, registered or removed until a retry proves
    the registry takes commits again. Said once, then at most once a minute."""
    error = str(registry_mod.unavailable(exc, cfg.registry_shown))
    if current is None:
        current = outage.begin(error, now, time.time())
        log.error("registry_unavailable", registry=cfg.registry_shown,
                  error=error, retry_in_seconds=outage.RETRY_INITIAL_SECONDS,
                  reason="publishing paused: nothing leaves staging without its "
                         "record; retried with backoff, resumes by itself",
                  action=action(cfg))
    elif outage.failed_again(current, error, now):
        log.warning("registry_still_unavailable", registry=cfg.registry_shown, error=error,
                    seconds=round(current.seconds(now), 1), tries=current.tries,
                    retry_in_seconds=round(current.next_try - now, 1))
    return current


def retry(run: scanpass.Pass, pending_park: Path | None) -> None:
    """A real write first (a turn with nothing to record proves nothing), then what a
    reload could not record while the registry was unavailable."""
    run.registry.probe()
    if pending_park is not None:
        run.park(pending_park)


def available(was: outage.Outage, cfg: Config, log: Any, now: float) -> None:
    log.info("registry_available", registry=cfg.registry_shown,
             seconds=round(was.seconds(now), 1), tries=was.tries,
             error_was=was.reason, reason="publishing resumed")


def tell(current: outage.Outage | None, observed: metrics.Metrics, held: lock.Lock | None,
         deadlines: Deadlines, now: float) -> None:
    """The pause (or its end) in STATUS=, the metrics, the lock file's note and the loop's
    deadlines (the next try; STATUS= while paused, the counts at once when resumed)."""
    observed.observe_registry(None if current is None else current.reason,
                              None if current is None else current.since)
    if held is not None:
        held.note(outage.note(current))
    deadlines.set(Due.REGISTRY_RETRY, None if current is None else current.next_try)
    if current is not None:
        notify(f"STATUS={outage.status_line(current)}")
        deadlines.after(Due.STATUS, STATUS_SECONDS, now)
    else:  # the next turn says the counts
        deadlines.set(Due.STATUS, now)


def gone(exc: RegistryError, cfg: Config, log: Any) -> None:
    """The registry file was deleted or replaced under the daemon: said loudly; the daemon
    publishes nothing more, removes nothing and exits non-zero (systemd's restart then
    meets the start-up check, which will not create an empty registry beside the archive)."""
    log.critical("registry_gone", registry=cfg.registry_shown, error=str(exc),
                 action="restore the registry file (from the copy the daemon had "
                        "open, or a backup), then start the daemon")
    notify(f"STATUS=stopped: {exc}")


def action(cfg: Config) -> str:
    """What an operator can do about a registry that cannot be used, per backend."""
    if cfg.registry_is_server:
        return ("start the PostgreSQL server, restore the network to it, or make it "
                "writable again (free space, promote a standby)")
    return ("free space, make the registry files writable again (chattr -i, remount "
            "read-write) or end the process that holds its write lock")
