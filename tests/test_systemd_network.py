"""Under a real systemd, the shipped unit reaches a PostgreSQL registry and a webhook on
another address only through the drop-in `check-config --unit-drop-in` prints.

The container (tests/support/nspawn-boot.sh) has a network of its own; the scenario
(tests/support/network_scenario.py) links it by a veth pair to a network namespace it
makes, where a PostgreSQL server and a small HTTP server listen on 10.217.7.1. The
config is the shipped one with `registry` and `[notify] url` pointing there.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

from tests import pg
from tests.helpers import REPO, skip_with
from tests.test_systemd_boot import DROP_IN, SUPPORT

# Each test boots or drives systemd's own pieces: seconds apiece.
pytestmark = pytest.mark.slow

REGISTRY = "postgresql://postgres@10.217.7.1:5432/contimg"
HOOK = "http://10.217.7.1:8080/hook"


def _config(tmp: Path) -> Path:
    text = (REPO / "etc" / "contimg-publisher" / "config.toml").read_text()
    text, n = re.subn(r'^registry = .*$', f'registry = "{REGISTRY}"', text, count=1,
                      flags=re.M)
    assert n == 1
    text, n = re.subn(r"^\[notify\]$", f'[notify]\nurl = "{HOOK}"', text, count=1, flags=re.M)
    assert n == 1
    text = re.sub(r"^settle_seconds = .*$", "settle_seconds = 0.5", text, count=1, flags=re.M)
    path = tmp / "config.toml"
    path.write_text(text)
    return path


@pytest.fixture(scope="module")
def seen(tmp_path_factory, pg_template, systemd_nspawn, container_python3):
    tmp = tmp_path_factory.mktemp("nspawn-net")
    drop_in = tmp / "test.conf"
    drop_in.write_text(DROP_IN)
    binds = {
        str(REPO / "daemon"): "/opt/contimg-publisher/src",
        sysconfig.get_paths()["purelib"]: "/opt/contimg-publisher/site-packages",
        str(REPO / "systemd" / "contimg-publisher.service"):
            "/etc/systemd/system/contimg-publisher.service",
        str(REPO / "systemd" / "contimg-publisher.socket"):
            "/etc/systemd/system/contimg-publisher.socket",
        str(drop_in): "/etc/systemd/system/contimg-publisher.service.d/test.conf",
        str(REPO / "systemd" / "contimg-publisher.sysusers"):
            "/etc/sysusers.d/contimg-publisher.conf",
        str(_config(tmp)): "/etc/contimg-publisher/config.toml",
    }
    out = tmp / "seen.json"
    env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "NSPAWN_LOG": str(tmp / "console.log"),
           "NSPAWN_BINDS": " ".join(f"{src}:{dst}" for src, dst in binds.items())}
    proc = subprocess.run([str(SUPPORT / "nspawn-boot.sh"), sys.executable,
                           str(SUPPORT / "network_scenario.py"), str(pg.bin_dir()),
                           str(pg_template), str(out)], env=env, capture_output=True,
                          text=True, timeout=900, cwd=REPO)
    assert proc.returncode == 0 and out.exists(), (proc.stdout, proc.stderr)
    result = json.loads(out.read_text())
    print(json.dumps(result, indent=1))
    assert "error" not in result, json.dumps(result, indent=1)
    return result


def test_generated_drop_in_names_both_hosts(seen):
    assert seen["drop_in_rc"] == 0, seen["drop_in_stderr"]
    text = seen["drop_in"]
    assert "RestrictAddressFamilies=AF_INET AF_INET6" in text
    assert "# registry, host 10.217.7.1: postgresql://postgres@10.217.7.1:5432/contimg" in text
    assert "# webhook ([notify] url), host 10.217.7.1: http://10.217.7.1:8080/hook" in text
    assert re.findall(r"^IPAddressAllow=(.*)$", text, flags=re.M) == ["10.217.7.1"] * 2


def test_shipped_unit_alone_opens_no_internet_socket(seen):
    run = seen["shipped_unit"]
    assert run["event"] == "registry_unavailable", run
    assert run["families"] == "AF_UNIX", run
    assert "Address family not supported" in run["error"], run


def test_ip_firewall_refuses_an_address_not_allowed(seen):
    """With Internet sockets allowed but no address: IPAddressDeny=any drops the connect."""
    run = seen["families_only"]
    if not seen["firewall_active"]:
        skip_with("systemd's IP firewall (cgroup BPF) is not in effect in this container: "
                  f"a probe unit with IPAccounting=yes counts nothing ({seen['firewall_probe']})"
                  "; IPAddressDeny= cannot be observed here")
    assert run["event"] == "registry_unavailable", run
    assert "AF_INET" in run["families"] and run["allow"] == "127.0.0.0/8 ::1/128", run
    assert "Operation not permitted" in run["error"], run
    assert seen["hook_before"] == ""


def test_with_the_drop_in_it_reaches_the_registry_and_the_webhook(seen):
    run = seen["with_drop_in"]
    assert run["start_rc"] == 0 and run["ActiveState"] == "active", run
    assert "10.217.7.1" in run["IPAddressAllow"], run
    assert "night7 published" in seen["registry_rows"]
    [event] = [e for e in seen["hook_events"] if e["data_id"] == "night7"]
    assert event["type"] == "published"
    assert event["published_path"] == "/data/dsa110-contimg/products/mosaics/night7.fits"
    assert "event_delivered" in seen["delivered"]
