"""Two users, one registry file.

The pipeline's services run as their own user and the daemon as `contimg`, and both write
the same SQLite file in WAL mode, whose `-wal` and `-shm` files are created by whichever
process opens the database first (SQLite gives them the database file's mode, and the
group the folder hands out). With the set-up the README documents, a folder owned by a
group both users are in, setgid so that every file created in it gets that group, and a
umask of 0002 (the unit's `UMask=`) so that the files are group-writable, each keeps
writing whoever opened the file first. Real processes under two real, distinct uids
(setpriv), real files; products on a filesystem of their own, as on the site (the SSD and
the HDD), so the daemon's copies are its own inodes.
"""

from __future__ import annotations

import os
import shutil
import sqlite3
import stat
import subprocess
import sys
import sysconfig
import tempfile
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.helpers import (
    PYTHON,
    Sandbox,
    log_events,
    mount_tmpfs,
    start_daemon,
    stop,
    umount,
    wait_for,
    write_fits,
)

DAEMON_UID, PIPELINE_UID, SHARED_GID = 61001, 61002, 61000

# The test's own interpreter may live where other users cannot reach it (a pyenv build in
# root's home); the system's interpreter of the same version runs the same packages.
SYSTEM_PYTHON = f"/usr/bin/python{sys.version_info.major}.{sys.version_info.minor}"
PACKAGES = [sysconfig.get_paths()["purelib"], str(Path(__file__).resolve().parents[1] / "daemon")]

pytestmark = [pytest.mark.root("running as two other users"),
              pytest.mark.usefixtures("setpriv", "system_python_of_this_version")]


def as_user(uid: int) -> tuple[str, ...]:
    """A prefix for a Python command line (its interpreter first): run it as `uid` (its own
    primary group, the shared group besides), with the umask the unit sets."""
    return ("setpriv", f"--reuid={uid}", f"--regid={uid}", f"--groups={SHARED_GID}", "--",
            "env", f"HOME=/nonexistent-{uid}", f"PYTHONPATH={':'.join(PACKAGES)}",
            "sh", "-c", f'umask 0002; shift; exec {SYSTEM_PYTHON} "$@"', "sh")


# What the pipeline's registry code does to the file (facts: Python sqlite3, WAL, an
# INSERT OR REPLACE of the legacy columns per registration). One registration per line
# read from stdin, "ok" after each commit; the connection stays open until stdin closes.
PIPELINE = textwrap.dedent("""
    import sqlite3, sys, time
    conn = sqlite3.connect(sys.argv[1], timeout=30)
    conn.execute("PRAGMA journal_mode=WAL")
    for line in sys.stdin:
        data_id = line.strip()
        now = time.time()
        conn.execute(
            "INSERT OR REPLACE INTO data_registry (data_type, data_id, base_path, status,"
            " stage_path, created_at, staged_at, auto_publish_enabled, finalization_status)"
            " VALUES ('image', ?, '/stage/dsa110-contimg/images', 'staging', ?, ?, ?, 1,"
            " 'pending')", (data_id, '/stage/dsa110-contimg/images/' + data_id, now, now))
        conn.commit()
        print("ok", data_id, flush=True)
    conn.close()
""")


class Pipeline:
    """A pipeline service as PIPELINE_UID, holding its connection open."""

    def __init__(self, registry: Path) -> None:
        self.proc = subprocess.Popen([*as_user(PIPELINE_UID), PYTHON, "-c", PIPELINE,
                                      str(registry)], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)

    def register(self, data_id: str) -> None:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(data_id + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        assert line.strip() == f"ok {data_id}", line + (self.proc.stdout.read() or "")

    def close(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.close()
        out = self.proc.stdout.read() if self.proc.stdout else ""
        assert self.proc.wait(timeout=30) == 0, out


@pytest.fixture
def site() -> Iterator[Sandbox]:
    # Not under pytest's basetemp (0700): both users must reach the folders.
    top = Path(tempfile.mkdtemp(prefix="pt-wt14-users-"))
    top.chmod(0o755)
    products = top / "products"
    mount_tmpfs(products, "64m")
    try:
        box = Sandbox(top, products_root=products, metrics={"enabled": False})
        state = box.registry.parent
        state.mkdir()
        # The documented set-up: group-shared, setgid folders (registry; staging area).
        for folder in (state, box.stage, box.mosaics):
            os.chown(folder, 0, SHARED_GID)
            folder.chmod(0o2775)
        os.chown(products, DAEMON_UID, DAEMON_UID)
        yield box
    finally:
        umount(products)
        shutil.rmtree(top, ignore_errors=True)


def _stage(box: Sandbox, name: str, seed: int) -> bytes:
    """A mosaic written by the pipeline's user."""
    path = box.mosaics / name
    data = write_fits(path, seed=seed)
    os.chown(path, PIPELINE_UID, SHARED_GID)
    path.chmod(0o664)
    return data


def _status(box: Sandbox, data_id: str) -> str | None:
    db = sqlite3.connect(f"file:{box.registry}?mode=ro", uri=True, timeout=30)
    try:
        row = db.execute("SELECT status FROM data_registry WHERE data_id = ?",
                         (data_id,)).fetchone()
    finally:
        db.close()
    return None if row is None else str(row[0])


def _owner(path: Path) -> tuple[int, int, int]:
    st = os.stat(path)
    return st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)


@pytest.mark.slow
def test_the_pipeline_and_the_daemon_both_keep_writing_whoever_opened_first(site):
    wal = site.registry.with_name(site.registry.name + "-wal")

    # 1. The daemon opens the registry first: it creates the file, its -wal and -shm.
    daemon = start_daemon(site, prefix=as_user(DAEMON_UID))
    try:
        wait_for(lambda: any(e.get("event") == "started" for e in log_events(site)),
                 timeout=60, what="the daemon started as its own user")
        assert _owner(site.registry) == (DAEMON_UID, SHARED_GID, 0o664)
        assert _owner(wal) == (DAEMON_UID, SHARED_GID, 0o664)
        pipeline = Pipeline(site.registry)
        pipeline.register("img_a")  # the other user writes into the daemon's WAL
        data = _stage(site, "first.fits", 1)
        wait_for(lambda: _status(site, "first") == "published", timeout=60,
                 what="the daemon publishing after the pipeline wrote")
        pipeline.register("img_b")
        pipeline.close()
    finally:
        assert stop(daemon) == 0
    assert (site.products / "mosaics" / "first.fits").read_bytes() == data
    assert not wal.exists(), "the last connection to close removes the WAL"

    # 2. The pipeline opens it first: the -wal and -shm are its own.
    pipeline = Pipeline(site.registry)
    pipeline.register("img_c")
    assert _owner(wal) == (PIPELINE_UID, SHARED_GID, 0o664)
    daemon = start_daemon(site, prefix=as_user(DAEMON_UID))
    try:
        data = _stage(site, "second.fits", 2)
        wait_for(lambda: _status(site, "second") == "published", timeout=60,
                 what="the daemon publishing into the pipeline's WAL")
        pipeline.register("img_d")
    finally:
        assert stop(daemon) == 0
        pipeline.close()
    assert (site.products / "mosaics" / "second.fits").read_bytes() == data
    assert [_status(site, d) for d in ("img_a", "img_b", "img_c", "img_d")] == ["staging"] * 4
    errors = [e for e in log_events(site) if e.get("level") in ("error", "critical")]
    assert errors == [], errors
