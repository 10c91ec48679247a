"""Byte-level steps of a publish, with no registry in them: copy a file while hashing it,
compare what is on disk, rename without replacing and prove what moved, chmod only
inodes that have no other name. The protocol (`publish`) decides when each runs.
"""

from __future__ import annotations

import contextlib
import errno
import os
import queue
import stat
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, TypeVar, cast

from contimg_publisher import fits, paths, treewalk
from contimg_publisher.registry import checksum_known
from contimg_publisher.states import FailureKind

# Bytes per read of a copy: whole 4 KiB pages and whole 2880-byte FITS blocks (45 x their
# least common multiple, 7.9 MiB), so the FITS check takes each chunk as it comes.
CHUNK = 45 * 184320
DELAY_ENV = "CONTIMG_PUBLISHER_TEST_COPY_DELAY"  # seconds per chunk, tests only

T = TypeVar("T")


class PublishFailure(Exception):
    """A publish attempt that failed for a reason with a kind."""

    def __init__(self, kind: FailureKind, message: str) -> None:
        self.kind = kind
        super().__init__(message)


class Cancelled(Exception):
    """The daemon is stopping: the attempt is abandoned cleanly."""


@dataclass(frozen=True)
class Copied:
    """What a copy's single read of the source found."""

    size: int                             # bytes copied
    checksum: str                         # "algorithm:hex" of those bytes
    fits: fits.FitsReport | None = None   # the FITS checks, when the copy made them


class _Reader(threading.Thread):
    """Takes the copy's chunks beside it (hashing, FITS checks): hashlib and numpy release
    the GIL, so reading, writing and checking overlap instead of adding up. A reader that
    fails stops the copy (`failed`) and keeps taking chunks, so the copy never blocks."""

    def __init__(self, read: Callable[[Iterator[bytes]], Any]) -> None:
        super().__init__(daemon=True, name="contimg-read")
        self.read = read
        self.chunks: queue.Queue[bytes | None] = queue.Queue(maxsize=4)
        self.result: Any = None
        self.error: BaseException | None = None
        self.failed = threading.Event()
        self._ended = False

    def _take(self) -> Iterator[bytes]:
        while (chunk := self.chunks.get()) is not None:
            yield chunk
        self._ended = True

    def run(self) -> None:
        try:
            self.result = self.read(self._take())
        except BaseException as exc:  # handed to the copying thread, which raises it
            self.error = exc
            self.failed.set()
        while not self._ended:
            self._ended = self.chunks.get() is None


def copy_fd(src_fd: int, dst_fd: int | None, read: Callable[[Iterator[bytes]], T], *,
            cancel: threading.Event | None = None, tick: Callable[[], None] | None = None
            ) -> tuple[int, T]:
    """Read all of src once from offset 0, writing it to dst (None: read only) and handing
    every chunk to `read` (a hash, or the FITS checks), which runs in a thread beside the
    copy; returns (bytes copied, what `read` returned). What `read` raises is raised here,
    once the copy has stopped (it stops early).

    `tick` runs about once a second (lease renewal); `cancel` aborts with Cancelled.
    """
    with contextlib.suppress(OSError, AttributeError):
        os.posix_fadvise(src_fd, 0, 0, os.POSIX_FADV_SEQUENTIAL)
    reader = _Reader(read)
    reader.start()
    offset = 0
    # Tests stop the daemon in the middle of a copy; no disk here is slow enough to do it.
    delay = float(os.environ.get(DELAY_ENV) or 0)
    last_tick = time.monotonic()
    try:
        while not reader.failed.is_set():
            if cancel is not None and cancel.is_set():
                raise Cancelled("stopping")
            chunk = os.pread(src_fd, CHUNK, offset)
            if not chunk:
                break
            reader.chunks.put(chunk)
            if dst_fd is not None:
                view = memoryview(chunk)
                while view:
                    written = os.write(dst_fd, view)
                    view = view[written:]
            offset += len(chunk)
            if delay:
                time.sleep(delay)
            if tick is not None and time.monotonic() - last_tick >= 1.0:
                last_tick = time.monotonic()
                tick()
    finally:
        reader.chunks.put(None)
        reader.join()
    if reader.error is not None:
        raise reader.error
    return offset, cast(T, reader.result)


def read_all(src_fd: int, algorithm: str, fits_size: int | None,
             dst_fd: int | None = None, cancel: threading.Event | None = None,
             tick: Callable[[], None] | None = None) -> Copied:
    """The one read of a file (copied to dst_fd unless None): hashed, and with fits_size
    (the size its headers declared) checked as FITS too; FitsError when that fails."""
    if fits_size is None:
        size, (_n, checksum) = copy_fd(src_fd, dst_fd, lambda c: fits.hash_chunks(c, algorithm),
                                       cancel=cancel, tick=tick)
        return Copied(size, checksum)
    size, report = copy_fd(src_fd, dst_fd,
                           lambda c: fits.check_chunks(c, fits_size, algorithm),
                           cancel=cancel, tick=tick)
    return Copied(size, report.checksum, report)


def copy_file(src_fd: int, dest_fd: int, temp: bytes, algorithm: str, file_mode: int,
              cancel: threading.Event | None, tick: Callable[[], None],
              fits_size: int | None = None) -> Copied:
    """Copy a file into the new name `temp` in dest_fd, with its mtime, the archive's mode,
    and an fsync, checking it on the way (read_all)."""
    out = paths.create_exclusive(dest_fd, temp, 0o600)
    try:
        copied = read_all(src_fd, algorithm, fits_size, out, cancel, tick)
        st = os.fstat(src_fd)
        os.fchmod(out, file_mode)
        os.utime(out, ns=(st.st_atime_ns, st.st_mtime_ns))
        os.fsync(out)
    finally:
        os.close(out)
    return copied


def copy_tree(src_dir: int, dest_fd: int, temp: bytes, file_mode: int, dir_mode: int,
              cancel: threading.Event | None, tick: Callable[[], None]) -> int:
    """A folder product across filesystems: file by file into the new folder `temp`;
    returns the bytes copied."""
    os.mkdir(temp, 0o700, dir_fd=dest_fd)
    total = 0
    top_fd = os.open(temp, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC,
                     dir_fd=dest_fd)
    try:
        # A folder the walk does not enter fails the copy (paths.TreeProblem, an OSError):
        # a copy without it would not be the product.
        for folder in treewalk.walk(src_dir):
            dfd = folder.fd
            out_dir = top_fd if not folder.parts else paths.open_dir_under(top_fd, folder.parts)
            try:
                for d in folder.dirs:
                    os.mkdir(d, dir_mode, dir_fd=out_dir)
                for f in folder.files:
                    fd = _open_member(dfd, f)
                    try:
                        if not stat.S_ISREG(os.fstat(fd).st_mode):
                            raise PublishFailure(FailureKind.SOURCE_CHANGED,
                                                 f"{paths.display(f)} inside the folder is "
                                                 "not a file")
                        total += copy_file(fd, out_dir, f, "sha256", file_mode,
                                           cancel, tick).size
                    finally:
                        os.close(fd)
                st = os.fstat(dfd)
                os.fchmod(out_dir, dir_mode)
                os.utime(out_dir, ns=(st.st_atime_ns, st.st_mtime_ns))
                os.fsync(out_dir)
            finally:
                if out_dir != top_fd:
                    os.close(out_dir)
    finally:
        os.close(top_fd)
    return total


def _open_member(dir_fd: int, name: bytes) -> int:
    """A file of a folder product, opened for its copy; a link is never followed."""
    try:
        return os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dir_fd)
    except OSError as exc:
        if exc.errno != errno.ELOOP:
            raise
        raise PublishFailure(FailureKind.SOURCE_CHANGED, f"{paths.display(name)} inside the "
                             "folder is a symbolic link") from None


def exists(dir_fd: int, name: bytes) -> bool:
    try:
        os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
        return True
    except FileNotFoundError:
        return False


# --- one publish ------------------------------------------------------------------------------


def rerun_identical(src_parent: int, name: bytes, dest_fd: int, final: bytes,
                     checksum: str | None) -> bool:
    """Unlink the staged `name` when it and the archived `final` both hash to `checksum`
    (and the name still leads to the file that was hashed)."""
    if not checksum_known(checksum):
        return False
    algorithm = checksum.split(":", 1)[0]
    fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK,
                 dir_fd=src_parent)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or fits.hash_fd(fd, algorithm=algorithm)[1] != checksum:
            return False
        if hash_at(dest_fd, final, algorithm)[1] != checksum:
            return False
        now = os.stat(name, dir_fd=src_parent, follow_symlinks=False)
        if (now.st_dev, now.st_ino, now.st_size, now.st_mtime_ns) != (
                st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns):
            return False
        os.unlink(name, dir_fd=src_parent)
        return True
    finally:
        os.close(fd)


def rename_checked(src_dir: int, name: bytes, fd: int, dest_dir: int, final: bytes,
                    shown: str) -> None:
    """Rename `name` to `final` without replacing, then prove it moved the inode `fd` holds
    (the name may have been swapped since it was opened); otherwise move it back."""
    paths.rename_noreplace(src_dir, name, dest_dir, final)
    opened = os.fstat(fd)
    moved = os.stat(final, dir_fd=dest_dir, follow_symlinks=False)
    if (moved.st_dev, moved.st_ino) == (opened.st_dev, opened.st_ino) and \
            (stat.S_ISDIR(opened.st_mode) or opened.st_nlink == 1):
        return
    try:
        paths.rename_noreplace(dest_dir, final, src_dir, name)
    except OSError as exc:
        raise PublishFailure(
            FailureKind.SOURCE_CHANGED, f"{shown}: replaced while being published; "
            f"what was renamed is left at {paths.display(final)} "
            f"({os_text(exc)})") from None
    raise PublishFailure(
        FailureKind.SOURCE_CHANGED, f"{shown}: replaced, or linked elsewhere, while "
        "being published; it will be examined again")


def chmod_at(dir_fd: int, name: bytes, mode: int) -> None:
    """chmod a file of a renamed folder, unless it has a name outside the archive."""
    fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK,
                 dir_fd=dir_fd)
    try:
        if os.fstat(fd).st_nlink == 1:
            os.fchmod(fd, mode)
    finally:
        os.close(fd)


def chmod_tree(dir_fd: int, name: bytes, file_mode: int, dir_mode: int) -> None:
    top = os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC,
                  dir_fd=dir_fd)
    try:
        os.fchmod(top, dir_mode)
        for folder in treewalk.walk(top):
            for d in folder.dirs:
                _chmod_at_dir(folder.fd, d, dir_mode)
            for f in folder.files:
                chmod_at(folder.fd, f, file_mode)
    finally:
        os.close(top)


def _chmod_at_dir(dir_fd: int, name: bytes, mode: int) -> None:
    fd = os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC,
                 dir_fd=dir_fd)
    try:
        os.fchmod(fd, mode)
    finally:
        os.close(fd)


def hash_at(dir_fd: int, name: bytes, algorithm: str) -> tuple[int, str]:
    fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dir_fd)
    try:
        return fits.hash_fd(fd, algorithm=algorithm)
    finally:
        os.close(fd)


def files_equal(dir_fd: int, a: bytes, b: bytes, algorithm: str) -> bool:
    return hash_at(dir_fd, a, algorithm) == hash_at(dir_fd, b, algorithm)


def files_equal_across(dir_a: int, a: bytes, dir_b: int, b: bytes) -> bool:
    st_a = os.stat(a, dir_fd=dir_a, follow_symlinks=False)
    try:
        st_b = os.stat(b, dir_fd=dir_b, follow_symlinks=False)
    except FileNotFoundError:
        return False
    if (st_a.st_dev, st_a.st_ino) == (st_b.st_dev, st_b.st_ino):
        return True
    if st_a.st_size != st_b.st_size:
        return False
    return hash_at(dir_a, a, "sha256") == hash_at(dir_b, b, "sha256")


def os_text(exc: OSError) -> str:
    where = exc.filename
    where = paths.display(where) if isinstance(where, bytes | str) else None
    reason = exc.strerror or str(exc)
    return f"{where}: {reason}" if where else reason


# --- reconciliation ---------------------------------------------------------------------------


def is_prefix(short_fd: int, long_fd: int, length: int) -> bool:
    offset = 0
    while offset < length:
        n = min(CHUNK, length - offset)
        if os.pread(short_fd, n, offset) != os.pread(long_fd, n, offset):
            return False
        offset += n
    return True
