"""Secrets in URLs are never printed: check-config, logs, status, the page, events.

Every secret below is a distinct string; each surface is read whole (the real CLI's output,
the real daemon's log, the real status page over HTTP, the bodies a real webhook receiver
got) and must not contain any of them, while showing the redacted form.
"""

from __future__ import annotations

import json
import threading
import urllib.request
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from astropy.io import fits

from contimg_publisher import redact
from tests.helpers import (
    MakeSandbox,
    free_port,
    log_events,
    run_cli,
    start_daemon,
    stop,
    wait_for,
    write_config,
)

SECRETS = ("PW-SECRET-1", "TOKEN-SECRET-2", "PG-SECRET-3", "PG-SECRET-4", "CMD-SECRET-5",
           "CMD-SECRET-6", "LOC-SECRET-7", "LOC-SECRET-8", "HDR-SECRET-9")


def leaked(text: str) -> list[str]:
    return [s for s in SECRETS if s in text]



def test_the_one_function_hides_passwords_and_secret_query_values() -> None:
    assert redact.url("https://user:password@host/path?token=abc&x=1") == \
        "https://user:***@host/path?token=***&x=1"
    assert redact.url("postgresql://contimg:pw@db:5433/c?sslmode=require&sslpassword=k") == \
        "postgresql://contimg:***@db:5433/c?sslmode=require&sslpassword=***"
    for key in ("key", "api_key", "secret", "client_secret", "password", "sig", "signature",
                "X-Amz-Signature", "access_token"):
        assert redact.url(f"https://h/p?{key}=v1&page=2") == f"https://h/p?{key}=***&page=2"
    assert redact.url("https://h/p#access_token=v") == "https://h/p#access_token=***"
    assert redact.url("https://h/plain?page=2") == "https://h/plain?page=2"
    assert redact.text("HTTP 307 (to https://a:b@c/d?sig=1): moved.") == \
        "HTTP 307 (to https://a:***@c/d?sig=***): moved."
    assert redact.deep({"u": ["https://a:b@c/", {"https://h?key=1": 2}]}) == \
        {"u": ["https://a:***@c/", {"https://h?key=***": 2}]}


def test_check_config_prints_no_secret(tmp_path: Path) -> None:
    """A webhook with a password and a token, a PostgreSQL registry with two passwords, a
    command with a URL in its arguments: check-config shows each one redacted."""
    cfg = write_config(tmp_path / "c.toml", {
        "paths": {"stage_root": str(tmp_path / "stage"),
                  "products_root": str(tmp_path / "products"),
                  "registry": "postgresql://contimg:PG-SECRET-3@db.example:5433/contimg"
                              "?sslmode=require&sslpassword=PG-SECRET-4",
                  "lock_file": str(tmp_path / "p.lock")},
        "notify": {"url": "https://alice:PW-SECRET-1@hooks.example/in?token=TOKEN-SECRET-2&x=1",
                   "command": ["/bin/cat", "https://bob:CMD-SECRET-5@h.example/?sig=CMD-SECRET-6"]},
    })
    out = run_cli(cfg, "check-config")
    assert out.returncode == 0, out.stderr
    assert leaked(out.stdout + out.stderr) == [], out.stdout
    assert "https://alice:***@hooks.example/in?token=***&x=1" in out.stdout
    assert "postgresql://contimg:***@db.example:5433/contimg?sslmode=require&sslpassword=***" \
        in out.stdout
    assert "https://bob:***@h.example/?sig=***" in out.stdout


def test_a_bad_url_is_refused_without_printing_its_secret(tmp_path: Path) -> None:
    cfg = write_config(tmp_path / "c.toml", {
        "paths": {"stage_root": str(tmp_path / "s"), "products_root": str(tmp_path / "p"),
                  "registry": str(tmp_path / "r.sqlite3")},
        "notify": {"url": "gopher://alice:PW-SECRET-1@x/?token=TOKEN-SECRET-2"}})
    out = run_cli(cfg, "check-config")
    assert out.returncode == 2
    assert "notify.url" in out.stderr and "alice:***@" in out.stderr, out.stderr
    assert leaked(out.stdout + out.stderr) == [], out.stderr


class Redirecting:
    """A webhook receiver on loopback that keeps every body and answers 307 to a URL with
    secrets in it (so the daemon's delivery error names it)."""

    def __init__(self) -> None:
        self.bodies: list[bytes] = []
        self.lock = threading.Lock()
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802
                n = int(self.headers.get("Content-Length", "0"))
                with outer.lock:
                    outer.bodies.append(self.rfile.read(n))
                self.send_response(307)
                self.send_header("Location", "https://carol:LOC-SECRET-7@elsewhere.example/"
                                 "hook?signature=LOC-SECRET-8")
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.port = int(self.server.server_address[1])
        self.thread = threading.Thread(target=self.server.serve_forever,
                                       kwargs={"poll_interval": 0.1}, daemon=True)
        self.thread.start()

    def received(self) -> list[bytes]:
        with self.lock:
            return list(self.bodies)

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=5)


@pytest.fixture
def receiver() -> Iterator[Redirecting]:
    r = Redirecting()
    yield r
    r.close()


@pytest.mark.slow
def test_daemon_log_status_page_and_events_show_no_secret(make_sandbox: MakeSandbox,
                                                          receiver: Redirecting) -> None:
    port = free_port()
    hook = (f"http://alice:PW-SECRET-1@127.0.0.1:{receiver.port}/in"
            "?token=TOKEN-SECRET-2&page=1")
    sandbox = make_sandbox(metrics={"listen": f"127.0.0.1:{port}"},
                           notify={"url": hook, "connect_timeout_seconds": 2,
                                   "read_timeout_seconds": 2, "retry_initial_seconds": 0.5,
                                   "retry_max_seconds": 1})
    # A header value that is a URL with a secret: it travels in the published event.
    hdu = fits.PrimaryHDU()
    hdu.header["OBJECT"] = "https://dave:HDR-SECRET-9@archive.example/x"
    path = sandbox.mosaics / "with_url.fits"
    hdu.writeto(path, checksum=True)
    proc = start_daemon(sandbox)
    try:
        wait_for(lambda: len(receiver.received()) >= 2, 60,
                 what="two delivery attempts at the webhook")
        wait_for(lambda: any(e.get("event") == "event_delivery_failed"
                             for e in log_events(sandbox)), 30, what="event_delivery_failed")
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=10) as resp:
            page = resp.read().decode()
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/status.json", timeout=10) as resp:
            served_json = resp.read().decode()
        status_text = sandbox.cli("status")
        status_json = sandbox.cli("status", "--json")
    finally:
        stop(proc)
    log = (sandbox.root / "daemon.log").read_text()
    bodies = b"\n".join(receiver.received()).decode()
    for name, text in (("daemon log", log), ("status page", page),
                       ("status", status_text.stdout + status_text.stderr),
                       ("status --json", status_json.stdout + status_json.stderr),
                       ("/status.json", served_json),
                       ("event bodies", bodies)):
        assert leaked(text) == [], f"{name} shows {leaked(text)}:\n{text[:3000]}"
    # What is shown instead: the redacted forms, where each surface names them.
    failed = [e for e in log_events(sandbox) if e.get("event") == "event_delivery_failed"]
    assert "carol:***@elsewhere.example" in failed[0]["error"], failed[0]
    assert "signature=***" in failed[0]["error"], failed[0]
    assert "alice:***@" in failed[0]["target"] and "token=***" in failed[0]["target"]
    events = json.loads(status_json.stdout)["events"]
    assert events[0]["target"].endswith("/in?token=***&page=1"), events
    assert json.loads(served_json)["events"][0]["target"] == events[0]["target"]
    assert "carol:***@" in events[0]["last_error"], events
    assert "alice:***@" in status_text.stdout and "carol:***@" in status_text.stdout
    assert "alice:***@" in page and "carol:***@" in page
    assert json.loads(receiver.received()[0])["metadata"]["OBJECT"] == \
        "https://dave:***@archive.example/x"
