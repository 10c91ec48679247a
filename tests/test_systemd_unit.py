"""The shipped unit file, checked by systemd's own tools."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

from tests.helpers import REPO

UNIT = REPO / "systemd" / "contimg-publisher.service"
SOCKET = REPO / "systemd" / "contimg-publisher.socket"


def _copy_with_existing_exec(tmp_path: Path) -> Path:
    # verify fails on an ExecStart binary that is not installed on this machine, so the
    # copy points at one that exists; every other line is the shipped one.
    text = re.sub(r"^ExecStart=.*$", "ExecStart=/bin/true", UNIT.read_text(), flags=re.M)
    copy = tmp_path / UNIT.name
    copy.write_text(text)
    return copy


def test_verify_prints_nothing(tmp_path, systemd_analyze):
    out = subprocess.run([systemd_analyze, "verify", "--man=no",
                          str(_copy_with_existing_exec(tmp_path))],
                         capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout + out.stderr == "", out.stdout + out.stderr


def _security(analyze: str, unit: Path) -> tuple[float, list[str], str]:
    """The overall exposure and the names of the checks that count against the unit."""
    out = subprocess.run([analyze, "security", "--offline=yes", str(unit)],
                         capture_output=True, text=True)
    text = out.stdout + out.stderr
    match = re.search(r"Overall exposure level for \S+: (\d+\.\d+)", text)
    assert match, text
    failing = re.findall(r"^\u2717 (\S+)", text, flags=re.M)
    return float(match.group(1)), failing, text


def test_security_exposure_at_most_1_0(tmp_path, systemd_analyze):
    score, failing, text = _security(systemd_analyze, _copy_with_existing_exec(tmp_path))
    assert score <= 1.0, text
    # Each exposure left is explained in the unit, by the name systemd-analyze gives it.
    explained = "\n".join(line for line in UNIT.read_text().splitlines()
                          if line.startswith("# Exposure "))
    assert failing, text
    for name in failing:
        assert name in explained, f"{name} counts against the unit and no comment says why"


def test_unit_opens_no_internet_socket_and_raises_the_descriptor_limit():
    values = _service_values()
    assert values["RestrictAddressFamilies"] == ["AF_UNIX"]
    assert values["IPAddressDeny"] == ["any"] and values["IPAddressAllow"] == ["localhost"]
    assert values["LimitNOFILE"] == ["65536"]
    assert "Wants=contimg-publisher.socket" in UNIT.read_text()


def test_socket_unit_verifies_and_filters_like_the_service(tmp_path, systemd_analyze):
    service = _copy_with_existing_exec(tmp_path)
    socket_unit = tmp_path / SOCKET.name
    socket_unit.write_text(SOCKET.read_text())
    out = subprocess.run([systemd_analyze, "verify", "--man=no", str(service), str(socket_unit)],
                         capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout + out.stderr == "", out.stdout + out.stderr
    text = SOCKET.read_text()
    for line in ("ListenStream=127.0.0.1:9465", "IPAddressDeny=any", "IPAddressAllow=localhost",
                 "PartOf=contimg-publisher.service"):
        assert re.search(rf"^{re.escape(line)}$", text, flags=re.M), line
    assert "[Install]" not in text  # started by the service (Wants=), never on its own


def _service_values() -> dict[str, list[str]]:
    service = UNIT.read_text().split("[Service]", 1)[1].split("\n[", 1)[0]
    values: dict[str, list[str]] = {}
    for line in service.splitlines():
        if "=" in line and not line.startswith("#"):
            key, value = line.split("=", 1)
            values.setdefault(key, []).append(value)
    return values


def test_unit_grants_exactly_cap_lease_where_it_counts():
    # The writer check (contimg_publisher.writers) leases files of other owners: CAP_LEASE and
    # nothing else, outside a private user namespace (where the kernel would ignore it).
    service = UNIT.read_text().split("[Service]", 1)[1].split("\n[", 1)[0]
    values = {}
    for line in service.splitlines():
        if "=" in line and not line.startswith("#"):
            key, value = line.split("=", 1)
            values.setdefault(key, []).append(value)
    assert values["CapabilityBoundingSet"] == ["CAP_LEASE"]
    assert values["AmbientCapabilities"] == ["CAP_LEASE"]
    assert values.get("PrivateUsers", ["no"])[-1] in ("no", "false", "0", "off")


def test_unit_declares_the_service_contract():
    text = UNIT.read_text()
    for line in ("Type=notify", "ExecReload=/bin/kill -HUP $MAINPID", "Restart=on-failure",
                 "StateDirectory=contimg-publisher", "User=contimg"):
        assert line in text, line
    assert re.search(r"^WatchdogSec=\d+", text, flags=re.M)
    sysusers = (REPO / "systemd" / "contimg-publisher.sysusers").read_text()
    assert re.search(r"^u contimg ", sysusers, flags=re.M)


BACKUP = REPO / "systemd" / "contimg-publisher-backup.service"
TIMER = REPO / "systemd" / "contimg-publisher-backup.timer"


def test_backup_units_verify_and_keep_a_week_of_hourly_backups(tmp_path, systemd_analyze):
    service = tmp_path / BACKUP.name
    service.write_text(re.sub(r"^ExecStart=/usr/bin/contimg-publisher ",
                              "ExecStart=/bin/echo ", BACKUP.read_text(), flags=re.M))
    timer = tmp_path / TIMER.name
    timer.write_text(TIMER.read_text())
    out = subprocess.run([systemd_analyze, "verify", "--man=no", str(service), str(timer)],
                         capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout + out.stderr == "", out.stdout + out.stderr
    assert re.search(r"^ExecStart=/usr/bin/contimg-publisher backup \S+ --keep 168$",
                     BACKUP.read_text(), flags=re.M)
    assert re.search(r"^OnCalendar=hourly$", TIMER.read_text(), flags=re.M)
    assert re.search(r"^Persistent=true$", TIMER.read_text(), flags=re.M)
    score = subprocess.run([systemd_analyze, "security", "--offline=yes", str(service)],
                           capture_output=True, text=True)
    match = re.search(r"Overall exposure level for \S+: (\d+\.\d+)", score.stdout + score.stderr)
    assert match and float(match.group(1)) <= 1.0, score.stdout[-2000:]
