"""Staging hygiene: what is left in the staging area, and moving it out on request.

Rejected products and unclaimed files (a sidecar whose product never came, a name no rule
matches) stay in staging until someone acts: the daemon never deletes them. Those unchanged
for `[hygiene] report_after_seconds` are listed by `status`. With `[hygiene] quarantine_dir`
set, `contimg-publisher quarantine` moves them out, under the same sub-path, each with a
record (quarantine_log: original path, new path, reason, time): a rename on one filesystem,
else a copy that is fsynced and verified before the staged file is removed. Nothing is ever
deleted without its copy, and nothing is moved by default.

Quarantine is a command, not a daemon task: moving files the pipeline wrote out of its area
is an operator's decision (a rejected file is often a pipeline bug worth looking at where it
lies), a timer can run the command where a site wants it regular, and the daemon keeps one
job in the staging area: publishing products.
"""

from __future__ import annotations

import contextlib
import os
import stat
import time
import uuid
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from contimg_publisher import paths, transfer
from contimg_publisher.config import Config
from contimg_publisher.registry import Quarantined, RegistryBackend
from contimg_publisher.states import StaleKind, Status


class Moved(StrEnum):
    """How a stale file went into quarantine (quarantine_log.how)."""

    RENAME = "rename"    # the same filesystem: renamed, never copied
    COPY = "copy"        # another filesystem: copied, verified, then removed


@dataclass(frozen=True)
class Stale:
    """A rejected or unclaimed file in staging, unchanged since `changed_at`."""

    kind: StaleKind
    path: str
    path_bytes: bytes
    data_id: str | None
    reason: str
    changed_at: float
    size_bytes: int | None

    def to_json(self, now: float) -> dict[str, Any]:
        return {"kind": self.kind, "path": self.path, "data_id": self.data_id,
                "reason": self.reason, "size_bytes": self.size_bytes,
                "changed_at": self.changed_at,
                "age_seconds": round(max(0.0, now - self.changed_at), 3)}


def _changed(st: os.stat_result) -> float:
    return max(st.st_mtime, st.st_ctime)


def stale(config: Config, registry: RegistryBackend, now: float | None = None) -> list[Stale]:
    """Rejected products and unclaimed files still in staging, unchanged (by their own
    mtime and ctime) for report_after_seconds; oldest first."""
    now = time.time() if now is None else now
    before = now - config.hygiene_report_after_seconds
    root = os.fsencode(str(config.stage_root))
    try:
        root_fd = paths.open_root(root)
    except OSError:
        return []
    candidates: list[tuple[StaleKind, bytes, str | None, str]] = [
        (StaleKind.REJECTED, row.stage_bytes, row.data_id, row.publish_error or Status.REJECTED)
        for row in registry.rejected_before(before)]
    candidates += [(StaleKind.UNCLAIMED, u.path_bytes or paths.undisplay(u.path), None,
                    u.reason) for u in registry.unclaimed(before)]
    out: list[Stale] = []
    try:
        with paths.DirCache(root_fd) as dirs:
            for kind, raw, data_id, reason in candidates:
                try:
                    parts = paths.relative_components(root, raw)
                    st = dirs.lstat(parts)
                except (OSError, paths.UnsafePath):
                    continue  # gone, or not under this staging root
                if _changed(st) > before:
                    continue
                out.append(Stale(kind, paths.display(raw), raw, data_id, reason, _changed(st),
                                 st.st_size if not stat.S_ISDIR(st.st_mode) else None))
    finally:
        os.close(root_fd)
    out.sort(key=lambda s: (s.changed_at, s.path))
    return out


def _free_name(dir_fd: int, name: bytes) -> bytes:
    """name, else name.1, name.2, ...: a quarantined file never replaces another."""
    candidate, n = name, 0
    while transfer.exists(dir_fd, candidate):
        n += 1
        candidate = name + b"." + str(n).encode()
    return candidate


def quarantine(config: Config, registry: RegistryBackend, log: Any, now: float | None = None
               ) -> tuple[list[Quarantined], list[tuple[str, str]]]:
    """Move every stale file into quarantine_dir: (moved, kept with the reason)."""
    assert config.quarantine_dir is not None
    now = time.time() if now is None else now
    before = now - config.hygiene_report_after_seconds
    root = os.fsencode(str(config.stage_root))
    qroot = os.fsencode(str(config.quarantine_dir))
    moved: list[Quarantined] = []
    kept: list[tuple[str, str]] = []
    items = stale(config, registry, now)
    if not items:
        return moved, kept
    os.makedirs(qroot, exist_ok=True)
    stage_fd = paths.open_root(root)
    q_fd = paths.open_root(qroot)
    try:
        for item in items:
            try:
                record = _move(config, stage_fd, q_fd, qroot, root, item, before)
            except (OSError, paths.UnsafePath) as exc:
                kept.append((item.path, f"{type(exc).__name__}: {exc}"))
                continue
            if isinstance(record, str):
                kept.append((item.path, record))
                continue
            registry.record_quarantine(record, item.path_bytes)
            moved.append(record)
            log.info("quarantined", stage_path=record.original_path,
                     quarantine_path=record.quarantine_path, kind=record.kind,
                     data_id=record.data_id, how=record.how, reason=record.reason)
    finally:
        os.close(stage_fd)
        os.close(q_fd)
    return moved, kept


def _move(config: Config, stage_fd: int, q_fd: int, qroot: bytes, root: bytes, item: Stale,
          before: float) -> Quarantined | str:
    """One file out of staging; the Quarantined record, or why it stays."""
    parts = paths.relative_components(root, item.path_bytes)
    src_parent = paths.open_dir_under(stage_fd, parts[:-1])
    try:
        name = parts[-1]
        st = os.stat(name, dir_fd=src_parent, follow_symlinks=False)
        if _changed(st) > before:
            return "changed since it was listed; left in place"
        dest_parent = paths.open_dir_under(q_fd, parts[:-1], create=True)
        try:
            final = _free_name(dest_parent, name)
            if paths.same_filesystem(src_parent, dest_parent):
                paths.rename_noreplace(src_parent, name, dest_parent, final)
                how = Moved.RENAME
            elif stat.S_ISREG(st.st_mode):
                _copy_then_remove(src_parent, name, dest_parent, final, st)
                how = Moved.COPY
            else:
                return (f"{paths.type_name(st.st_mode)} on another filesystem than the "
                        "quarantine folder; move it by hand")
            paths.fsync_dir(dest_parent)
            paths.fsync_dir(src_parent)
        finally:
            os.close(dest_parent)
    finally:
        os.close(src_parent)
    return Quarantined(item.kind, item.data_id, item.path,
                       paths.display(os.path.join(qroot, *parts[:-1], final)), item.reason,
                       item.size_bytes, how, time.time())


# The temporary name's token before every attempt had one of its own: a copy that failed
# left it behind and every later attempt for the same name failed on it.
_LEGACY_TOKEN = "quarantine"


def _token() -> str:
    """A token for one attempt's temporary name: no attempt ever meets another's leftover."""
    return f"quarantine-{uuid.uuid4().hex[:12]}"


def _copy_then_remove(src_parent: int, name: bytes, dest_parent: int, final: bytes,
                      st: os.stat_result) -> None:
    """Copy to a temporary name of this attempt (fsynced), verify it against a second read,
    give it its name without replacing, and only then remove the staged file. On any failure
    (a full disk included) the temporary is removed and the staged file stays."""
    with contextlib.suppress(FileNotFoundError):
        # Left by a failed copy of the version before tokens were unique: only this
        # command ever made that name, and it is never the only copy of anything.
        os.unlink(paths.temp_name(final, _LEGACY_TOKEN), dir_fd=dest_parent)
    temp = paths.temp_name(final, _token())
    fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=src_parent)
    try:
        try:
            copied = transfer.copy_file(fd, dest_parent, temp, "sha256",
                                        stat.S_IMODE(st.st_mode), None, lambda: None)
        except FileExistsError:
            raise  # not this attempt's file: never remove it
        except BaseException:
            _remove_temp(dest_parent, temp)
            raise
        now = os.fstat(fd)
    finally:
        os.close(fd)
    try:
        if (now.st_ino, now.st_size, now.st_mtime_ns) != (st.st_ino, st.st_size,
                                                           st.st_mtime_ns) or \
                transfer.hash_at(dest_parent, temp, "sha256")[1] != copied.checksum:
            raise OSError(f"{paths.display(name)}: changed while being copied, or the copy "
                          "does not read back the same; left in place")
        paths.rename_noreplace(dest_parent, temp, dest_parent, final)
    except BaseException:
        _remove_temp(dest_parent, temp)
        raise
    paths.fsync_dir(dest_parent)
    os.unlink(name, dir_fd=src_parent)


def _remove_temp(dest_parent: int, temp: bytes) -> None:
    """Remove this attempt's temporary (a failure to do so is left for the error raised)."""
    with contextlib.suppress(OSError):
        os.unlink(temp, dir_fd=dest_parent)
    with contextlib.suppress(OSError):
        paths.fsync_dir(dest_parent)
