"""The shipped unit against a registry and a webhook on another address, under a real
systemd (PID 1 of a container booted by tests/support/nspawn-boot.sh, leader PID in $CT).

    network_scenario.py PG_BIN PG_TEMPLATE OUT_JSON

"Another host" is a network namespace this scenario makes (`ip netns add`), joined to the
container's own (nspawn --private-network) by a veth pair: 10.217.7.1 there, 10.217.7.2
in the container. A PostgreSQL server (a copy of the session's initdb template) and a
small HTTP server listen on 10.217.7.1; nothing else is reachable and nothing leaves the
machine. The daemon is started three times:

1. the shipped unit alone: it may not open an Internet socket (RestrictAddressFamilies);
2. plus only `RestrictAddressFamilies=AF_INET AF_INET6`: the IP firewall
   (IPAddressDeny=any) refuses 10.217.7.1, where systemd's BPF firewall works (probed
   first: `firewall_active`);
3. plus the drop-in `check-config --unit-drop-in` printed inside the container: it
   reaches the registry, publishes, and the webhook gets the event.

Writes what it saw as JSON; the namespace, the link and both servers are removed at the end.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from tests.helpers import wait_for, write_fits  # noqa: E402

UNIT = "contimg-publisher.service"
CT = os.environ["CT"]
ROOT = Path(f"/proc/{CT}/root")
STAGE = Path("/stage/dsa110-contimg")
PRODUCTS = Path("/data/dsa110-contimg/products")
DROP_INS = ROOT / "etc/systemd/system/contimg-publisher.service.d"
NS, HOST_IF, CT_IF = "ct7srv", "ct7s", "ct7c"
SERVER_IP, CT_IP = "10.217.7.1", "10.217.7.2"
PG_PORT, HOOK_PORT = 5432, 8080
HOOK = """
import http.server, sys
out = open(sys.argv[3], "ab", buffering=0)
class H(http.server.BaseHTTPRequestHandler):
    def do_POST(self):
        body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
        out.write(body.replace(b"\\n", b" ") + b"\\n")
        self.send_response(200); self.send_header("Content-Length", "0"); self.end_headers()
    def log_message(self, *a): pass
http.server.HTTPServer((sys.argv[1], int(sys.argv[2])), H).serve_forever()
"""


def run_(*args: str, check: bool = True, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(args), capture_output=True, text=True, timeout=timeout,
                          check=check)


def inside(*args: str, check: bool = False, timeout: float = 60
           ) -> subprocess.CompletedProcess[str]:
    return run_("nsenter", "-t", CT, "-a", *args, check=check, timeout=timeout)


def journal(*matches: str) -> list[dict[str, str]]:
    inside("journalctl", "--sync")
    out = inside("journalctl", "-u", "contimg-publisher", "-o", "json", "--no-pager",
                 *matches).stdout
    return [json.loads(line) for line in out.splitlines() if line.strip()]


def show(*props: str) -> dict[str, str]:
    out = inside("systemctl", "show", UNIT, "-p", ",".join(props), check=True).stdout
    return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)


class Postgres:
    """A copy of the template cluster, its postmaster in the server namespace."""

    def __init__(self, bin_dir: str, template: str) -> None:
        self.bin = Path(bin_dir)
        self.top = Path(tempfile.mkdtemp(prefix="contimg-pg-net-"))
        shutil.chown(self.top, "postgres", "postgres")
        self.data = self.top / "data"
        run_("cp", "-a", template, str(self.data))
        with open(self.data / "pg_hba.conf", "a") as hba:
            hba.write(f"host all all {CT_IP}/32 trust\n")

    def ctl(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return run_("ip", "netns", "exec", NS, "runuser", "-u", "postgres", "--",
                    str(self.bin / "pg_ctl"), "-D", str(self.data), "-l",
                    str(self.top / "server.log"), *args, check=check, timeout=90)

    def start(self) -> None:
        self.ctl("-w", "-t", "60", "-o", f"-k {self.top} -c listen_addresses='{SERVER_IP}' "
                 f"-p {PG_PORT} -c fsync=off", "start")

    def published(self) -> str:
        return run_("runuser", "-u", "postgres", "--", str(self.bin / "psql"), "-h",
                    str(self.top), "-p", str(PG_PORT), "-d", "contimg", "-X", "-A", "-t", "-c",
                    "SELECT data_id || ' ' || status FROM data_registry ORDER BY data_id",
                    check=False).stdout.strip()

    def remove(self) -> None:
        self.ctl("-w", "-m", "immediate", "stop", check=False)
        shutil.rmtree(self.top, ignore_errors=True)


def link_up() -> None:
    run_("ip", "netns", "add", NS)
    run_("ip", "link", "add", HOST_IF, "type", "veth", "peer", "name", CT_IF)
    run_("ip", "link", "set", CT_IF, "netns", CT)
    run_("ip", "link", "set", HOST_IF, "netns", NS)
    run_("ip", "-n", NS, "addr", "add", f"{SERVER_IP}/24", "dev", HOST_IF)
    run_("ip", "-n", NS, "link", "set", HOST_IF, "up")
    run_("ip", "-n", NS, "link", "set", "lo", "up")
    run_("nsenter", "-t", CT, "-n", "ip", "addr", "add", f"{CT_IP}/24", "dev", CT_IF)
    run_("nsenter", "-t", CT, "-n", "ip", "link", "set", CT_IF, "up")


def attempt(seen: dict[str, Any], name: str, extra: str | None) -> None:
    """Start the unit with `extra` as an added drop-in (or none) and record how its first
    registry connection went; then stop it."""
    conf = DROP_INS / "phase.conf"
    if extra is None:
        conf.unlink(missing_ok=True)
    else:
        conf.write_text(extra)
    inside("systemctl", "daemon-reload", check=True)
    since = time.time()
    inside("systemctl", "start", "--no-block", UNIT, check=True)

    def outcome() -> dict[str, str] | None:
        for e in journal("--since", f"@{since:.0f}"):
            if e.get("EVENT") in ("registry_unavailable", "started"):
                return e
        return None
    event = wait_for(outcome, 60, what=f"{name}: the registry reached or refused")
    seen[name] = {"event": event.get("EVENT"), "error": event.get("ERROR"),
                  "families": show("RestrictAddressFamilies")["RestrictAddressFamilies"],
                  "allow": show("IPAddressAllow")["IPAddressAllow"]}
    inside("systemctl", "stop", UNIT, check=True, timeout=120)
    conf.unlink(missing_ok=True)


def run(seen: dict[str, Any], pg: Postgres, servers: list[subprocess.Popen[str]],
        hook_out: Path) -> None:
    link_up()
    pg.start()
    servers.append(subprocess.Popen(["ip", "netns", "exec", NS, sys.executable, "-c", HOOK,
                                     SERVER_IP, str(HOOK_PORT), str(hook_out)],
                                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
    seen["ping_from_container"] = run_("nsenter", "-t", CT, "-n", "ip", "route", "get",
                                       SERVER_IP, check=False).stdout.strip()
    inside("mkdir", "-p", str(STAGE / "mosaics"), str(PRODUCTS), check=True)
    inside("chown", "contimg:contimg", str(STAGE), str(STAGE / "mosaics"), str(PRODUCTS),
           check=True)
    DROP_INS.mkdir(parents=True, exist_ok=True)
    # The drop-in, made as an operator makes it: inside, from the config the unit reads.
    env = dict(line.split("=", 1) for line in show("Environment")["Environment"].split())
    made = inside("env", f"PYTHONPATH={env['PYTHONPATH']}", "/usr/bin/python3", "-m",
                  "contimg_publisher", "--config", env["CONTIMG_PUBLISHER_CONFIG"],
                  "check-config", "--unit-drop-in")
    seen["drop_in"] = made.stdout
    seen["drop_in_rc"] = made.returncode
    seen["drop_in_stderr"] = made.stderr

    # Whether systemd's IP firewall (cgroup BPF) works in this container at all: a unit
    # with IPAccounting= has byte counts only when its BPF programs were attached.
    inside("systemd-run", "--unit=contimg-fwprobe", "-p", "IPAccounting=yes", "-p",
           "IPAddressDeny=any", "--remain-after-exit", "/bin/true", check=True)
    counted = inside("systemctl", "show", "contimg-fwprobe", "-p", "IPEgressBytes").stdout
    seen["firewall_active"] = "[no data]" not in counted and counted.strip() != ""
    seen["firewall_probe"] = counted.strip()
    inside("systemctl", "stop", "contimg-fwprobe")
    attempt(seen, "shipped_unit", None)
    attempt(seen, "families_only", "[Service]\nRestrictAddressFamilies=AF_INET AF_INET6\n")
    seen["hook_before"] = hook_out.read_text() if hook_out.exists() else ""

    (DROP_INS / "network.conf").write_text(made.stdout)
    inside("systemctl", "daemon-reload", check=True)
    start = inside("systemctl", "start", UNIT, timeout=120)
    seen["with_drop_in"] = {"start_rc": start.returncode, "start_stderr": start.stderr,
                            **show("ActiveState", "IPAddressAllow", "RestrictAddressFamilies")}
    data = write_fits(ROOT / STAGE.relative_to("/") / "mosaics" / "night7.fits", pixels=32,
                      seed=7)
    target = ROOT / PRODUCTS.relative_to("/") / "mosaics" / "night7.fits"
    wait_for(lambda: target.exists() and target.stat().st_size == len(data), 60,
             what="night7 published")
    seen["hook_events"] = [json.loads(line) for line in wait_for(
        lambda: [x for x in (hook_out.read_text().splitlines() if hook_out.exists() else [])
                 if x.strip()], 60, what="the webhook's first event")]
    seen["registry_rows"] = wait_for(lambda: (r := pg.published()) and
                                     "night7 published" in r and r, 30,
                                     what="the row at the server")
    seen["delivered"] = [e.get("EVENT") for e in journal("EVENT=event_delivered")]
    inside("systemctl", "stop", UNIT, check=True, timeout=120)


def main() -> int:
    pg_bin, template, out = sys.argv[1], sys.argv[2], Path(sys.argv[3])
    seen: dict[str, Any] = {}
    hook_out = Path(tempfile.mkdtemp(prefix="contimg-hook-")) / "received.jsonl"
    servers: list[subprocess.Popen[str]] = []
    pg = Postgres(pg_bin, template)
    try:
        run(seen, pg, servers, hook_out)
    except Exception as exc:  # the outer test shows what was seen before the failure
        seen["error"] = f"{type(exc).__name__}: {exc}"
        if isinstance(exc, subprocess.CalledProcessError):
            seen["error_stderr"] = exc.stderr
        seen["unit_log"] = [e.get("MESSAGE") for e in journal()][-40:]
    finally:
        for server in servers:
            server.kill()
            server.wait(timeout=10)
        pg.remove()
        run_("ip", "netns", "del", NS, check=False)
        shutil.rmtree(hook_out.parent, ignore_errors=True)
    out.write_text(json.dumps(seen, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
