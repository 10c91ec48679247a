"""The health summary shared by the status page and `status`, and the page itself.

The page is served by the daemon to whoever opens it: a phone in the control room, a
terminal browser over ssh, an offline console. So it is one self-contained HTML document
(no scripts, no external styles or fonts), it refreshes itself with a meta tag, and it is
made of plain headings and tables that read well without any styling. Product names and
error texts come from the filesystem and from exceptions: every one is escaped.
"""

from __future__ import annotations

import datetime as dt
import html
import socket
import time
from dataclasses import dataclass, field

from contimg_publisher import redact
from contimg_publisher.registry import (
    STATUSES,
    Finding,
    Heartbeat,
    Product,
    RegistryBackend,
    SinkState,
    Unclaimed,
)
from contimg_publisher.states import Status

HOUR, DAY = 3600.0, 86400.0


@dataclass
class Health:
    """One consistent read of the registry, with what an operator needs to judge it."""

    now: float
    counts: dict[str, int]
    counts_by_type: dict[tuple[str, str], int]
    oldest: Product | None             # the longest-waiting product that is not held
    published_hour: int
    failures_hour: int
    published_day: int
    failures_day: int
    waiting: list[Product] = field(default_factory=list)
    publishing: list[Product] = field(default_factory=list)
    failed: list[Product] = field(default_factory=list)
    rejected: list[Product] = field(default_factory=list)
    recent: list[Product] = field(default_factory=list)
    last: Product | None = None
    # Files in product folders that no product owns, unchanged for unclaimed_after seconds.
    unclaimed: list[Unclaimed] = field(default_factory=list)
    # The outbox, per configured sink: what waits to be delivered to downstream consumers.
    sinks: list[SinkState] = field(default_factory=list)
    # The fixity audit: open findings (up to the limit), their count by kind, and when its
    # last full pass finished (None: none yet).
    findings: list[Finding] = field(default_factory=list)
    finding_counts: dict[str, int] = field(default_factory=dict)
    audit_last_pass: float | None = None

    @property
    def finding_total(self) -> int:
        return sum(self.finding_counts.values())
    # The daemons of every node that share the registry (a PostgreSQL one), by heartbeat.
    nodes: list[Heartbeat] = field(default_factory=list)

    @property
    def oldest_age(self) -> float | None:
        return None if self.oldest is None else max(0.0, self.now - self.oldest.staged_at)

    @property
    def success_rate_hour(self) -> float | None:
        return success_rate(self.published_hour, self.failures_hour)

    @property
    def success_rate_day(self) -> float | None:
        return success_rate(self.published_day, self.failures_day)


@dataclass(frozen=True)
class Paused:
    """The daemon paused publishing: the registry cannot be used (reason), since when."""

    reason: str
    since: float | None = None

    def line(self, now: float) -> str:
        lasted = "" if self.since is None else f" for {format_age(now - self.since)}"
        return f"publishing paused: the registry has been unavailable{lasted} " \
               f"({self.reason}); it resumes by itself once the registry can be written"


def success_rate(published: int, failures: int) -> float | None:
    """Publishes over publish attempts (publishes plus failed attempts); None without any."""
    total = published + failures
    return None if total == 0 else published / total


def snapshot(registry: RegistryBackend, limit: int = 50, now: float | None = None,
             unclaimed_after: float = 3600.0, sinks: tuple[str, ...] = ()) -> Health:
    """Read everything in one transaction, so the counts and the lists agree. `limit`
    bounds each list of products; the unclaimed files are listed whole (limit 0) or up to
    the same bound."""
    now = time.time() if now is None else now
    with registry.read():
        last_pass = registry.audit_state().get("last_pass_finished")
        return Health(
            now=now,
            counts=registry.counts(),
            counts_by_type=registry.counts_by_type(),
            oldest=registry.oldest_unheld_waiting(),
            published_hour=registry.published_since(now - HOUR),
            failures_hour=registry.failures_since(now - HOUR),
            published_day=registry.published_since(now - DAY),
            failures_day=registry.failures_since(now - DAY),
            waiting=registry.waiting(limit),
            publishing=registry.by_status(Status.PUBLISHING, limit),
            failed=registry.by_status(Status.FAILED, limit),
            rejected=registry.by_status(Status.REJECTED, limit),
            recent=registry.recent_published(10),
            last=registry.last_published(),
            unclaimed=registry.unclaimed(now - unclaimed_after, limit=limit or None),
            sinks=registry.sink_states(sinks),
            findings=registry.findings(limit=limit or None),
            finding_counts=registry.finding_counts(),
            audit_last_pass=None if last_pass is None else float(last_pass),
            nodes=registry.heartbeats(),
        )


def problems(health: Health, max_waiting_age: float, daemon_running: bool,
             paused: Paused | None = None, max_undelivered_age: float = 900.0) -> list[str]:
    """What needs an operator, one line each; empty when all is well."""
    out = []
    if paused is not None:
        out.append(paused.line(health.now))
    if not daemon_running:
        out.append("no daemon holds the lock: nothing is being published")
    if health.counts.get(Status.FAILED, 0):
        n = health.counts[Status.FAILED]
        names = [p.data_id for p in health.failed[:5]]
        named = (": " + ", ".join(names) + (", …" if n > len(names) else "")) if names else ""
        out.append(f"{n} failed product{'s wait' if n != 1 else ' waits'} for an operator"
                   f"{named} (`contimg-publisher list --status failed`, then `retry`)")
    if health.finding_total:
        n = health.finding_total
        kinds = ", ".join(f"{c} {k}" for k, c in sorted(health.finding_counts.items()) if c)
        out.append(f"the archive audit has {n} open finding{'s' if n != 1 else ''} ({kinds}): "
                   "`contimg-publisher audit` lists them")
    age = health.oldest_age
    if health.oldest is not None and age is not None and age > max_waiting_age:
        out.append(f"oldest waiting product {health.oldest.data_id} has waited "
                   f"{format_age(age)} (limit {format_age(max_waiting_age)})")
    for sink in health.sinks:
        waited = None if sink.oldest_undelivered_at is None else \
            max(0.0, health.now - sink.oldest_undelivered_at)
        if waited is not None and waited > max_undelivered_age:
            why = f"; last error: {sink.last_error}" if sink.last_error else ""
            out.append(f"{sink.undelivered} event{'s wait' if sink.undelivered != 1 else ' waits'}"
                       f" for the {sink.sink} sink, the oldest for {format_age(waited)} "
                       f"(limit {format_age(max_undelivered_age)}){why}"
                       " (`contimg-publisher events`)")
        if sink.dead:
            out.append(f"the {sink.sink} sink gave up on {sink.dead} event"
                       f"{'s' if sink.dead != 1 else ''} (`contimg-publisher events`, then "
                       "`events --redeliver-dead`)")
    out += [f"node {b.node}: its daemon (pid {b.pid} on {b.host}) was last heard from "
            f"{format_age(b.age_seconds)} ago: stopped without a clean stop, or its host is "
            "down or cut off from the registry" for b in health.nodes if b.stale]
    return out


# --- formatting ----------------------------------------------------------------------------

def format_age(seconds: float) -> str:
    s = max(0, int(seconds))
    days, hours, minutes = s // 86400, s % 86400 // 3600, s % 3600 // 60
    if days:
        return f"{days}d{hours:02d}h"
    if hours:
        return f"{hours}h{minutes:02d}m"
    if minutes:
        return f"{minutes}m{s % 60:02d}s"
    return f"{s}s"


def format_rate(rate: float | None) -> str:
    return "-" if rate is None else f"{rate * 100:.1f}%"


def format_when(epoch: float | None) -> str:
    """A Unix time as UTC, '-' for none."""
    if epoch is None:
        return "-"
    return dt.datetime.fromtimestamp(epoch, dt.UTC).strftime("%Y-%m-%d %H:%M:%SZ")


def _e(value: object) -> str:
    """Escaped for HTML; a URL in it without its secrets (redact)."""
    return html.escape("-" if value is None or value == "" else redact.text(str(value)),
                       quote=True)


def _path(value: str | None) -> str:
    """An escaped path that a narrow screen may break after each slash."""
    return _e(value).replace("/", "/<wbr>")


STYLE = """
body{font-family:system-ui,sans-serif;margin:0 auto;padding:0.5em;max-width:72em;
color:#111;background:#fff;line-height:1.35}
h1{font-size:1.3em;margin:0.3em 0}h2{font-size:1.1em;margin:1.2em 0 0.3em}
table{border-collapse:collapse;width:100%;font-size:0.92em}
th,td{border-bottom:1px solid #ccc;padding:0.25em 0.4em;text-align:left;vertical-align:top}
td{overflow-wrap:break-word}
.wrap{overflow-x:auto}.num{text-align:right;white-space:nowrap}
.bad{color:#a00;font-weight:bold}.ok{color:#060;font-weight:bold}
.muted{color:#555;font-size:0.9em}
@media (prefers-color-scheme:dark){body{color:#eee;background:#111}
th,td{border-color:#444}.bad{color:#f77}.ok{color:#7d7}.muted{color:#aaa}}
"""


def _table(header: list[str], rows: list[list[str]], empty: str, numeric: set[int]
           | None = None) -> str:
    if not rows:
        return f"<p class=\"muted\">{_e(empty)}</p>"
    numeric = numeric or set()
    head = "".join(f"<th scope=\"col\">{_e(h)}</th>" for h in header)
    body = "".join(
        "<tr>" + "".join(f"<td class=\"num\">{c}</td>" if i in numeric else f"<td>{c}</td>"
                         for i, c in enumerate(row)) + "</tr>"
        for row in rows)
    return f"<div class=\"wrap\"><table><thead><tr>{head}</tr></thead>" \
           f"<tbody>{body}</tbody></table></div>"


def _more(shown: int, total: int) -> str:
    if total <= shown:
        return ""
    return f"<p class=\"muted\">and {total - shown} more (see <code>contimg-publisher list" \
           f"</code>)</p>"


def _head(host: str, now: float, refresh_seconds: int, started_at: float | None) -> list[str]:
    return [
        "<!DOCTYPE html>",
        "<html lang=\"en\"><head><meta charset=\"utf-8\">",
        f"<meta http-equiv=\"refresh\" content=\"{int(refresh_seconds)}\">",
        "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">",
        f"<title>contimg-publisher on {_e(host)}</title>",
        f"<style>{STYLE}</style></head><body>",
        f"<h1>contimg-publisher on {_e(host)}</h1>",
        f"<p class=\"muted\">as of {_e(format_when(now))}"
        + (f"; daemon up since {_e(format_when(started_at))}" if started_at else "")
        + f"; refreshes every {int(refresh_seconds)} s</p>",
    ]


def render_unreadable(error: str, paused: Paused, *, refresh_seconds: int = 10,
                      started_at: float | None = None, host: str | None = None,
                      now: float | None = None) -> str:
    """The page when the registry cannot be read: what the daemon itself knows."""
    now = time.time() if now is None else now
    parts = _head(host or socket.gethostname(), now, refresh_seconds, started_at)
    parts.append("<h2 class=\"bad\">Needs attention</h2><ul>"
                 f"<li class=\"bad\">{_e(paused.line(now))}</li>"
                 f"<li class=\"bad\">the registry cannot be read now: {_e(error)}</li></ul>")
    parts.append("</body></html>")
    return "\n".join(parts)


def render(health: Health, *, refresh_seconds: int = 10, started_at: float | None = None,
           max_waiting_age: float = 3600.0, host: str | None = None,
           paused: Paused | None = None, max_undelivered_age: float = 900.0,
           targets: dict[str, str] | None = None) -> str:
    """The whole page, as one string of HTML; targets: where each sink sends (shown)."""
    targets = targets or {}
    host = host or socket.gethostname()
    now = health.now
    issues = problems(health, max_waiting_age, daemon_running=True, paused=paused,
                      max_undelivered_age=max_undelivered_age)
    parts = _head(host, now, refresh_seconds, started_at)
    if issues:
        parts.append("<h2 class=\"bad\">Needs attention</h2><ul>"
                     + "".join(f"<li class=\"bad\">{_e(i)}</li>" for i in issues) + "</ul>")
    else:
        parts.append("<p class=\"ok\">All well: nothing waits for an operator.</p>")

    if health.nodes:
        parts.append("<h2>Nodes</h2>")
        parts.append(_table(
            ["node", "host", "pid", "last heard from", "running since", "version"],
            [[_e(b.node) + (" <em class=\"bad\">(no heartbeat)</em>" if b.stale else ""),
              _e(b.host), _e(b.pid), _e(format_age(b.age_seconds) + " ago"),
              _e(format_when(b.started)), _e(b.version)] for b in health.nodes],
            "", numeric={2}))

    parts.append("<h2>Products</h2>")
    parts.append(_table(["status", "count"],
                        [[_e(s), _e(health.counts.get(s, 0))] for s in STATUSES],
                        "no products", numeric={1}))

    parts.append("<h2>Success rate</h2>")
    parts.append(_table(
        ["window", "published", "failed attempts", "success"],
        [["last hour", _e(health.published_hour), _e(health.failures_hour),
          _e(format_rate(health.success_rate_hour))],
         ["last day", _e(health.published_day), _e(health.failures_day),
          _e(format_rate(health.success_rate_day))]],
        "", numeric={1, 2, 3}))

    parts.append("<h2>Waiting</h2>")
    parts.append(_table(
        ["product", "type", "waiting", "attempts", "next try", "staged path"],
        [[_e(p.data_id) + ("" if p.auto_publish_enabled else " <em>(held)</em>"),
          _e(p.data_type), _e(format_age(now - p.staged_at)), _e(p.publish_attempts),
          _e(format_when(p.next_attempt_at)), _path(p.stage_path)] for p in health.waiting],
        "nothing waits", numeric={2, 3}))
    parts.append(_more(len(health.waiting), health.counts.get(Status.STAGING, 0)))

    if health.publishing:
        parts.append("<h2>Publishing now</h2>")
        parts.append(_table(
            ["product", "type", "by", "staged path"],
            [[_e(p.data_id), _e(p.data_type), _e(p.lease_owner), _path(p.stage_path)]
             for p in health.publishing], ""))

    for status, rows, why in ((Status.FAILED, health.failed, "error"),
                              (Status.REJECTED, health.rejected, "reason")):
        parts.append(f"<h2>{status.capitalize()}</h2>")
        parts.append(_table(
            ["product", "type", "attempts", why, "staged path"],
            [[_e(p.data_id), _e(p.data_type), _e(p.publish_attempts), _e(p.publish_error),
              _path(p.stage_path)] for p in rows],
            f"no {status} products", numeric={2}))
        parts.append(_more(len(rows), health.counts.get(status, 0)))

    parts.append("<h2>Unclaimed in staging</h2>")
    parts.append(_table(
        ["file", "unchanged for", "size", "why"],
        [[_path(u.path), _e(format_age(now - u.changed_at)), _e(u.size_bytes), _e(u.reason)]
         for u in health.unclaimed],
        "every file in the product folders belongs to a product", numeric={1, 2}))

    parts.append("<h2>Events to consumers</h2>")
    parts.append(_table(
        ["sink", "undelivered", "oldest waiting", "attempts at its head", "last error",
         "given up"],
        [[_e(f"{k.sink}: {targets[k.sink]}" if targets.get(k.sink) else k.sink),
          _e(k.undelivered),
          _e("-" if k.oldest_undelivered_at is None
             else format_age(now - k.oldest_undelivered_at)),
          _e(k.attempts), _e(k.last_error), _e(k.dead)] for k in health.sinks],
        "no sink is configured ([notify] url, command): events are kept, sent nowhere",
        numeric={1, 2, 3, 5}))
    parts.append("<h2>Archive audit</h2>")
    parts.append(f"<p class=\"muted\">last full pass: {_e(format_when(health.audit_last_pass))}"
                 "</p>")
    parts.append(_table(
        ["kind", "path", "product", "since", "detail"],
        [[_e(f.kind), _path(f.path), _e(f.data_id), _e(format_when(f.first_seen)),
          _e(f.detail)] for f in health.findings],
        "no open findings: every product read back as recorded, nothing unrecorded"))
    parts.append(_more(len(health.findings), health.finding_total))

    parts.append("<h2>Last publishes</h2>")
    parts.append(_table(
        ["product", "type", "published at", "published path"],
        [[_e(p.data_id), _e(p.data_type), _e(format_when(p.published_at)), _path(p.published_path)]
         for p in health.recent],
        "nothing published yet"))

    parts.append("<p class=\"muted\">Metrics for Prometheus: <a href=\"/metrics\">/metrics</a>"
                 "</p></body></html>")
    return "\n".join(p for p in parts if p)
