"""The outbox: every publish becomes one event, delivered at least once with a stable id.

Real daemons publish real FITS files; a real HTTP server on 127.0.0.1 plays the downstream
consumer (it fails, stalls past the read timeout, drops connections, and deduplicates by
Idempotency-Key as a consumer should); a real program plays the command sink. What is
asserted is what the consumer received and what the registry holds.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import textwrap
import threading
import time
import urllib.request
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from contimg_publisher import config as config_mod
from contimg_publisher.config import ConfigError
from contimg_publisher.publish import CRASH_ENV, CrashPoint
from contimg_publisher.registry import Candidate, Identity, Published, Registry
from tests.helpers import (
    PYTHON,
    REPO,
    Sandbox,
    free_port,
    log_events,
    run_cli,
    start_daemon,
    stop,
    wait_for,
    write_config,
    write_fits,
)


class Receiver:
    """A webhook consumer on 127.0.0.1. Each request takes the next behaviour from
    `script` (then `default`): "ok" (200), "fail" (500), "drop" (the connection is closed
    before the body is read), "stall" (the event is taken, then no answer until `release`
    or `stall_seconds`: the client's read timeout ends it first). Like a real consumer it
    remembers each Idempotency-Key it processed and answers a repeat with 200 without
    processing it again, so `seen` holds each event once, in the order processed."""

    def __init__(self, port: int = 0, default: str = "ok", stall_seconds: float = 30.0
                 ) -> None:
        self.script: list[str] = []
        self.default = default
        self.stall_seconds = stall_seconds
        self.release = threading.Event()
        self.requests: list[dict[str, Any]] = []  # every request, whatever its fate
        self.seen: dict[str, dict[str, Any]] = {}  # Idempotency-Key -> event, processed once
        self.lock = threading.Lock()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802
                with receiver.lock:
                    mode = receiver.script.pop(0) if receiver.script else receiver.default
                key = self.headers.get("Idempotency-Key")
                if mode == "drop":
                    receiver.requests.append({"key": key, "mode": mode, "body": None})
                    self.close_connection = True
                    self.connection.shutdown(socket.SHUT_RDWR)
                    return
                data = self.rfile.read(int(self.headers["Content-Length"]))
                event = json.loads(data)
                receiver.requests.append({"key": key, "mode": mode, "body": event,
                                          "content_type": self.headers.get("Content-Type")})
                if mode == "fail":
                    self._answer(500, b"consumer broken")
                    return
                with receiver.lock:
                    receiver.seen.setdefault(key, event)  # processed (a repeat is not)
                if mode == "stall":
                    receiver.release.wait(receiver.stall_seconds)
                self._answer(200, b"ok")

            def _answer(self, status: int, data: bytes) -> None:
                try:
                    self.send_response(status)
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                except OSError:
                    pass  # the client gave up (a stall past its read timeout)

            def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}/hooks/published"
        self.thread = threading.Thread(target=self.server.serve_forever,
                                       kwargs={"poll_interval": 0.1}, daemon=True)
        self.thread.start()

    def keys_in_order(self) -> list[str]:
        with self.lock:
            return list(self.seen)

    def close(self) -> None:
        self.release.set()
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=5)


@pytest.fixture
def receivers() -> Iterator[list[Receiver]]:
    made: list[Receiver] = []
    yield made
    for r in made:
        r.close()


def sandbox_with(tmp_path: Path, notify: dict[str, Any], **tables: dict[str, Any]) -> Sandbox:
    box = Sandbox(tmp_path)
    box.update(notify={"connect_timeout_seconds": 1, "read_timeout_seconds": 1,
                       "retry_initial_seconds": 0.2, "retry_max_seconds": 1, **notify},
               **{"metrics": {"enabled": False}, **tables})
    return box


def publish(box: Sandbox, names: list[str], seed: int = 0) -> None:
    """Mosaics written one after the other, each published before the next is written, so
    the order of publishing is the order of the names."""
    for i, name in enumerate(names):
        write_fits(box.mosaics / f"{name}.fits", seed=seed + i)
        wait_for(lambda n=name: (row := box.row(n)) and row["status"] == "published",
                 timeout=60, what=f"{name} published")


def all_events(box: Sandbox) -> list[dict[str, Any]]:
    out = box.cli("events", "--all", "--json", check=True)
    return json.loads(out.stdout)


def published_ids(box: Sandbox) -> list[str]:
    return [r["data_id"] for r in box.registry_rows() if r["status"] == "published"]


def assert_one_event_each(box: Sandbox, names: list[str]) -> list[dict[str, Any]]:
    """Each published product has exactly one event, in publish order; returns them."""
    events = all_events(box)
    assert sorted(published_ids(box)) == sorted(names)
    assert [e["data_id"] for e in events] == names
    assert len({e["event_id"] for e in events}) == len(names)
    assert [e["sequence"] for e in events] == sorted(e["sequence"] for e in events)
    for e in events:
        row = box.row(e["data_id"])
        assert row is not None
        assert (e["type"], e["published_path"], e["checksum"], e["size_bytes"]) == (
            "published", row["published_path"], row["checksum"], row["size_bytes"])
        assert e["metadata"]["OBJECT"] == row["metadata"]["OBJECT"]
        assert e["checksum"].startswith("sha256:")
    return events


def assert_received_once_in_order(receiver: Receiver, events: list[dict[str, Any]]) -> None:
    assert receiver.keys_in_order() == [e["event_id"] for e in events]
    for e in events:
        got = receiver.seen[e["event_id"]]
        assert got["event_id"] == e["event_id"] and got["data_id"] == e["data_id"]
        # Every attempt carried the same body: the id is stable, and so is what it names.
        bodies = [r["body"] for r in receiver.requests if r["key"] == e["event_id"]
                  and r["body"] is not None]
        assert all(b == bodies[0] for b in bodies)


# --- the webhook ----------------------------------------------------------------------------

@pytest.mark.slow
def test_each_publish_is_one_event_received_once_in_order_through_failures(tmp_path,
                                                                         receivers):
    """The consumer fails, drops the connection and stalls past the read timeout; every
    event still arrives, each processed once, in publish order, with its Idempotency-Key."""
    receiver = Receiver()
    receivers.append(receiver)
    receiver.script = ["fail", "drop", "stall", "ok", "fail", "stall"]
    box = sandbox_with(tmp_path, {"url": receiver.url})
    proc = start_daemon(box)
    names = [f"nightly_2026010{i}" for i in range(1, 6)]
    try:
        publish(box, names)
        wait_for(lambda: len(receiver.seen) == len(names), timeout=60,
                 what="every event received")
        wait_for(lambda: not json.loads(box.cli("events", "--json").stdout), timeout=20,
                 what="no event left undelivered")
    finally:
        assert stop(proc) == 0
    events = assert_one_event_each(box, names)
    assert_received_once_in_order(receiver, events)
    modes = [r["mode"] for r in receiver.requests]
    assert modes[:6] == ["fail", "drop", "stall", "ok", "fail", "stall"]
    assert len(receiver.requests) > len(names)  # some were sent more than once
    assert {r["content_type"] for r in receiver.requests if r["body"]} == {"application/json"}
    assert all(r["key"] for r in receiver.requests)
    logged = log_events(box)
    failed = [e for e in logged if e.get("event") == "event_delivery_failed"]
    assert any("HTTP 500" in e["error"] for e in failed)
    assert any("no answer within 1 s" in e["error"] for e in failed)
    delivered = [e for e in logged if e.get("event") == "event_delivered"]
    assert sorted(e["event_id"] for e in delivered) == sorted(e["event_id"] for e in events)


@pytest.mark.slow
def test_sigkill_while_the_consumer_stalls_loses_nothing(tmp_path, receivers):
    """The daemon is killed while its request hangs; products published meanwhile were not
    held up by it, and after a restart every event arrives once, in order."""
    receiver = Receiver(default="stall", stall_seconds=60)
    receivers.append(receiver)
    box = sandbox_with(tmp_path, {"url": receiver.url, "read_timeout_seconds": 30})
    proc = start_daemon(box)
    try:
        publish(box, ["first"])
        wait_for(lambda: receiver.requests, timeout=30, what="the first request")
        # The request hangs (30 s read timeout); publishing goes on meanwhile.
        started = time.monotonic()
        publish(box, ["second", "third"], seed=10)
        assert time.monotonic() - started < 25
        assert len(receiver.requests) == 1  # still the one stalled request
        pending = json.loads(box.cli("events", "--json").stdout)
        assert [e["data_id"] for e in pending] == ["first", "second", "third"]
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    receiver.default = "ok"
    receiver.release.set()  # the stalled handler answers a client that is gone
    box.update()  # the same config; the daemon comes back
    proc = start_daemon(box)
    try:
        publish(box, ["fourth"], seed=20)
        wait_for(lambda: len(receiver.seen) == 4, timeout=60, what="every event received")
    finally:
        assert stop(proc) == 0
    events = assert_one_event_each(box, ["first", "second", "third", "fourth"])
    assert_received_once_in_order(receiver, events)
    first = [r for r in receiver.requests if r["key"] == events[0]["event_id"]]
    assert len(first) >= 2  # the stalled one, and the one after the restart


@pytest.mark.slow
def test_sink_down_for_a_while_then_back_drains_in_order(tmp_path, receivers):
    """Nothing listens at the webhook's port: products are published all the same, the
    events queue (status, metrics, `events`), and they drain in order once it is back."""
    port = free_port()
    metrics_port = free_port()
    url = f"http://127.0.0.1:{port}/hook"
    box = sandbox_with(tmp_path, {"url": url}, metrics={"enabled": True,
                                                         "listen": f"127.0.0.1:{metrics_port}"},
                       status={"max_undelivered_age_seconds": 2})
    proc = start_daemon(box)
    follow = subprocess.Popen([PYTHON, "-m", "contimg_publisher", "--config",
                               str(box.config_path), "events", "--follow", "--json"],
                              cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True)
    names = ["a_1", "a_2", "a_3", "a_4"]
    try:
        publish(box, names)  # while the sink is down
        pending = json.loads(box.cli("events", "--json").stdout)
        assert [e["data_id"] for e in pending] == names
        assert all(e["deliveries"]["webhook"]["state"] == "pending" for e in pending)
        head = pending[0]["deliveries"]["webhook"]
        wait_for(lambda: json.loads(box.cli("events", "--json").stdout)[0]["deliveries"]
                 ["webhook"]["attempts"] >= 2, timeout=20, what="retries at the head")
        time.sleep(2.5)  # past max_undelivered_age_seconds
        status = box.cli("status", "--json")
        assert status.returncode == 1
        data = json.loads(status.stdout)
        (sink,) = data["events"]
        assert (sink["sink"], sink["undelivered"]) == ("webhook", 4)
        assert sink["oldest_undelivered_age_seconds"] > 2
        assert "Connection refused" in sink["last_error"]
        assert any("4 events wait for the webhook sink" in p for p in data["problems"])
        text = box.cli("status").stdout
        assert "events     webhook: 4 undelivered" in text
        scrape = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics",
                                        timeout=10).read().decode()
        assert 'contimg_publisher_events_undelivered{sink="webhook"} 4.0' in scrape
        assert 'contimg_publisher_event_delivery_failures_total{sink="webhook"}' in scrape
        page = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/",
                                      timeout=10).read().decode()
        assert "Events to consumers" in page and "4 events wait for the webhook sink" in page
        assert head["state"] == "pending"

        receiver = Receiver(port=port)  # back
        receivers.append(receiver)
        wait_for(lambda: len(receiver.seen) == len(names), timeout=30,
                 what="the queue drained")
        wait_for(lambda: box.cli("status").returncode == 0, timeout=20, what="status ok")
        scrape = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics",
                                        timeout=10).read().decode()
        assert 'contimg_publisher_events_undelivered{sink="webhook"} 0.0' in scrape
        assert 'contimg_publisher_events_delivered_total{sink="webhook"} 4.0' in scrape
    finally:
        follow.send_signal(signal.SIGTERM)
        out, err = follow.communicate(timeout=20)
        assert stop(proc) == 0
    assert follow.returncode == 0, err
    events = assert_one_event_each(box, names)
    assert_received_once_in_order(receiver, events)
    # --follow printed each event pending, then delivered, as it happened.
    lines = [json.loads(line) for line in out.splitlines()]
    for e in events:
        states = [x["deliveries"]["webhook"]["state"] for x in lines
                  if x["event_id"] == e["event_id"]]
        assert states[0] == "pending" and states[-1] == "delivered", states


@pytest.mark.slow
def test_reload_points_delivery_at_a_new_url(tmp_path, receivers):
    """SIGHUP: the delivery thread takes the new [notify] url at once."""
    box = sandbox_with(tmp_path, {"url": f"http://127.0.0.1:{free_port()}/gone",
                                  "retry_initial_seconds": 30, "retry_max_seconds": 60})
    proc = start_daemon(box)
    try:
        publish(box, ["before_reload"])
        wait_for(lambda: any(e.get("event") == "event_delivery_failed"
                             for e in log_events(box)), timeout=20, what="a failed attempt")
        receiver = Receiver()
        receivers.append(receiver)
        box.update(notify={"url": receiver.url})
        proc.send_signal(signal.SIGHUP)
        # The 30 s backoff is not waited out: the new URL is tried at once.
        wait_for(lambda: len(receiver.seen) == 1, timeout=15, what="delivery to the new URL")
    finally:
        assert stop(proc) == 0
    events = assert_one_event_each(box, ["before_reload"])
    assert_received_once_in_order(receiver, events)


# --- the command sink -----------------------------------------------------------------------

SINK_SCRIPT = textwrap.dedent("""\
    import json, os, sys
    out = sys.argv[1]
    event = json.load(sys.stdin)
    first = not os.path.exists(out + ".ran")
    with open(out, "a") as fh:
        fh.write(json.dumps({"event": event, "env_id": os.environ["CONTIMG_EVENT_ID"],
                             "exit": 1 if first else 0}) + "\\n")
    open(out + ".ran", "a").close()
    if first:
        print("consumer not ready", file=sys.stderr)
    sys.exit(1 if first else 0)
    """)


@pytest.mark.slow
def test_command_sink_that_exits_1_then_0_and_a_webhook_outage_apart(tmp_path, receivers):
    """The command fails once and then takes every event in order; the webhook, down at
    the same time, does not hold it back, and when it comes back the command is not run
    again for what it already took."""
    script = tmp_path / "sink.py"
    script.write_text(SINK_SCRIPT)
    got = tmp_path / "got.jsonl"
    port = free_port()
    box = sandbox_with(tmp_path, {"url": f"http://127.0.0.1:{port}/hook",
                                  "command": [PYTHON, str(script), str(got)]})
    proc = start_daemon(box)
    names = ["c_1", "c_2", "c_3"]
    try:
        publish(box, names)

        def taken() -> list[dict[str, Any]]:
            lines = got.read_text().splitlines() if got.exists() else []
            return [json.loads(x) for x in lines]
        wait_for(lambda: len([t for t in taken() if t["exit"] == 0]) == 3, timeout=30,
                 what="the command took every event")
        pending = json.loads(box.cli("events", "--json").stdout)
        assert [e["data_id"] for e in pending] == names  # still waiting for the webhook
        assert {e["deliveries"]["command"]["state"] for e in pending} == {"delivered"}
        receiver = Receiver(port=port)
        receivers.append(receiver)
        wait_for(lambda: len(receiver.seen) == 3, timeout=30, what="the webhook drained")
        wait_for(lambda: not json.loads(box.cli("events", "--json").stdout), timeout=20,
                 what="nothing undelivered")
    finally:
        assert stop(proc) == 0
    events = assert_one_event_each(box, names)
    assert_received_once_in_order(receiver, events)
    runs = taken()
    ids = [e["event_id"] for e in events]
    # The first event twice (exit 1, then 0), the others once, in order; never again.
    assert [r["event"]["event_id"] for r in runs] == [ids[0], *ids]
    assert [r["exit"] for r in runs] == [1, 0, 0, 0]
    assert all(r["env_id"] == r["event"]["event_id"] for r in runs)
    failed = [e for e in log_events(box) if e.get("event") == "event_delivery_failed"
              and e.get("sink") == "command"]
    assert len(failed) == 1 and "exit status 1: consumer not ready" in failed[0]["error"]


@pytest.mark.slow
def test_max_attempts_gives_up_on_an_event_and_redeliver_dead_sends_it_again(tmp_path,
                                                                           receivers):
    receiver = Receiver()
    receivers.append(receiver)
    receiver.script = ["fail", "fail"]
    box = sandbox_with(tmp_path, {"url": receiver.url, "max_attempts": 2})
    proc = start_daemon(box)
    try:
        publish(box, ["d_1"])
        wait_for(lambda: any(e.get("event") == "event_dead_lettered"
                             for e in log_events(box)), timeout=20, what="given up")
        publish(box, ["d_2"], seed=5)
        wait_for(lambda: len(receiver.seen) == 1, timeout=20, what="the next event")
        listed = json.loads(box.cli("events", "--json").stdout)
        assert [(e["data_id"], e["deliveries"]["webhook"]["state"]) for e in listed] == [
            ("d_1", "dead")]
        assert "HTTP 500" in listed[0]["deliveries"]["webhook"]["error"]
        status = box.cli("status", "--json")
        assert status.returncode == 1
        assert any("gave up on 1 event" in p for p in json.loads(status.stdout)["problems"])
        again = box.cli("events", "--redeliver-dead", check=True)
        assert "webhook: 2 events to deliver again" in again.stdout
        wait_for(lambda: len(receiver.seen) == 2, timeout=20, what="the dead one")
        wait_for(lambda: box.cli("status").returncode == 0, timeout=20, what="status ok")
    finally:
        assert stop(proc) == 0
    events = assert_one_event_each(box, ["d_1", "d_2"])
    assert receiver.keys_in_order() == [events[1]["event_id"], events[0]["event_id"]]
    # d_2 was sent again after d_1 (in order), and the consumer deduplicated it.
    assert [r["key"] for r in receiver.requests][-2:] == [e["event_id"] for e in events]


# --- the registry: the event is part of the publish's transaction ---------------------------

def _claimed(box: Sandbox, reg: Registry, name: str) -> None:
    path = box.mosaics / f"{name}.fits"
    write_fits(path)
    st = path.stat()
    reg.register(Candidate(name, "mosaic", str(box.stage), str(path), os.fsencode(str(path)),
                           Identity(st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns,
                                    st.st_ctime_ns), "sha256:" + "ab" * 32, {"OBJECT": name}))
    assert reg.claim("me", 60, data_id=name)


def test_event_commits_and_rolls_back_with_the_publish(make_sandbox):
    box = make_sandbox()
    with Registry(box.registry) as reg:
        _claimed(box, reg, "rolled")
        with pytest.raises(RuntimeError), reg.write():
            assert reg.mark_published(Published("rolled", "/p/rolled.fits", "auto"), "me")
            assert reg.events_for("rolled")  # written, inside the transaction
            raise RuntimeError("crash before the commit")
        assert reg.get("rolled").status == "publishing"
        assert reg.events_for("rolled") == []
        with reg.write():
            assert reg.mark_published(Published("rolled", "/p/rolled.fits", "auto",
                                                supersedes="older"), "me")
        (event,) = reg.events_for("rolled")
        body = event.to_json()
        assert (body["type"], body["published_path"], body["supersedes"],
                body["metadata"]) == ("published", "/p/rolled.fits", "older",
                                      {"OBJECT": "rolled"})
        assert body["checksum"] == "sha256:" + "ab" * 32


def test_a_new_sink_starts_at_the_end_and_restoring_a_row_emits_nothing(make_sandbox):
    """A consumer configured later is not sent the archive's history; a row described
    again from publish_log (a legacy re-registration) was already announced."""
    box = make_sandbox()
    with Registry(box.registry) as reg:
        _claimed(box, reg, "old")
        assert reg.mark_published(Published("old", "/p/old.fits", "auto"), "me")
        assert reg.add_sinks(["webhook"]) == ["webhook"]
        assert reg.add_sinks(["webhook"]) == []
        assert reg.outbox_head("webhook") is None
        record = reg.publish_records("old", str(box.mosaics / "old.fits"))[0]
        row = reg.get("old")
        reg.conn.execute("UPDATE data_registry SET status = 'staging' WHERE id = ?", (row.id,))
        assert reg.restore_published(row.id, record)
        assert len(reg.events_for("old")) == 1
        (state,) = reg.sink_states(["webhook"])
        assert state.undelivered == 0


@pytest.mark.slow
@pytest.mark.parametrize("crash_at", [CrashPoint.AFTER_RENAME, CrashPoint.AFTER_COMMIT])
def test_a_kill_around_the_commit_leaves_exactly_one_event(make_sandbox, crash_at):
    """Killed after the final rename (nothing committed: reconciliation completes the
    publish, and its event with it) or just after the commit (the event is already in)."""
    box = make_sandbox(detect={"settle_seconds": 0})
    box.cli("migrate", check=True)
    write_fits(box.mosaics / "k.fits", seed=3)
    old = time.time() - 60
    os.utime(box.mosaics / "k.fits", (old, old))
    crashed = box.cli("scan", env={CRASH_ENV: crash_at})
    assert crashed.returncode == -9
    with Registry(box.registry) as reg:
        assert len(reg.events_for("k")) == (1 if crash_at is CrashPoint.AFTER_COMMIT else 0)
    box.cli("scan", check=True)
    assert box.row("k")["status"] == "published"
    assert_one_event_each(box, ["k"])


# --- config ---------------------------------------------------------------------------------

BASE = {"paths": {"stage_root": "/tmp/s", "products_root": "/tmp/p",
                  "registry": "/tmp/r/registry.sqlite3"}}

BAD_NOTIFY = [
    ({"url": "ftp://host/x"}, "notify.url", "https:// or http://"),
    ({"url": "https:///path"}, "notify.url", "must name a host"),
    ({"url": "https://h/x y"}, "notify.url", "without spaces"),
    ({"url": 5}, "notify.url", "must be a string URL"),
    ({"url": "http://h:99999/"}, "notify.url", "bad port"),
    ({"command": "/bin/true"}, "notify.command", "non-empty list of non-empty strings"),
    ({"command": []}, "notify.command", "non-empty list"),
    ({"command": ["/bin/x", ""]}, "notify.command", "non-empty list"),
    ({"connect_timeout_seconds": 0}, "notify.connect_timeout_seconds", "must be > 0"),
    ({"read_timeout_seconds": "30"}, "notify.read_timeout_seconds", "must be a number"),
    ({"command_timeout_seconds": -1}, "notify.command_timeout_seconds", "must be > 0"),
    ({"retry_initial_seconds": float("inf")}, "notify.retry_initial_seconds", "finite"),
    ({"retry_initial_seconds": 10, "retry_max_seconds": 5}, "notify.retry_max_seconds",
     "less than retry_initial_seconds"),
    ({"max_attempts": -1}, "notify.max_attempts", "must be >= 0"),
    ({"max_attempts": 1.5}, "notify.max_attempts", "must be an integer"),
    ({"urll": "https://h/"}, "notify.urll", "unknown key"),
]


@pytest.mark.parametrize(("notify", "key", "reason"), BAD_NOTIFY,
                         ids=[c[1] + ":" + c[2] for c in BAD_NOTIFY])
def test_bad_notify_values_are_refused(notify, key, reason):
    with pytest.raises(ConfigError) as info:
        config_mod.from_mapping({**BASE, "notify": notify})
    assert info.value.key == key and reason in info.value.reason, str(info.value)


def test_bad_notify_value_through_check_config(tmp_path):
    cfg = write_config(tmp_path / "c.toml", {**BASE, "notify": {"url": "gopher://x/"}})
    out = run_cli(cfg, "check-config")
    assert out.returncode == 2 and out.stdout == ""
    assert out.stderr.strip() == (f"contimg-publisher: bad config: {cfg}: notify.url: must "
                                  "start with https:// or http://, got 'gopher://x/'")


def test_good_notify_values_and_sinks():
    cfg = config_mod.from_mapping({**BASE, "notify": {
        "url": "https://[::1]:8443/hook?token=x", "command": ["/bin/cat"], "max_attempts": 0,
        "read_timeout_seconds": 2}})
    assert cfg.notify_sinks == ("webhook", "command")
    assert cfg.notify_command == ("/bin/cat",) and cfg.notify_read_timeout_seconds == 2.0
    assert config_mod.from_mapping(BASE).notify_sinks == ()


# --- the alert rule -------------------------------------------------------------------------

def test_promtool_unit_tests_the_undelivered_alert(tmp_path, promtool):
    job = 'job="contimg-publisher", instance="pub:9465"'
    tests = {
        "rule_files": [str(REPO / "etc" / "prometheus" / "contimg-publisher-rules.yml")],
        "evaluation_interval": "1m",
        "tests": [{
            "interval": "1m",
            "input_series": [{"series": "contimg_publisher_events_oldest_undelivered_age_"
                              f'seconds{{{job}, sink="webhook"}}',
                              "values": "0 0 0+60x40"},
                             {"series": f'contimg_publisher_events_dead{{{job}, sink="command"}}',
                              "values": "0x5 1x10"}],
            "alert_rule_test": [
                {"eval_time": "15m", "alertname": "ContimgPublisherEventsUndelivered",
                 "exp_alerts": []},
                {"eval_time": "3m", "alertname": "ContimgPublisherEventsDead", "exp_alerts": []},
                {"eval_time": "8m", "alertname": "ContimgPublisherEventsDead",
                 "exp_alerts": [{"exp_labels": {"severity": "warning", "sink": "command",
                                                "job": "contimg-publisher",
                                                "instance": "pub:9465"},
                                 "exp_annotations": {
                                     "summary": "The command sink on pub:9465 gave up on 1 "
                                     "event(s)",
                                     "description": "They reached [notify] max_attempts and "
                                     "were skipped. Fix the consumer, then `contimg-publisher "
                                     "events --redeliver-dead`."}}]},
                {"eval_time": "30m", "alertname": "ContimgPublisherEventsUndelivered",
                 "exp_alerts": [{"exp_labels": {"severity": "warning", "sink": "webhook",
                                                "job": "contimg-publisher",
                                                "instance": "pub:9465"},
                                 "exp_annotations": {
                                     "summary": "An event on pub:9465 has waited 28m 0s for "
                                     "the webhook sink",
                                     "description": "Downstream consumers are not told of "
                                     "new products. `contimg-publisher events` lists what "
                                     "waits and the last error; publishing goes on."}}]},
            ]}]}
    path = tmp_path / "t.yml"
    path.write_text(json.dumps(tests))
    out = subprocess.run([promtool, "test", "rules", str(path)], capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr


def test_events_command_without_sinks(make_sandbox):
    box = make_sandbox()
    box.cli("migrate", check=True)
    out = box.cli("events", check=True)
    assert "no sink configured" in out.stdout
