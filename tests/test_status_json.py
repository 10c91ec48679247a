"""/status.json on the status port: the object `status --json` prints, from one function.

A real daemon publishes one product and rejects another; the test then reads
/status.json from its port and `status --json` from the command, and compares them: the
same keys at every level, the same counts and lists. Only ages and the like move between
the two reads, so those are compared as present, not as equal.
"""

from __future__ import annotations

import json
import subprocess
import sys
import urllib.error
import urllib.request
from typing import Any

from tests.helpers import REPO, Sandbox, log_events, start_daemon, stop, wait_for, write_fits


def _get(url: str) -> tuple[int, str, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=10) as resp:
            return resp.status, resp.headers.get("Content-Type", ""), resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.headers.get("Content-Type", ""), exc.read()


def _keys(value: Any, prefix: str = "") -> set[str]:
    """Every key path of a JSON value (list items by their keys, not their position)."""
    out: set[str] = set()
    if isinstance(value, dict):
        for k, v in value.items():
            out.add(f"{prefix}{k}")
            out |= _keys(v, f"{prefix}{k}.")
    elif isinstance(value, list):
        for item in value:
            out |= _keys(item, f"{prefix}[].")
    return out


def _listen_address(sandbox: Sandbox) -> str | None:
    for event in log_events(sandbox):
        if event.get("event") == "metrics_listening":
            return str(event["listen"])
    return None


def test_status_json_is_the_object_status_json_prints(make_sandbox) -> None:
    sandbox = make_sandbox()
    write_fits(sandbox.mosaics / "good.fits", pixels=8, seed=1)
    (sandbox.mosaics / "bad.fits").write_bytes(b"this is not FITS\n" * 200)
    proc = start_daemon(sandbox)
    try:
        listen = wait_for(lambda: _listen_address(sandbox), 30, what="metrics_listening")
        rows = lambda: {r["data_id"]: r["status"] for r in sandbox.registry_rows()}  # noqa: E731
        wait_for(lambda: rows() == {"good": "published", "bad": "rejected"}, 30,
                 what="good published, bad rejected")
        status, ctype, body = _get(f"http://{listen}/status.json")
        cli = sandbox.cli("status", "--json")
    finally:
        stop(proc)
    assert status == 200, body
    assert ctype == "application/json"
    served = json.loads(body)
    printed = json.loads(cli.stdout)
    assert _keys(served) == _keys(printed)
    assert served["counts"] == printed["counts"]
    assert served["counts"]["published"] == 1 and served["counts"]["rejected"] == 1
    for key in ("failures_last_hour", "last_published", "lock", "daemon_running", "paused",
                "registry", "success_rate", "held", "failed", "events", "audit", "problems",
                "ok", "max_waiting_age_seconds", "hygiene"):
        assert served[key] == printed[key], key
    assert served["daemon_running"] is True
    assert served["last_published"]["data_id"] == "good"
    assert "daemon" in served["lock"]["holder"]
    assert cli.returncode == (0 if printed["ok"] else 1)


def test_the_server_does_not_import_the_command() -> None:
    code = ("import sys, contimg_publisher.metrics; "
            "print('contimg_publisher.cli' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         cwd=REPO / "daemon", check=True)
    assert out.stdout.strip() == "False"
