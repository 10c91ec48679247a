"""Runs the writer check (contimg_publisher.writers) under the shipped unit's sandbox, in a
container booted by tests/support/nspawn-boot.sh (leader PID in $CT), and writes what it saw
as JSON.

    writer_check_scenario.py OUT_JSON

The check runs as a oneshot unit made from the unit file systemd loaded for
contimg-publisher.service: every line is kept except those that make it a long-running notify
service (Type, NotifyAccess, ExecStart, ExecReload, WatchdogSec, Restart, RestartSec) and
[Install]; ExecStart runs `python3 -m contimg_publisher.writers` on the staging root and on a
staged file owned by root, with PYTHONPATH taken from the boot test's drop-in. So the check
has the daemon's user, capabilities and sandbox, whatever the shipped file says about them.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

UNIT = "contimg-publisher.service"
CHECK = "contimg-writer-check.service"
CT = os.environ["CT"]
ROOT = Path(f"/proc/{CT}/root")
STAGE = Path("/stage/dsa110-contimg")
TARGET = STAGE / "mosaics" / "night2.fits"
LIFECYCLE = {"Type", "NotifyAccess", "ExecStart", "ExecReload", "WatchdogSec", "Restart",
             "RestartSec"}
# Properties that make the sandbox; the check unit must show the same values as the daemon's.
SANDBOX = ["User", "Group", "CapabilityBoundingSet", "AmbientCapabilities", "PrivateUsers",
           "PrivateMounts", "NoNewPrivileges", "ProtectSystem", "ProtectHome", "PrivateTmp",
           "PrivateDevices", "ProtectProc", "ProcSubset", "ProtectKernelTunables",
           "ProtectControlGroups", "RestrictNamespaces", "SystemCallFilter",
           "SystemCallErrorNumber", "SystemCallArchitectures", "RestrictAddressFamilies",
           "ReadWritePaths", "UMask", "MemoryDenyWriteExecute", "LockPersonality",
           "DynamicUser", "SupplementaryGroups", "RootDirectory", "SecureBits"]
HOLDER = ("import sys; f = open(sys.argv[1], 'ab'); print('ready', flush=True); "
          "sys.stdin.read()")


def inside(*args: str, check: bool = False) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["nsenter", "-t", CT, "-a", *args], capture_output=True, text=True,
                          timeout=60, check=check)


def show(unit: str, props: list[str]) -> dict[str, str]:
    out = inside("systemctl", "show", unit, "-p", ",".join(props), check=True).stdout
    return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)


def check_unit(shipped: str, pythonpath: str) -> str:
    """The shipped unit as a oneshot writer check (see the module doc)."""
    out, section = [], ""
    for line in shipped.splitlines():
        stripped = line.strip()
        if stripped.startswith("["):
            section = stripped
            if section == "[Install]":
                continue
        if section == "[Install]":
            continue
        key = stripped.split("=", 1)[0] if "=" in stripped and stripped[0] not in "#;" else ""
        if section == "[Service]" and key in LIFECYCLE:
            continue
        out.append(line)
        if stripped == "[Service]":
            out += ["Type=oneshot", f"Environment={pythonpath}",
                    f"ExecStart=/usr/bin/python3 -m contimg_publisher.writers {STAGE} {TARGET}"]
    return "\n".join(out) + "\n"


def run_check() -> dict[str, object]:
    """Start the check unit once; its result lines, by path, and how it ended."""
    start = inside("systemctl", "start", CHECK)  # a oneshot: returns once it has run
    state = show(CHECK, ["Result", "ExecMainStatus"])
    inside("journalctl", "--sync")
    # The cursor file makes each call show only what was logged since the previous one.
    lines = inside("journalctl", "-u", CHECK, "-o", "cat", "--no-pager",
                   "--cursor-file=/run/writer-check.cursor").stdout.splitlines()
    results = {}
    for line in lines:
        if line.startswith("{"):
            item = json.loads(line)
            results[item["path"]] = item
    return {"start_rc": start.returncode, "start_stderr": start.stderr, **state,
            "folder": results.get(str(STAGE)), "file": results.get(str(TARGET)),
            "output": lines[-10:]}


def run(seen: dict[str, object]) -> None:
    inside("mkdir", "-p", str(STAGE / "mosaics"), check=True)
    inside("chown", "contimg:contimg", str(STAGE), str(STAGE / "mosaics"), check=True)
    (ROOT / TARGET.relative_to("/")).write_bytes(b"SIMPLE  =                    T" + b" " * 2850)
    seen["target_owner"] = inside("stat", "-c", "%U %u", str(TARGET)).stdout.strip()
    seen["contimg_uid"] = inside("id", "-u", "contimg").stdout.strip()

    shipped = (ROOT / "etc/systemd/system" / UNIT).read_text()
    drop_in = (ROOT / f"etc/systemd/system/{UNIT}.d/test.conf").read_text()
    [pythonpath] = [line.split("=", 1)[1] for line in drop_in.splitlines()
                    if line.startswith("Environment=PYTHONPATH=")]
    unit = check_unit(shipped, pythonpath)
    (ROOT / "etc/systemd/system" / CHECK).write_text(unit)
    seen["check_unit"] = unit
    inside("systemctl", "daemon-reload", check=True)
    daemon, checker = show(UNIT, SANDBOX), show(CHECK, SANDBOX)
    seen["sandbox"] = checker
    seen["sandbox_differences"] = {k: [daemon.get(k), checker.get(k)] for k in SANDBOX
                                   if daemon.get(k) != checker.get(k)}

    seen["idle"] = run_check()
    holder = subprocess.Popen(["nsenter", "-t", CT, "-a", "/usr/bin/python3", "-c", HOLDER,
                               str(TARGET)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              text=True)
    try:
        assert holder.stdout is not None
        seen["holder"] = holder.stdout.readline().strip()
        seen["busy"] = run_check()
    finally:
        assert holder.stdin is not None
        holder.stdin.close()
        holder.wait(timeout=30)
    seen["after_close"] = run_check()

    # The same check in a user namespace of its own: what PrivateUsers=yes would do.
    extra = ROOT / f"etc/systemd/system/{CHECK}.d/private-users.conf"
    extra.parent.mkdir(parents=True, exist_ok=True)
    extra.write_text("[Service]\nPrivateUsers=yes\n")
    inside("systemctl", "daemon-reload", check=True)
    try:
        seen["private_users"] = run_check()
    finally:
        extra.unlink()
        inside("systemctl", "daemon-reload", check=True)


def main() -> int:
    seen: dict[str, object] = {}
    started = time.monotonic()
    try:
        run(seen)
    except Exception as exc:  # the outer test shows what was seen before the failure
        seen["error"] = f"{type(exc).__name__}: {exc}"
        if isinstance(exc, subprocess.CalledProcessError):
            seen["error_stderr"] = exc.stderr
    seen["seconds"] = round(time.monotonic() - started, 2)
    Path(sys.argv[1]).write_text(json.dumps(seen, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
