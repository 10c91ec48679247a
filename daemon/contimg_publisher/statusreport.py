"""The status object: what `status --json` prints and the status server's /status.json.

One reading (read) and one renderer (as_json) make it, so the command on the host and the
page a monitor fetches can never disagree on a key or a count. It reads an open registry and
the lock file; opening the registry (the command waits for a migration, the server opens
read-only) stays with the caller, and so does printing.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from contimg_publisher import hygiene, lock, outage, redact, statuspage
from contimg_publisher.config import Config
from contimg_publisher.registry import Product, RegistryBackend
from contimg_publisher.states import Status


@dataclass(frozen=True)
class Daemon:
    """Who holds the lock, whether that is a daemon, and its own word that it paused."""

    holder: str | None
    running: bool
    paused: statuspage.Paused | None


def daemon_state(cfg: Config) -> Daemon:
    holder = lock.holder(str(cfg.lock_path))
    running = holder is not None and "daemon" in holder
    found = outage.parse_note(lock.read_note(str(cfg.lock_path))) if running else None
    paused = None
    if found is not None:
        since = found.get("since")
        paused = statuspage.Paused(str(found.get("reason") or "unknown"),
                                   float(since) if isinstance(since, int | float) else None)
    return Daemon(holder, running, paused)


def paused_json(paused: statuspage.Paused | None) -> dict[str, Any] | None:
    return None if paused is None else {"reason": paused.reason, "since": paused.since}


@dataclass(frozen=True)
class Report:
    """One reading of the registry and the staging area: what `status` prints as text, and
    as_json() as the status object."""

    now: float
    daemon: Daemon
    counts: dict[str, int]
    oldest: Product | None
    failures: int
    last: Product | None
    health: statuspage.Health
    held: list[tuple[Product, str]]
    stale: list[hygiene.Stale]
    problems: list[str]


def read(cfg: Config, registry: RegistryBackend, daemon: Daemon,
         now: float | None = None) -> Report:
    """Read the registry (RegistryError when it cannot be) and the staging area's stale
    files; what needs an operator follows from them."""
    now = time.time() if now is None else now
    counts = registry.counts()
    oldest = registry.oldest_waiting()
    failures = registry.failures_since(now - 3600)
    last = registry.last_published()
    health = statuspage.snapshot(registry, limit=0, now=now,
                                 unclaimed_after=cfg.unclaimed_after_seconds,
                                 sinks=cfg.notify_sinks)
    held = registry.held([r.type for r in cfg.products])
    health.failed = registry.by_status(Status.FAILED)
    stale = hygiene.stale(cfg, registry, now)
    problems = statuspage.problems(health, cfg.status_max_waiting_age_seconds, daemon.running,
                                   daemon.paused,
                                   max_undelivered_age=cfg.status_max_undelivered_age_seconds)
    return Report(now, daemon, counts, oldest, failures, last, health, held, stale, problems)


def as_json(cfg: Config, report: Report) -> dict[str, Any]:
    """The status object, secrets in any URL replaced by ***."""
    now, daemon, health, oldest, last = (report.now, report.daemon, report.health,
                                         report.oldest, report.last)
    data: dict[str, Any] = {
        "counts": report.counts,
        "oldest_waiting": None if oldest is None else {
            "data_id": oldest.data_id, "staged_at": oldest.staged_at,
            "age_seconds": round(now - oldest.staged_at, 3)},
        "failures_last_hour": report.failures,
        "last_published": None if last is None else {
            "data_id": last.data_id, "published_at": last.published_at,
            "published_path": last.published_path},
        "lock": {"path": str(cfg.lock_path), "holder": daemon.holder},
        "daemon_running": daemon.running,
        "paused": paused_json(daemon.paused),
        "registry": cfg.registry_shown,
        "success_rate": {
            "last_hour": {"published": health.published_hour, "failures": health.failures_hour,
                          "rate": health.success_rate_hour},
            "last_day": {"published": health.published_day, "failures": health.failures_day,
                         "rate": health.success_rate_day}},
        "max_waiting_age_seconds": cfg.status_max_waiting_age_seconds,
        "unclaimed": [u.to_json(now) for u in health.unclaimed],
        "unclaimed_after_seconds": cfg.unclaimed_after_seconds,
        "held": [{"data_id": r.data_id, "data_type": r.data_type, "reason": why,
                  "staged_at": r.staged_at} for r, why in report.held],
        "failed": [{"data_id": r.data_id, "data_type": r.data_type,
                    "publish_error": r.publish_error} for r in health.failed],
        "events": [dict(k.to_json(now), target=cfg.sink_targets.get(k.sink))
                   for k in health.sinks],
        "max_undelivered_age_seconds": cfg.status_max_undelivered_age_seconds,
        "audit": {"findings": [f.to_json() for f in health.findings],
                  "counts": health.finding_counts,
                  "last_pass_finished": health.audit_last_pass},
        "stale": [s.to_json(now) for s in report.stale],
        "hygiene": {"report_after_seconds": cfg.hygiene_report_after_seconds,
                    "quarantine_dir": None if cfg.quarantine_dir is None
                    else str(cfg.quarantine_dir)},
        "nodes": [b.to_json() for b in health.nodes],
        "problems": report.problems,
        "ok": not report.problems,
    }
    redacted: dict[str, Any] = redact.deep(data)
    return redacted


def unreadable(cfg: Config, error: Exception, daemon: Daemon,
               now: float | None = None) -> tuple[list[str], dict[str, Any]]:
    """The registry cannot be read: the problems to show and the status object that says
    why, with what the daemon says."""
    now = time.time() if now is None else now
    problems = ([daemon.paused.line(now)] if daemon.paused is not None else []) + [
        f"the registry cannot be read: {error}"]
    if not daemon.running:
        problems.append("no daemon holds the lock: nothing is being published")
    data = {"counts": None, "registry": cfg.registry_shown,
            "registry_error": redact.text(str(error)),
            "lock": {"path": str(cfg.lock_path), "holder": daemon.holder},
            "daemon_running": daemon.running, "paused": paused_json(daemon.paused),
            "problems": problems, "ok": False}
    return problems, data
