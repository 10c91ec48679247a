"""`backup`: online copies of the SQLite registry while the daemon publishes, and the
restore drill of the README, on a real daemon, real files and the real CLI."""

from __future__ import annotations

import hashlib
import json
import shutil
import sqlite3
import threading
import time
from pathlib import Path

import pytest

from contimg_publisher.registry import Registry
from tests.helpers import MakeSandbox, Sandbox, start_daemon, stop, wait_for, write_fits
from tests.test_service import NotifySocket

NAME_PATTERN = r"registry-\d{8}T\d{6}\.\d{6}Z\.sqlite3"


def sha(path: Path) -> str:
    return "sha256:" + hashlib.sha256(path.read_bytes()).hexdigest()


def read_rows(db: Path) -> list[dict[str, object]]:
    with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as conn:
        conn.row_factory = sqlite3.Row
        return [dict(r) for r in conn.execute(
            "SELECT data_id, status, published_path, checksum FROM data_registry")]


def integrity(db: Path) -> str:
    with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as conn:
        return str(conn.execute("PRAGMA integrity_check").fetchone()[0])


def published(box: Sandbox) -> dict[str, dict[str, object]]:
    """The live registry's published rows, read as the daemon's own code reads them."""
    with Registry(box.registry) as reg:
        rows = reg.products()
    return {r.data_id: {"published_path": r.published_path, "checksum": r.checksum}
            for r in rows if r.status == "published"}


@pytest.mark.slow
def test_backups_taken_while_publishing_are_consistent_and_only_the_newest_kept(
        tmp_path: Path, make_sandbox: MakeSandbox) -> None:
    box = make_sandbox(detect={"settle_seconds": 0.1})
    dest = tmp_path / "backups"
    notify = NotifySocket(tmp_path / "notify.sock")
    proc = start_daemon(box, notify.path)
    stop_staging = threading.Event()

    def stage_forever() -> None:
        for i in range(400):
            if stop_staging.is_set():
                return
            write_fits(box.mosaics / f"group_{i:04}.fits", pixels=8, seed=i)
            time.sleep(0.02)

    stager = threading.Thread(target=stage_forever)
    try:
        notify.wait("READY", "1", timeout=60)
        stager.start()
        wait_for(lambda: len(published(box)) >= 5, timeout=60, what="a first few published")
        outputs = []
        for _ in range(5):
            out = box.cli("backup", str(dest), "--keep", "3", "--json")
            assert out.returncode == 0, out.stderr
            outputs.append(json.loads(out.stdout))
            time.sleep(0.2)
    finally:
        stop_staging.set()
        if stager.is_alive():
            stager.join(30)
        assert stop(proc) == 0
        notify.close()
    kept = sorted(p.name for p in dest.iterdir())
    assert len(kept) == 3, kept  # no temporary, no fourth
    assert kept == sorted(Path(o["path"]).name for o in outputs[-3:])
    assert [Path(p).name for o in outputs for p in o["removed"]] == \
        [Path(o["path"]).name for o in outputs[:2]]
    counts = []
    for name in kept:
        copy = dest / name
        assert integrity(copy) == "ok"
        assert not Path(f"{copy}-wal").exists()  # a file of its own
        rows = read_rows(copy)
        counts.append(len(rows))
        for row in rows:  # every publish the copy records is in the archive, those bytes
            if row["status"] == "published":
                assert sha(Path(str(row["published_path"]))) == row["checksum"]
    assert counts == sorted(counts) and counts[-1] > counts[0]  # taken while it grew
    assert outputs[-1]["products"] == counts[-1]


@pytest.mark.slow
def test_restore_drill_finds_what_was_published_after_the_backup_once(
        tmp_path: Path, make_sandbox: MakeSandbox) -> None:
    """README's drill: stop, put the backup back, rebuild from the archive, start. Products
    published after the backup are recorded again; nothing is published twice."""
    box = make_sandbox(detect={"settle_seconds": 0.1})
    dest = tmp_path / "backups"
    notify = NotifySocket(tmp_path / "notify.sock")

    def run_until_published(names: list[str], total: int) -> None:
        proc = start_daemon(box, notify.path)
        try:
            notify.wait("READY", "1", timeout=60)
            for name in names:
                write_fits(box.mosaics / f"{name}.fits", pixels=8, seed=len(name) + ord(name[-1]))
            wait_for(lambda: len(published(box)) >= total, timeout=60,
                     what=f"{total} products published")
        finally:
            assert stop(proc) == 0

    run_until_published(["before_1", "before_2"], 2)
    out = box.cli("backup", str(dest))
    assert out.returncode == 0, out.stderr
    (copy,) = dest.iterdir()
    run_until_published(["after_1", "after_2", "after_3"], 5)
    archived = {p.name: sha(p) for p in (box.products / "mosaics").iterdir()}
    assert len(archived) == 5

    # The drill: the daemon is stopped; the backup replaces the registry and its -wal/-shm.
    for extra in ("-wal", "-shm"):
        Path(f"{box.registry}{extra}").unlink(missing_ok=True)
    shutil.copyfile(copy, box.registry)
    assert set(published(box)) == {"before_1", "before_2"}
    out = box.cli("rebuild", "--from-archive", "--json")
    assert out.returncode == 0, out.stdout + out.stderr
    rebuilt = json.loads(out.stdout)
    assert sorted(r["data_id"] for r in rebuilt["created"]) == ["after_1", "after_2", "after_3"]

    proc = start_daemon(box, notify.path)
    try:
        notify.wait("READY", "1", timeout=60)
        time.sleep(1.0)  # a start-up pass that would publish anything again has run by now
    finally:
        assert stop(proc) == 0
        notify.close()
    rows = published(box)
    assert set(rows) == {"before_1", "before_2", "after_1", "after_2", "after_3"}
    assert {p.name: sha(p) for p in (box.products / "mosaics").iterdir()} == archived
    for row in rows.values():
        assert archived[Path(str(row["published_path"])).name] == row["checksum"]


def test_backup_refuses_a_postgres_registry_and_names_the_tools(
        tmp_path: Path, make_sandbox: MakeSandbox) -> None:
    box = make_sandbox()
    box.update(paths={"registry": "postgresql://contimg@dbhost/contimg"})
    out = box.cli("backup", str(tmp_path / "backups"))
    assert out.returncode == 2
    assert "pg_dump" in out.stderr and "PostgreSQL" in out.stderr
    assert not (tmp_path / "backups").exists()


def test_backup_of_a_missing_registry_fails_and_keeps_nothing(
        tmp_path: Path, make_sandbox: MakeSandbox) -> None:
    box = make_sandbox()
    out = box.cli("backup", str(tmp_path / "backups"), "--keep", "2")
    assert out.returncode == 1
    assert str(box.registry) in out.stderr and "nothing kept" in out.stderr
    assert not (tmp_path / "backups").exists()
    assert box.cli("backup", str(tmp_path / "backups"), "--keep", "0").returncode == 2
