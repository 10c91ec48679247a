"""Drives the shipped unit under a real systemd (PID 1 of a container booted by
tests/support/nspawn-boot.sh, leader PID in $CT) and writes what it saw as JSON.

    systemd_scenario.py OUT_JSON

Runs on the host; every systemctl and journalctl call goes through nsenter into the
container, and files are put into and read from the container through /proc/$CT/root.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from tests.helpers import wait_for, write_fits  # noqa: E402

UNIT = "contimg-publisher.service"
SOCKET = "contimg-publisher.socket"
CT = os.environ["CT"]
ROOT = Path(f"/proc/{CT}/root")
STAGE = Path("/stage/dsa110-contimg")
PRODUCTS = Path("/data/dsa110-contimg/products")


def inside(*args: str, check: bool = False) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["nsenter", "-t", CT, "-a", *args], capture_output=True, text=True,
                          timeout=60, check=check)


def show(*props: str) -> dict[str, str]:
    out = inside("systemctl", "show", UNIT, "-p", ",".join(props), check=True).stdout
    return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)


def show_unit(unit: str, *props: str) -> dict[str, str]:
    out = inside("systemctl", "show", unit, "-p", ",".join(props), check=True).stdout
    return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)


def fetch_inside(url: str) -> dict[str, object]:
    """GET `url` from the container's network namespace (this Python, its network only)."""
    code = ("import sys, urllib.request\n"
            "with urllib.request.urlopen(sys.argv[1], timeout=10) as r:\n"
            "    sys.stdout.write(str(r.status) + '\\n' + r.read().decode())\n")
    out = subprocess.run(["nsenter", "-t", CT, "-n", sys.executable, "-c", code, url],
                         capture_output=True, text=True, timeout=60)
    status, _, body = out.stdout.partition("\n")
    return {"rc": out.returncode, "status": status, "body": body, "stderr": out.stderr[-2000:]}


def active_with_new_pid(old_pid: str, restarts: int):
    def check():
        state = show("ActiveState", "MainPID", "NRestarts")
        if state["ActiveState"] == "active" and state["MainPID"] not in ("0", old_pid) and \
                int(state["NRestarts"]) >= restarts:
            return state
        return None
    return check


def journal(*matches: str) -> list[dict[str, str]]:
    inside("journalctl", "--sync")
    out = inside("journalctl", "-u", "contimg-publisher", "-o", "json", "--no-pager",
                 *matches).stdout
    return [json.loads(line) for line in out.splitlines() if line.strip()]


def main() -> int:
    seen: dict[str, object] = {}
    try:
        run(seen)
    except Exception as exc:  # the outer test shows what was seen before the failure
        seen["error"] = f"{type(exc).__name__}: {exc}"
        if isinstance(exc, subprocess.CalledProcessError):
            seen["error_stderr"] = exc.stderr
        seen["leader_comm"] = _comm(CT)
        seen["unit_log"] = [e.get("MESSAGE") for e in journal()][-40:]
    Path(sys.argv[1]).write_text(json.dumps(seen, indent=1, default=str))
    return 0


def _comm(pid: str) -> str:
    """The leader's command name, to tell a container that went away from one that hung."""
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError as exc:
        return f"(gone: {exc.strerror})"


def run(seen: dict[str, object]) -> None:
    inside("mkdir", "-p", str(STAGE / "mosaics"), str(PRODUCTS), check=True)
    inside("chown", "contimg:contimg", str(STAGE), str(STAGE / "mosaics"), str(PRODUCTS),
           check=True)
    start = inside("systemctl", "start", UNIT)
    seen["start_rc"] = start.returncode
    seen["start_stderr"] = start.stderr
    seen["after_start"] = show("ActiveState", "SubState", "MainPID", "StatusText", "User")
    first_pid = seen["after_start"]["MainPID"]

    data = write_fits(ROOT / STAGE.relative_to("/") / "mosaics" / "night1.fits", pixels=64,
                      seed=11)
    target = ROOT / PRODUCTS.relative_to("/") / "mosaics" / "night1.fits"
    wait_for(lambda: target.exists() and target.stat().st_size == len(data),
             what="night1 published", timeout=30)
    time.sleep(0.5)
    seen["published_sha256"] = hashlib.sha256(target.read_bytes()).hexdigest()
    seen["staged_sha256"] = hashlib.sha256(data).hexdigest()
    seen["source_left"] = (ROOT / STAGE.relative_to("/") / "mosaics" / "night1.fits").exists()
    owner = inside("stat", "-c", "%U %a", str(PRODUCTS / "mosaics" / "night1.fits"))
    seen["published_owner_mode"] = owner.stdout.strip()
    seen["status_after_publish"] = wait_for(
        lambda: (lambda s: s if "last publish: night1" in s else None)(
            show("StatusText")["StatusText"]), what="STATUS= naming the publish", timeout=15)
    seen["journal_published"] = journal("EVENT=published")
    # The status port: opened by contimg-publisher.socket, served by the daemon.
    seen["socket_after_start"] = show_unit(SOCKET, "ActiveState")
    seen["journal_metrics"] = journal("EVENT=metrics_listening")
    seen["status_json"] = fetch_inside("http://127.0.0.1:9465/status.json")

    reload = inside("systemctl", "reload", UNIT)
    seen["reload_rc"] = reload.returncode
    seen["after_reload"] = show("ActiveState", "MainPID")
    seen["journal_reload_ok"] = wait_for(lambda: journal("EVENT=reload_ok"),
                                          what="reload_ok event")

    inside("systemctl", "kill", "-s", "SIGKILL", UNIT, check=True)
    seen["after_kill"] = wait_for(active_with_new_pid(first_pid, 1), timeout=30,
                                  what="restart after SIGKILL")

    # A wedged process (stopped, so its loop cannot ping) must be killed by the watchdog.
    inside("kill", "-STOP", seen["after_kill"]["MainPID"], check=True)
    seen["after_watchdog"] = wait_for(active_with_new_pid(seen["after_kill"]["MainPID"], 2),
                                  what="watchdog restart", timeout=60)
    seen["watchdog_messages"] = [e.get("MESSAGE") for e in journal()
                                 if "atchdog" in str(e.get("MESSAGE"))]

    stop = inside("systemctl", "stop", UNIT)
    seen["stop_rc"] = stop.returncode
    seen["after_stop"] = show("ActiveState", "Result", "ExecMainStatus", "ExecMainCode")
    seen["journal_stopping"] = [e.get("EVENT") for e in journal()][-5:]
    seen["socket_after_stop"] = show_unit(SOCKET, "ActiveState")


if __name__ == "__main__":
    sys.exit(main())
