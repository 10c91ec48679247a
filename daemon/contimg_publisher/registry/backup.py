"""Online backups of the SQLite registry: SQLite's backup API, checked, written atomically.

The registry is the only record of what was published, why and when; the archive alone
gives back rows (`rebuild --from-archive`) but not the history, the failures, the events or
the legacy columns. A backup is a consistent copy taken while the daemon publishes (the
backup API reads one snapshot; in WAL mode writers go on meanwhile), checked with
`PRAGMA integrity_check` before it is kept, and renamed into place only once it is whole
on disk, so a backup folder never holds a partial file under a backup's name.
"""

from __future__ import annotations

import contextlib
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path

import apsw

PREFIX = "registry-"
SUFFIX = ".sqlite3"
NAME = re.compile(r"^registry-\d{8}T\d{6}\.\d{6}Z\.sqlite3$")  # sorts as it was taken
TEMP_PREFIX = ".registry-backup-"


class BackupError(Exception):
    """A backup that could not be made or did not check out; nothing was kept."""


@dataclass(frozen=True)
class Backup:
    path: Path
    size_bytes: int
    products: int
    schema_version: int
    removed: tuple[Path, ...]  # older backups removed by --keep


def backups_in(folder: Path) -> list[Path]:
    """The backups in `folder`, oldest first (their names sort by time)."""
    try:
        names = os.listdir(folder)
    except FileNotFoundError:
        return []
    return [folder / name for name in sorted(names) if NAME.match(name)]


def _sweep_temps(folder: Path) -> None:
    """Temporaries of backups whose process is gone (killed mid-copy)."""
    for name in os.listdir(folder):
        match = re.match(rf"^{re.escape(TEMP_PREFIX)}(\d+)-", name)
        if match is None:
            continue
        try:
            os.kill(int(match.group(1)), 0)
        except ProcessLookupError:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(folder / name)
        except PermissionError:
            pass  # alive, another user's


def _fsync_path(path: Path, directory: bool = False) -> None:
    fd = os.open(path, (os.O_RDONLY | os.O_DIRECTORY) if directory else os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _target(folder: Path, now: float) -> Path:
    while True:
        stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime(now)) + f".{int(now % 1 * 1e6):06d}Z"
        path = folder / f"{PREFIX}{stamp}{SUFFIX}"
        if not path.exists():
            return path
        now += 1e-6


def _integer(conn: apsw.Connection, sql: str) -> int:
    value = conn.execute(sql).fetchall()[0][0]
    if not isinstance(value, int):
        raise BackupError(f"{sql} gave {value!r}, not a number")
    return value


def _copy(source: str, temp: Path, busy_timeout_seconds: float) -> tuple[int, int]:
    """The whole registry into `temp`, checked; (products, schema version) of the copy."""
    src = apsw.Connection(source, flags=apsw.SQLITE_OPEN_READWRITE)
    try:
        src.set_busy_timeout(int(busy_timeout_seconds * 1000))
        dest = apsw.Connection(str(temp))
        try:
            # One step of every page: one read snapshot of the source, so the copy is
            # consistent even while the daemon commits (WAL: its writes do not wait).
            with dest.backup("main", src, "main") as backup:
                backup.step(-1)
            # A file of its own: no -wal beside it for a restore to forget.
            dest.execute("PRAGMA journal_mode=DELETE").fetchall()
            verdict = [row[0] for row in dest.execute("PRAGMA integrity_check")]
            if verdict != ["ok"]:
                said = "; ".join(map(str, verdict[:5]))
                raise BackupError(f"integrity_check of the copy said: {said}")
            version = _integer(dest, "PRAGMA user_version")
            tables = {row[0] for row in dest.execute(
                "SELECT name FROM sqlite_master WHERE type = 'table'")}
            products = (_integer(dest, "SELECT count(*) FROM data_registry")
                        if "data_registry" in tables else 0)
        finally:
            dest.close()
    finally:
        src.close()
    return products, version


def backup(source: str, folder: Path, keep: int | None = None,
           busy_timeout_seconds: float = 10.0, now: float | None = None) -> Backup:
    """Copy the registry at `source` into `folder` as registry-<UTC time>.sqlite3; with
    `keep`, remove all but the newest `keep` backups there afterwards."""
    if not os.path.isfile(source):
        raise BackupError(f"no registry file at {source}")
    folder.mkdir(parents=True, exist_ok=True, mode=0o750)
    _sweep_temps(folder)
    target = _target(folder, time.time() if now is None else now)
    temp = folder / f"{TEMP_PREFIX}{os.getpid()}-{target.name}"
    try:
        products, version = _copy(source, temp, busy_timeout_seconds)
        _fsync_path(temp)
        os.rename(temp, target)
        _fsync_path(folder, directory=True)
    except apsw.Error as exc:
        raise BackupError(f"SQLite: {exc}") from exc
    finally:
        for leftover in (temp, Path(f"{temp}-journal"), Path(f"{temp}-wal"), Path(f"{temp}-shm")):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(leftover)
    removed: list[Path] = []
    if keep is not None:
        for old in backups_in(folder)[:-keep] if keep > 0 else []:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(old)
                removed.append(old)
    return Backup(target, target.stat().st_size, products, version, tuple(removed))
