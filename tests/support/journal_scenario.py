"""Runs beside a private journald (tests/support/with-journald.sh): one daemon publishes a
mosaic, fails on one that does not fit, rejects a truncated one, reloads its config once
badly and once well, stops; then the journal is written out as JSON lines.

    journal_scenario.py CONFIG BROKEN_CONFIG OUT_JSONL [LATE_FILE STAGED_PATH]

LATE_FILE is renamed to STAGED_PATH once the first mosaic is published (the products disk
is then full).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def cli(config: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "contimg_publisher", "--config", str(config),
                           *args], capture_output=True, text=True, cwd=REPO, timeout=60)


def status_of(config: Path, data_id: str) -> str | None:
    out = cli(config, "show", data_id, "--json")
    return json.loads(out.stdout).get("status") if out.returncode == 0 else None


def wait(predicate, what: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise SystemExit(f"timed out waiting for {what}")
        time.sleep(0.2)


def main() -> int:
    config, broken, out_path = Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3])
    log = open(out_path.with_suffix(".stderr"), "w")  # noqa: SIM115 - closed at exit
    daemon = subprocess.Popen([sys.executable, "-m", "contimg_publisher", "--config",
                               str(config), "run"], cwd=REPO, stdout=log, stderr=log)
    try:
        wait(lambda: status_of(config, "small") == "published", "small published")
        if len(sys.argv) > 5:
            os.rename(sys.argv[4], sys.argv[5])
        wait(lambda: status_of(config, "big") == "failed", "big failed at max attempts")
        wait(lambda: status_of(config, "truncated") == "rejected", "truncated rejected")
        good = config.read_bytes()
        shutil.copyfile(broken, config)
        daemon.send_signal(signal.SIGHUP)
        time.sleep(1.5)
        config.write_bytes(good)
        daemon.send_signal(signal.SIGHUP)
        time.sleep(1.5)
    finally:
        daemon.send_signal(signal.SIGTERM)
        code = daemon.wait(timeout=60)
    subprocess.run(["journalctl", "--sync"], check=True)
    with open(out_path, "w") as out:
        subprocess.run(["journalctl", "-o", "json", "--no-pager",
                        "SYSLOG_IDENTIFIER=contimg-publisher"], stdout=out, check=True)
    print(json.dumps({"daemon_exit": code, "pid": daemon.pid}))
    return 0


if __name__ == "__main__":
    os.environ.pop("NOTIFY_SOCKET", None)
    sys.exit(main())
