"""The Debian package (`.ci/dev package`), installed the way an operator does it.

Builds the package twice from this checkout (the version of pyproject.toml, then the same
with its last number raised, as CONTIMG_PACKAGE_VERSION), once per test session, then
boots a throw-away container of this machine's own Debian 12 (tests/support/nspawn-boot.sh
with NSPAWN_ROOT=overlay: the root filesystem, writable through an in-memory overlay)
and drives it from outside (tests/support/package_scenario.py): install, configure the
roots as the README says, publish a mosaic under the packaged unit, back up, upgrade with
an edited config and a registry in place, remove, purge.

The two builds take about 3 minutes on two cores and the container part about 1 minute.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import REPO

# Two package builds and a booted container: minutes.
pytestmark = pytest.mark.slow

SUPPORT = REPO / "tests" / "support"
VERSION = re.findall(r'^version = "(.+)"$', (REPO / "pyproject.toml").read_text(),
                     flags=re.M)[0]
NEXT = re.sub(r"(\d+)$", lambda m: str(int(m.group(1)) + 1), VERSION)


def _build(version: str | None) -> Path:
    env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "PYTHONPATH")}
    if version is not None:
        env["CONTIMG_PACKAGE_VERSION"] = version
    done = subprocess.run([str(REPO / ".ci" / "dev"), "package"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=1800)
    assert done.returncode == 0, done.stderr[-6000:]
    deb = REPO / done.stdout.strip().splitlines()[-1]
    assert deb.is_file(), done.stdout
    return deb


@pytest.fixture(scope="module")
def debs(systemd_nspawn: str, debian_12: None, git_checkout: Path) -> tuple[Path, Path]:
    return _build(None), _build(NEXT)


@pytest.fixture(scope="module")
def seen(debs: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory) -> dict:
    tmp = tmp_path_factory.mktemp("package")
    folder = tmp / "debs"
    folder.mkdir()
    for deb in debs:
        shutil.copy2(deb, folder / deb.name)
    out = tmp / "seen.json"
    env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "NSPAWN_LOG": str(tmp / "console.log"),
           "NSPAWN_ROOT": "overlay", "NSPAWN_ARGS": "systemd.unit=basic.target",
           "NSPAWN_BINDS": f"{folder}:/srv/debs"}
    proc = subprocess.run([str(SUPPORT / "nspawn-boot.sh"), sys.executable,
                           str(SUPPORT / "package_scenario.py"), str(out),
                           f"/srv/debs/{debs[0].name}", f"/srv/debs/{debs[1].name}"],
                          env=env, capture_output=True, text=True, timeout=1800, cwd=REPO)
    assert proc.returncode == 0 and out.exists(), (proc.stdout, proc.stderr)
    result = json.loads(out.read_text())
    print(json.dumps(result, indent=1))
    assert "error" not in result, json.dumps(result, indent=1)
    return result


def test_package_contents(debs):
    """What dpkg would install, read from the .deb itself."""
    first, second = debs
    assert re.fullmatch(rf"contimg-publisher_{re.escape(VERSION)}_[a-z0-9]+\.deb", first.name)
    assert second.name.startswith(f"contimg-publisher_{NEXT}_")
    listing = subprocess.run(["dpkg-deb", "-c", str(first)], capture_output=True, text=True,
                             check=True).stdout
    paths = {line.split()[5].removeprefix(".") for line in listing.splitlines()}
    for path in ("/usr/bin/contimg-publisher", "/etc/contimg-publisher/config.toml",
                 "/lib/systemd/system/contimg-publisher.service",
                 "/lib/systemd/system/contimg-publisher-backup.service",
                 "/lib/systemd/system/contimg-publisher-backup.timer",
                 "/usr/lib/sysusers.d/contimg-publisher.conf",
                 "/usr/lib/tmpfiles.d/contimg-publisher.conf",
                 "/usr/share/doc/contimg-publisher/README.md.gz",
                 "/usr/share/doc/contimg-publisher/copyright"):
        assert path in paths, path
    assert not any("__pycache__" in p for p in paths)
    assert not any(p.startswith("/opt/") for p in paths)
    # Runtime only: none of the lock's test tools.
    for tool in ("pytest", "mypy", "ruff"):
        assert not any(f"/site-packages/{tool}/" in p for p in paths), tool
    depends = subprocess.run(["dpkg-deb", "-f", str(first), "Depends"], capture_output=True,
                             text=True, check=True).stdout
    assert "python3.11" in depends and "libsystemd0" in depends, depends


def test_install_creates_the_user_and_folders_but_starts_nothing(seen):
    assert seen["install"]["rc"] == 0, seen["install"]
    after = seen["after_install"]
    assert after["package"] == f"{VERSION} ii"
    assert after["program_version"] == f"contimg-publisher {VERSION}"
    # Debian's interpreter, not a pyenv one.
    assert after["venv_python"] == "/usr/bin/python3.11"
    assert after["contimg_uid"] and int(after["contimg_uid"]) < 1000
    assert after["state_dir"] == "contimg:contimg 755"
    assert after["pycache_dirs"] > 0  # compiled by the postinst
    assert seen["conffiles"][0] == "/etc/contimg-publisher/config.toml"
    units = seen["after_install_units"]
    assert units["daemon"] == {"enabled": "disabled", "active": "inactive"}
    assert units["timer"] == {"enabled": "enabled", "active": "inactive"}
    assert "path=/usr/bin/contimg-publisher" in units["exec_start"]
    assert "argv[]=/usr/bin/contimg-publisher run" in units["exec_start"]
    assert units["fragment"] == "/lib/systemd/system/contimg-publisher.service"
    assert "systemctl enable --now contimg-publisher" in seen["install"]["stdout"]


def test_configured_daemon_publishes_under_the_packaged_unit(seen):
    assert seen["check_config"] == 0
    assert seen["enable"]["rc"] == 0, seen["enable"]
    assert seen["after_enable"]["daemon"] == {"enabled": "enabled", "active": "active"}
    assert seen["after_enable"]["main"]["User"] == "contimg"
    # The backup timer comes with the daemon.
    assert seen["after_enable"]["timer"]["active"] == "active"
    assert seen["healthz"] == "200", seen["healthz"]
    assert seen["socket"]["active"] == "active", seen["socket"]
    night1 = seen["night1"]
    assert night1["published_sha256"] == night1["staged_sha256"]
    [row] = night1["listed"]
    assert row["published_path"] == "/srv/contimg/products/mosaics/night1.fits"
    assert seen["backup"]["rc"] == 0 and seen["backup"]["Result"] == "success", seen["backup"]


def test_upgrade_keeps_config_and_registry_and_restarts(seen):
    assert seen["upgrade"]["rc"] == 0, seen["upgrade"]
    after = seen["after_upgrade"]
    assert after["package"] == f"{NEXT} ii"
    assert after["program_version"] == f"contimg-publisher {NEXT}"
    assert after["config_roots"] == ["/srv/contimg/stage", "/srv/contimg/products"]
    assert after["config_leftovers"] == []  # no .dpkg-dist / .dpkg-new / .dpkg-old
    units = seen["after_upgrade_units"]
    assert units["daemon"] == {"enabled": "enabled", "active": "active"}
    assert units["main"]["MainPID"] != seen["after_enable"]["main"]["MainPID"]
    assert units["timer"]["active"] == "active"
    # The registry went on: the product published before is still there, and the
    # upgraded daemon publishes the next one.
    assert seen["night2"]["published_sha256"] == seen["night2"]["staged_sha256"]
    assert seen["listed_after_upgrade"] == ["night1", "night2"]


def test_remove_then_purge_keeps_the_registry(seen):
    assert seen["remove"]["rc"] == 0, seen["remove"]
    removed = seen["after_remove"]
    assert removed["package"] == f"{NEXT} rc"
    assert seen["after_remove_daemon"] != "active"
    assert removed["program_version"] is None
    assert removed["venv_exists"] is False  # byte-code cleaned, nothing left behind
    assert removed["config_exists"] is True  # remove keeps conffiles
    assert "not empty so not removed" not in seen["remove"]["stderr"]
    assert seen["purge"]["rc"] == 0, seen["purge"]
    purged = seen["after_purge"]
    assert purged["package"] is None
    assert purged["config_exists"] is False
    assert purged["enable_links"] == []
    # Kept on purge: the registry, its backups, the user, and of course the products.
    assert purged["registry_exists"] is True
    assert len(purged["backups"]) == 1
    assert purged["contimg_uid"] == seen["after_install"]["contimg_uid"]
    assert purged["state_dir"] == "contimg:contimg 755"
    assert purged["products"] == ["night1.fits", "night2.fits"]
    assert "kept /var/lib/contimg-publisher" in seen["purge"]["stdout"]
