"""Installs, uses, upgrades, removes and purges the Debian package in a container booted by
tests/support/nspawn-boot.sh (NSPAWN_ROOT=overlay: this machine's Debian 12, writable, in
memory; leader PID in $CT), and writes what it saw as JSON.

    package_scenario.py OUT_JSON FIRST_DEB SECOND_DEB

The .deb paths are inside the container. Runs on the host; every command goes through
nsenter into the container, and files are put into and read from it through
/proc/$CT/root.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from tests.helpers import wait_for, write_fits  # noqa: E402

UNIT = "contimg-publisher.service"
TIMER = "contimg-publisher-backup.timer"
CT = os.environ["CT"]
ROOT = Path(f"/proc/{CT}/root")
STAGE = Path("/srv/contimg/stage")
PRODUCTS = Path("/srv/contimg/products")
STATE = Path("/var/lib/contimg-publisher")
CONFIG = Path("/etc/contimg-publisher/config.toml")
VENV = Path("/usr/lib/contimg-publisher")
# The README's next step for roots outside the unit's ReadWritePaths=.
DROP_IN = f"[Service]\nReadWritePaths={STAGE} {PRODUCTS}\n"


def host(path: Path) -> Path:
    """The container's `path`, seen from the host."""
    return ROOT / path.relative_to("/")


def inside(*args: str, check: bool = False,
           timeout: float = 60) -> subprocess.CompletedProcess[str]:
    env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "DEBIAN_FRONTEND": "noninteractive",
           "LANG": "C.UTF-8"}
    return subprocess.run(["nsenter", "-t", CT, "-a", *args], capture_output=True, text=True,
                          timeout=timeout, check=check, env=env)


def dpkg(*args: str) -> dict[str, object]:
    """One dpkg run (unpacking and compiling the venv takes a while)."""
    done = inside("dpkg", "--force-confdef", "--force-confold", *args, timeout=600)
    return {"rc": done.returncode, "stdout": done.stdout[-3000:], "stderr": done.stderr[-3000:]}


def show(unit: str, *props: str) -> dict[str, str]:
    out = inside("systemctl", "show", unit, "-p", ",".join(props), check=True).stdout
    return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)


def state(unit: str) -> dict[str, str]:
    return {"enabled": inside("systemctl", "is-enabled", unit).stdout.strip(),
            "active": inside("systemctl", "is-active", unit).stdout.strip()}


def as_contimg(*args: str) -> subprocess.CompletedProcess[str]:
    return inside("runuser", "-u", "contimg", "--", "/usr/bin/contimg-publisher", *args)


def listed() -> list[dict[str, object]]:
    out = as_contimg("list", "--json")
    if out.returncode != 0:
        raise RuntimeError(f"list --json: exit {out.returncode}: {out.stderr}")
    return [{k: row.get(k) for k in ("data_id", "status", "published_path")}
            for row in json.loads(out.stdout)]


def publish(name: str, seed: int) -> dict[str, object]:
    """Stage a mosaic and wait for the daemon to move it into the products folder."""
    data = write_fits(host(STAGE / "mosaics" / f"{name}.fits"), pixels=64, seed=seed)
    target = host(PRODUCTS / "mosaics" / f"{name}.fits")
    wait_for(lambda: target.exists() and target.stat().st_size == len(data)
             and not host(STAGE / "mosaics" / f"{name}.fits").exists(),
             what=f"{name} published", timeout=60)
    rows = wait_for(lambda: [r for r in listed() if r["data_id"] == name
                             and r["status"] == "published"], what=f"{name} listed", timeout=30)
    return {"staged_sha256": hashlib.sha256(data).hexdigest(),
            "published_sha256": hashlib.sha256(target.read_bytes()).hexdigest(),
            "listed": rows}


def facts() -> dict[str, object]:
    """What the installed package left on the system."""
    version = inside("dpkg-query", "-W", "-f=${Version} ${db:Status-Abbrev}",
                     "contimg-publisher")
    prog = inside("/usr/bin/contimg-publisher", "--version")
    user = inside("id", "-u", "contimg")
    config = host(CONFIG)
    return {
        "package": version.stdout.strip() if version.returncode == 0 else None,
        "program_version": prog.stdout.strip() if prog.returncode == 0 else None,
        "venv_python": inside("readlink", "-f", str(VENV / "bin" / "python")).stdout.strip()
        or None,
        "venv_exists": host(VENV).exists(),
        "contimg_uid": user.stdout.strip() if user.returncode == 0 else None,
        "state_dir": inside("stat", "-c", "%U:%G %a", str(STATE)).stdout.strip() or None,
        "config_exists": config.exists(),
        "config_roots": re.findall(r'^(?:stage|products)_root = "(.*)"$',
                                   config.read_text(), flags=re.M) if config.exists() else None,
        "config_leftovers": sorted(p.name for p in config.parent.glob("config.toml.*"))
        if config.parent.exists() else None,
        "registry_exists": host(STATE / "registry.sqlite3").exists(),
        "backups": sorted(p.name for p in host(STATE / "backups").glob("registry-*.sqlite3"))
        if host(STATE / "backups").exists() else [],
        "products": sorted(p.name for p in host(PRODUCTS / "mosaics").glob("*.fits"))
        if host(PRODUCTS / "mosaics").exists() else [],
        "enable_links": sorted(str(p.relative_to(host(Path("/etc/systemd/system"))))
                               for p in host(Path("/etc/systemd/system")).glob("*/contimg-*")),
        "pycache_dirs": sum(1 for _ in host(VENV).rglob("__pycache__"))
        if host(VENV).exists() else 0,
    }


def run(seen: dict[str, object], first: str, second: str) -> None:
    # A container image's policy-rc.d (exit 101) forbids maintainer scripts to start, stop
    # or restart services; a Debian host has none. The container's copy goes.
    policy = host(Path("/usr/sbin/policy-rc.d"))
    seen["policy_rc_d_removed"] = policy.exists()
    policy.unlink(missing_ok=True)
    seen["install"] = dpkg("-i", first)
    seen["after_install"] = facts()
    seen["after_install_units"] = {"daemon": state(UNIT), "timer": state(TIMER),
                                   "exec_start": show(UNIT, "ExecStart")["ExecStart"],
                                   "fragment": show(UNIT, "FragmentPath")["FragmentPath"]}
    seen["conffiles"] = inside("dpkg-query", "-W", "-f=${Conffiles}",
                               "contimg-publisher").stdout.split()

    # What the README says to do next: the roots in the config, the drop-in, enable --now.
    text = host(CONFIG).read_text()
    text = re.sub(r'^stage_root = ".*"$', f'stage_root = "{STAGE}"', text, flags=re.M)
    text = re.sub(r'^products_root = ".*"$', f'products_root = "{PRODUCTS}"', text, flags=re.M)
    host(CONFIG).write_text(text)
    host(Path("/etc/systemd/system/contimg-publisher.service.d")).mkdir(parents=True)
    host(Path("/etc/systemd/system/contimg-publisher.service.d/roots.conf")).write_text(DROP_IN)
    inside("mkdir", "-p", str(STAGE / "mosaics"), str(PRODUCTS), check=True)
    inside("chown", "-R", "contimg:contimg", str(STAGE), str(PRODUCTS), check=True)
    seen["check_config"] = as_contimg("check-config").returncode
    enable = inside("systemctl", "enable", "--now", UNIT)
    seen["enable"] = {"rc": enable.returncode, "stderr": enable.stderr}
    seen["after_enable"] = {"daemon": state(UNIT), "timer": state(TIMER),
                            "main": show(UNIT, "MainPID", "User", "ActiveState")}
    seen["night1"] = publish("night1", 11)
    # The status port comes from the packaged socket unit (the daemon opens no Internet
    # socket of its own under the unit).
    health = inside("python3", "-c", "import urllib.request; print(urllib.request.urlopen("
                    "'http://127.0.0.1:9465/healthz', timeout=10).status)")
    seen["healthz"] = health.stdout.strip() or health.stderr.strip()
    seen["socket"] = state("contimg-publisher.socket")
    backup = inside("systemctl", "start", "contimg-publisher-backup.service", timeout=120)
    seen["backup"] = {"rc": backup.returncode, "stderr": backup.stderr,
                      **show("contimg-publisher-backup.service", "Result")}

    seen["upgrade"] = dpkg("-i", second)
    seen["after_upgrade"] = facts()
    seen["after_upgrade_units"] = {
        "daemon": state(UNIT), "timer": state(TIMER),
        "main": wait_for(lambda: (lambda s: s if s["ActiveState"] == "active" else None)(
            show(UNIT, "MainPID", "User", "ActiveState")), what="daemon active after upgrade")}
    seen["night2"] = publish("night2", 12)
    seen["listed_after_upgrade"] = sorted(str(r["data_id"]) for r in listed())

    seen["remove"] = dpkg("-r", "contimg-publisher")
    seen["after_remove"] = facts()
    seen["after_remove_daemon"] = inside("systemctl", "is-active", UNIT).stdout.strip()
    seen["purge"] = dpkg("-P", "contimg-publisher")
    seen["after_purge"] = facts()


def main() -> int:
    seen: dict[str, object] = {}
    try:
        run(seen, sys.argv[2], sys.argv[3])
    except Exception as exc:  # the outer test shows what was seen before the failure
        seen["error"] = f"{type(exc).__name__}: {exc}"
        if isinstance(exc, subprocess.CalledProcessError):
            seen["error_stderr"] = exc.stderr
        out = inside("journalctl", "-u", "contimg-publisher*", "--no-pager", "-n", "60")
        seen["unit_log"] = out.stdout.splitlines()
    Path(sys.argv[1]).write_text(json.dumps(seen, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
