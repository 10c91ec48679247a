"""The shipped unit, sysusers file and default config under a real systemd (PID 1).

A throw-away container boots this machine's own /usr (tests/support/nspawn-boot.sh). The
package and its dependencies come from this checkout's virtual environment, bound
read-only at /opt/contimg-publisher and put on PYTHONPATH by a drop-in that also replaces
ExecStart (the container's Python is Debian's /usr/bin/python3) and shortens the watchdog
and restart delays so the test is quick. Everything else is the shipped unit.
"""

from __future__ import annotations

import json
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

from contimg_publisher.logs import MESSAGE_IDS
from tests.helpers import REPO

# Each test boots or drives systemd's own pieces: seconds apiece.
pytestmark = pytest.mark.slow

SUPPORT = REPO / "tests" / "support"
DROP_IN = """[Service]
Environment=PYTHONPATH=/opt/contimg-publisher/src:/opt/contimg-publisher/site-packages
ExecStart=
ExecStart=/usr/bin/python3 -m contimg_publisher run
WatchdogSec=3
TimeoutAbortSec=3
RestartSec=1
"""


def _boot(tmp: Path, scenario: str) -> dict:
    """Boot the container with the program, the shipped unit and the test drop-in bound in,
    run tests/support/SCENARIO against it, and return what the scenario saw."""
    drop_in = tmp / "test.conf"
    drop_in.write_text(DROP_IN)
    site = sysconfig.get_paths()["purelib"]
    binds = {
        str(REPO / "daemon"): "/opt/contimg-publisher/src",
        site: "/opt/contimg-publisher/site-packages",
        str(REPO / "systemd" / "contimg-publisher.service"):
            "/etc/systemd/system/contimg-publisher.service",
        str(REPO / "systemd" / "contimg-publisher.socket"):
            "/etc/systemd/system/contimg-publisher.socket",
        str(drop_in): "/etc/systemd/system/contimg-publisher.service.d/test.conf",
        str(REPO / "systemd" / "contimg-publisher.sysusers"):
            "/etc/sysusers.d/contimg-publisher.conf",
        str(REPO / "etc" / "contimg-publisher" / "config.toml"):
            "/etc/contimg-publisher/config.toml",
    }
    out = tmp / "seen.json"
    env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "NSPAWN_LOG": str(tmp / "console.log"),
           "NSPAWN_BINDS": " ".join(f"{src}:{dst}" for src, dst in binds.items())}
    proc = subprocess.run([str(SUPPORT / "nspawn-boot.sh"), sys.executable,
                           str(SUPPORT / scenario), str(out)], env=env,
                          capture_output=True, text=True, timeout=600, cwd=REPO)
    assert proc.returncode == 0 and out.exists(), (proc.stdout, proc.stderr)
    result = json.loads(out.read_text())
    print(json.dumps(result, indent=1))
    assert "error" not in result, json.dumps(result, indent=1)
    return result


@pytest.fixture(scope="module")
def seen(tmp_path_factory, systemd_nspawn, container_python3):
    return _boot(tmp_path_factory.mktemp("nspawn"), "systemd_scenario.py")


@pytest.fixture(scope="module")
def writer_seen(tmp_path_factory, systemd_nspawn, container_python3):
    return _boot(tmp_path_factory.mktemp("nspawn-writers"), "writer_check_scenario.py")


@pytest.mark.slow
def test_starts_as_notify_service_and_publishes(seen):
    assert seen["start_rc"] == 0, seen["start_stderr"]
    assert seen["after_start"]["ActiveState"] == "active"
    assert seen["after_start"]["SubState"] == "running"
    assert seen["after_start"]["User"] == "contimg"
    assert "watching /stage/dsa110-contimg" in seen["after_start"]["StatusText"]
    assert seen["published_sha256"] == seen["staged_sha256"]
    assert seen["source_left"] is False
    assert seen["published_owner_mode"] == "contimg 644"
    assert "0 waiting, 0 publishing, 0 failed" in seen["status_after_publish"]
    assert "last publish: night1 at " in seen["status_after_publish"]


def test_status_port_from_the_socket_unit(seen):
    """The unit lets the daemon open no Internet socket: the port is the socket unit's,
    started with the service (Wants=) and stopped with it (PartOf=)."""
    assert seen["socket_after_start"]["ActiveState"] == "active"
    [listening] = seen["journal_metrics"]
    assert listening["FROM_SYSTEMD"] == "true", listening
    assert listening["LISTEN"] == "127.0.0.1:9465"
    fetched = seen["status_json"]
    assert fetched["rc"] == 0 and fetched["status"] == "200", fetched
    assert json.loads(fetched["body"])["last_published"]["data_id"] == "night1"
    assert seen["socket_after_stop"]["ActiveState"] == "inactive"


def test_journal_fields_under_systemd(seen):
    [entry] = seen["journal_published"]
    assert entry["MESSAGE_ID"] == MESSAGE_IDS["published"]
    assert entry["DATA_ID"] == "night1"
    assert entry["PUBLISHED_PATH"] == "/data/dsa110-contimg/products/mosaics/night1.fits"
    assert entry["_SYSTEMD_UNIT"] == "contimg-publisher.service"


def test_reload_keeps_the_process(seen):
    assert seen["reload_rc"] == 0
    assert seen["after_reload"]["ActiveState"] == "active"
    assert seen["after_reload"]["MainPID"] == seen["after_start"]["MainPID"]
    assert seen["journal_reload_ok"][0]["MESSAGE_ID"] == MESSAGE_IDS["reload_ok"]


def test_restarted_after_sigkill_and_watchdog(seen):
    assert int(seen["after_kill"]["NRestarts"]) == 1
    assert seen["after_kill"]["MainPID"] != seen["after_start"]["MainPID"]
    assert int(seen["after_watchdog"]["NRestarts"]) == 2
    assert any("Watchdog timeout" in str(m) for m in seen["watchdog_messages"]), \
        seen["watchdog_messages"]


def test_stops_cleanly(seen):
    assert seen["stop_rc"] == 0
    assert seen["after_stop"]["ActiveState"] == "inactive"
    assert seen["after_stop"]["ExecMainStatus"] == "0"
    assert "stopped" in seen["journal_stopping"]


@pytest.mark.slow
def test_writer_check_under_the_shipped_sandbox(writer_seen):
    """As the daemon runs (its user, CAP_LEASE, sandbox), a lease on a staged file of another
    owner answers: none while idle, writing while a process in the container has it open for
    writing. The check unit is the shipped file with only its start-up lines replaced, so
    this fails when the unit loses CAP_LEASE or gets PrivateUsers=yes back."""
    assert writer_seen["sandbox_differences"] == {}, writer_seen["sandbox_differences"]
    assert writer_seen["sandbox"]["User"] == "contimg"
    assert writer_seen["target_owner"] == "root 0"
    uid = int(writer_seen["contimg_uid"])
    for run in ("idle", "busy", "after_close", "private_users"):
        assert writer_seen[run]["start_rc"] == 0, writer_seen[run]
        assert writer_seen[run]["Result"] == "success", writer_seen[run]
        assert writer_seen[run]["file"]["uid"] == uid, writer_seen[run]
    assert writer_seen["idle"]["file"]["check"] == "none", writer_seen["idle"]
    assert writer_seen["idle"]["folder"]["method"] == "lease", writer_seen["idle"]
    assert "night2.fits (owner uid 0) was answered" in writer_seen["idle"]["folder"]["reason"]
    assert writer_seen["holder"] == "ready"
    assert writer_seen["busy"]["file"]["check"] == "writing", writer_seen["busy"]
    assert writer_seen["after_close"]["file"]["check"] == "none", writer_seen["after_close"]


def test_private_users_would_defeat_cap_lease(writer_seen):
    """The control: the same check with PrivateUsers=yes added sees CAP_LEASE in CapEff and is
    refused anyway, since the kernel checks it in the initial user namespace."""
    run = writer_seen["private_users"]
    assert run["file"]["check"] == "unknown", run
    assert run["folder"]["method"] == "close-write", run
    assert "user namespace" in run["folder"]["reason"], run
