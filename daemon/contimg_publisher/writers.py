"""Is any process writing this file? "No writer, no publish."

A staged file is finished only when no process has it open for writing. Linux keeps that
count for every inode, and one call reads it: a read lease (F_SETLEASE with F_RDLCK on a
read-only descriptor) is refused with EAGAIN while any process on this host has the file open
for writing. `open_for_writing` takes such a lease and drops it at once: asking is the point,
holding is not.

Leases need the file's owner or CAP_LEASE, and the kernel counts CAP_LEASE only in the initial
user namespace (capable(), not ns_capable()). A unit with PrivateUsers=yes runs in a user
namespace of its own, so AmbientCapabilities=CAP_LEASE shows up in its CapEff and still does
nothing there: a lease on another user's file is refused with EACCES. Where leases are refused
(EACCES, EPERM) or not implemented (EINVAL: a filesystem without leases, fs.leases-enable=0,
anything but a regular file), the answer is UNKNOWN and the caller falls back to
`WriteTracker`, which follows inotify's close-write events. `lease_method_probe` says once, at
start-up, which of the two serves the staging root, and why.

SIGIO. While we hold the lease, a writer's open() waits for us and the kernel signals the
lease holder, by default with SIGIO, whose default action terminates the process (Python
leaves SIGIO at its default). So before the lease is taken, F_SETSIG points the descriptor's
notices at SIGURG, whose default action is to ignore it: a break in that instant is discarded
by the kernel. This is per descriptor: nothing process-wide changes, it works from any thread
(signal.signal works only in the main one) and nothing reaches child processes (an ignored
SIGIO would survive their exec). SIGURG is not a realtime signal on purpose: when a realtime
signal's queue is full, the kernel sends SIGIO instead. A writer arriving while we hold the
lease waits until we drop it, microseconds later (milliseconds if other threads of ours take
the GIL in between; if this process is stopped in between, until fs.lease-break-time, 45 s by
default); one that opens with O_NONBLOCK gets EWOULDBLOCK instead.

What a lease cannot see: writers on other hosts of a shared filesystem (NFS, CIFS; nor does
inotify), and on overlayfs a writer that opens the upper layer's file directly. The answer is
a snapshot: a writer may open the file a moment later, so callers still check that the file
did not change while they read it.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import re
import signal
import stat
import sys
import threading
from collections import deque
from enum import StrEnum
from typing import NamedTuple

from watchdog.events import (
    DirDeletedEvent,
    DirMovedEvent,
    FileClosedEvent,
    FileDeletedEvent,
    FileModifiedEvent,
    FileMovedEvent,
    FileSystemEvent,
)

CAP_LEASE = 28  # linux/capability.h
# Where a lease break is signalled instead of SIGIO: ignored unless a handler is installed.
BREAK_SIGNAL = signal.SIGURG
# Refusals that mean "leases are not available for this file", not "someone writes it".
UNAVAILABLE = frozenset({errno.EACCES, errno.EPERM, errno.EINVAL, errno.ENOLCK, errno.EOPNOTSUPP})
WRITER_PRESENT = frozenset({errno.EAGAIN, errno.EBUSY})
# Filesystems shared with other hosts: their writers hold nothing on this kernel (CIFS even
# refuses every read lease with EAGAIN when it holds no oplock, which would read as "writing").
SHARED_FILESYSTEMS = frozenset({
    "nfs", "nfs4", "cifs", "smb3", "smbfs", "ceph", "9p", "afs", "lustre", "gpfs", "beegfs",
    "glusterfs", "fuse.glusterfs", "fuse.sshfs", "ocfs2", "gfs2",
})
PROBE_ENTRIES = 2000  # how many directory entries the probe looks at, at most, for a sample file


class WriterCheck(StrEnum):
    """What the kernel said about one file."""

    NONE = "none"  # no process on this host has it open for writing
    WRITING = "writing"  # some process has it open for writing (or holds a write lease)
    UNKNOWN = "unknown"  # leases are unavailable for this file: ask `WriteTracker`


class Method(StrEnum):
    """How the daemon tells that a file's writer is done."""

    LEASE = "lease"  # open_for_writing answers
    CLOSE_WRITE = "close-write"  # WriteTracker, fed with inotify events, answers


class LeaseProbe(NamedTuple):
    """The method for a staging root, and the reason, in words for the log."""

    method: Method
    reason: str


def _errname(code: int) -> str:
    return errno.errorcode.get(code, str(code))


def _require_read_only(fd: int) -> None:
    flags = fcntl.fcntl(fd, fcntl.F_GETFL)
    if flags & getattr(os, "O_PATH", 0) or flags & os.O_ACCMODE != os.O_RDONLY:
        raise ValueError("open_for_writing needs a descriptor opened O_RDONLY: one open for "
                         "writing counts as a writer itself, an O_PATH one takes no lease")


def _release(fd: int) -> None:
    try:
        fcntl.fcntl(fd, fcntl.F_SETLEASE, fcntl.F_UNLCK)
    except OSError as exc:
        if exc.errno != errno.EAGAIN:  # EAGAIN: no lease left (broken after lease-break-time)
            raise


def _attempt(fd: int) -> tuple[WriterCheck, int]:
    """The check, and the errno of a refused lease (0 when the lease was granted)."""
    # Before the lease exists (see the module doc); F_UNLCK resets it to 0, so set it each time.
    fcntl.fcntl(fd, fcntl.F_SETSIG, BREAK_SIGNAL)
    try:
        fcntl.fcntl(fd, fcntl.F_SETLEASE, fcntl.F_RDLCK)
    except OSError as exc:
        if exc.errno in WRITER_PRESENT:
            return WriterCheck.WRITING, exc.errno
        if exc.errno in UNAVAILABLE:
            return WriterCheck.UNKNOWN, exc.errno
        raise
    try:
        # A writer that opened while we held the lease has started to break it: the lease
        # then reads as F_UNLCK, the type it is being broken to.
        held = fcntl.fcntl(fd, fcntl.F_GETLEASE)
    finally:
        _release(fd)
    return (WriterCheck.NONE if held == fcntl.F_RDLCK else WriterCheck.WRITING), 0


def open_for_writing(fd: int) -> WriterCheck:
    """Whether any process has the file behind `fd` open for writing.

    `fd` must be open O_RDONLY (a writable one would count itself). The lease is released
    before this returns, whatever happens, and the kernel resets the descriptor's F_SETSIG
    with it (a refused lease leaves F_SETSIG at BREAK_SIGNAL, which only matters to O_ASYNC
    users). Errors other than the refusals listed in WRITER_PRESENT and UNAVAILABLE (EBADF,
    say) are raised.
    """
    _require_read_only(fd)
    return _attempt(fd)[0]


def _open_read_only(path: str | bytes, dir_fd: int | None = None) -> int:
    """A read-only descriptor that neither blocks (on a FIFO, or on another process's write
    lease) nor follows a final symlink, nor moves the file's atime where we may avoid it."""
    flags = os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NOCTTY
    try:
        return os.open(path, flags | os.O_NOATIME, dir_fd=dir_fd)
    except PermissionError:  # O_NOATIME needs the owner or CAP_FOWNER
        return os.open(path, flags, dir_fd=dir_fd)


def check_path(path: str | bytes | os.PathLike[str] | os.PathLike[bytes], *,
               dir_fd: int | None = None) -> WriterCheck:
    """`open_for_writing` for a path (relative to `dir_fd` when given; a final symlink is not
    followed). A file another process holds a write lease on counts as WRITING: that process
    may write at any moment. Anything but a regular file is UNKNOWN."""
    try:
        fd = _open_read_only(os.fspath(path), dir_fd)
    except BlockingIOError:
        return WriterCheck.WRITING
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return WriterCheck.UNKNOWN
        return _attempt(fd)[0]
    finally:
        os.close(fd)


# --- start-up probe ----------------------------------------------------------------------------


def _read(path: str) -> str | None:
    try:
        with open(path) as f:
            return f.read()
    except OSError:
        return None


def cap_lease_status() -> tuple[bool, str]:
    """Whether CAP_LEASE counts for this process, and why (from /proc/self, which the unit's
    ProcSubset=pid leaves visible). It counts only when effective in the initial user
    namespace, whose uid_map maps every uid onto itself."""
    status = _read("/proc/self/status") or ""
    eff = next((line.split()[1] for line in status.splitlines()
                if line.startswith("CapEff:")), None)
    if eff is None:
        return False, "CAP_LEASE is unknown (/proc/self/status unreadable)"
    if not int(eff, 16) >> CAP_LEASE & 1:
        return False, "CAP_LEASE is not in this process's effective capabilities"
    uid_map = (_read("/proc/self/uid_map") or "").split()
    if uid_map != ["0", "0", "4294967295"]:
        return False, ("CAP_LEASE is effective but does not count: this process runs in a user "
                       "namespace (PrivateUsers=yes?) and the kernel honours CAP_LEASE only "
                       "in the initial one")
    return True, "CAP_LEASE is effective"


def _unescape(field: str) -> str:
    """A mountinfo field with its octal escapes (space, tab, newline, backslash) undone."""
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m[1], 8)), field)


def filesystem_type(path: str) -> str:
    """The type of the filesystem `path` is on, from /proc/self/mountinfo ('?' if unknown)."""
    real = os.path.realpath(path)
    best, fstype = "", "?"
    for line in (_read("/proc/self/mountinfo") or "").splitlines():
        fields = line.split()
        if "-" not in fields:
            continue
        point = _unescape(fields[4])
        sep = fields.index("-")
        inside = real == point or real.startswith(point.rstrip("/") + "/")
        if inside and len(point) >= len(best) and len(fields) > sep + 1:
            best, fstype = point, fields[sep + 1]
    return fstype


def _sample_file(root: str) -> tuple[str, int] | None:
    """A regular file under `root` to try a lease on, preferably one owned by another uid
    (that is what needs CAP_LEASE): (path, owner uid). Looks at PROBE_ENTRIES entries at most,
    breadth first, following no symlinks."""
    me = os.geteuid()
    own: tuple[str, int] | None = None
    folders, seen = deque([root]), 0
    while folders and seen < PROBE_ENTRIES:
        try:
            with os.scandir(folders.popleft()) as it:
                for entry in it:
                    seen += 1
                    if seen > PROBE_ENTRIES:
                        break
                    try:
                        if entry.is_dir(follow_symlinks=False):
                            folders.append(entry.path)
                        elif entry.is_file(follow_symlinks=False):
                            uid = entry.stat(follow_symlinks=False).st_uid
                            if uid != me:
                                return entry.path, uid
                            own = own or (entry.path, uid)
                    except OSError:
                        continue
        except OSError:
            continue
    return own


def _try_file(path: str) -> tuple[WriterCheck, int] | None:
    try:
        fd = _open_read_only(path)
    except BlockingIOError:  # another process holds a write lease: leases work here
        return WriterCheck.WRITING, 0
    except OSError:
        return None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return None
        return _attempt(fd)
    finally:
        os.close(fd)


def lease_method_probe(root: str | bytes | os.PathLike[str] | os.PathLike[bytes]) -> LeaseProbe:
    """Which method tells finished files under `root`, and why; for the start-up log.

    Creates and modifies nothing: it reads /proc/self, then tries a lease on one existing
    regular file under `root` (opened read-only, O_NOATIME where allowed), preferring one that
    another user owns. With no file there yet, it tries the folder itself: the kernel checks
    owner-or-CAP_LEASE first (EACCES) and only then refuses a directory (EINVAL), so a folder
    we do not own tells whether CAP_LEASE is honoured, though not whether its filesystem takes
    leases. LEASE means leases should answer for files of any owner under `root`; per file,
    open_for_writing may still say UNKNOWN (another filesystem mounted below, say).
    """
    top = os.fsdecode(os.fspath(root))
    me = os.geteuid()
    cap_ok, cap_text = cap_lease_status()
    fstype = filesystem_type(top)
    if (_read("/proc/sys/fs/leases-enable") or "").strip() == "0":
        return LeaseProbe(Method.CLOSE_WRITE, "leases are disabled (fs.leases-enable=0)")
    if fstype in SHARED_FILESYSTEMS:
        return LeaseProbe(Method.CLOSE_WRITE,
                          f"{top} is on {fstype}, shared with other hosts, whose writers hold "
                          f"nothing a lease on this host can see")
    sample = _sample_file(top)
    tried = _try_file(sample[0]) if sample else None
    if sample is not None and tried is not None:
        path, uid = sample
        err = tried[1]
        if err in (errno.EACCES, errno.EPERM):
            return LeaseProbe(Method.CLOSE_WRITE, f"a read lease on {path} (owner uid {uid}) "
                                                  f"was refused ({_errname(err)}): {cap_text}")
        if err in UNAVAILABLE:
            return LeaseProbe(Method.CLOSE_WRITE,
                              f"a read lease on {path} was refused ({_errname(err)}): the "
                              f"filesystem ({fstype}) does not take leases")
        if uid != me or cap_ok:
            return LeaseProbe(Method.LEASE, f"a read lease on {path} (owner uid {uid}) was "
                                            f"answered on {fstype}; {cap_text}")
        return LeaseProbe(Method.CLOSE_WRITE,
                          f"leases work only on files this process owns (uid {me}): {cap_text}")
    if not cap_ok:
        return LeaseProbe(Method.CLOSE_WRITE, f"no file under {top} to try a lease on, and "
                                              f"{cap_text}")
    try:
        dir_fd = os.open(top, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError as exc:
        return LeaseProbe(Method.CLOSE_WRITE, f"{top} cannot be opened: {exc.strerror}")
    try:
        owner = os.fstat(dir_fd).st_uid
        err = _attempt(dir_fd)[1]
    finally:
        os.close(dir_fd)
    if owner != me and err in (errno.EACCES, errno.EPERM):
        return LeaseProbe(Method.CLOSE_WRITE, f"a lease attempt on {top} (owner uid {owner}) "
                                              f"was refused ({_errname(err)}) although {cap_text}")
    return LeaseProbe(Method.LEASE, f"{cap_text}; no file under {top} yet to confirm that "
                                    f"its filesystem ({fstype}) takes leases")


# --- fallback: close-write events ------------------------------------------------------------


def _key(path: str | bytes) -> str:
    return os.fsdecode(path)


class WriteTracker:
    """Without leases: which paths were written since their last close-write (inotify).

    `modified(path)` marks a path as being written, `closed_after_write(path)` clears it,
    `still_being_written(path)` reads it. Feed it with watchdog events through `on_event`,
    which maps them as follows:

    - FileModifiedEvent (IN_MODIFY: a write, or a truncation) -> modified()
    - FileClosedEvent (IN_CLOSE_WRITE: a descriptor open for writing was closed)
      -> closed_after_write()
    - FileMovedEvent, DirMovedEvent -> moved() (a rename keeps the open descriptors; a side
      outside the watch is "")
    - FileDeletedEvent, DirDeletedEvent -> forget()
    - FileCreatedEvent, FileAttribEvent, FileOpenedEvent, FileClosedNoWriteEvent: ignored.
      IN_OPEN does not say whether the file was opened for writing; IN_CLOSE_NOWRITE says
      nothing about writers; IN_ATTRIB (chmod, chown, touch) is no write, and neither is
      IN_CREATE (a hard link or mknod never closes; a new file's first write is IN_MODIFY).

    watch.py's changes map the same way: "modified" (FileModifiedEvent only; attribute
    changes are "attrib"), "closed", "moved_out" (with its `dest`), "deleted". After lost
    events (inotify queue overflow: RESCAN), call `clear()`: a close-write may be among them,
    and a stale mark would never clear.

    What it cannot see (the lease sees it): a writer that opened the file before the watch
    began and has not written since; a writer that opened but has not written yet; writes in
    a folder made a moment before, until watchdog has added its watch; with two writers, the
    first one's close clears the mark until the second one writes again. Paths
    are compared as given (os.fsdecode form), so feed and ask with one spelling, e.g. the
    absolute paths watch.py produces. Safe to feed from one thread and ask from another.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._written: set[str] = set()

    def modified(self, path: str | bytes) -> None:
        """The file at `path` was written (or truncated)."""
        with self._lock:
            self._written.add(_key(path))

    def closed_after_write(self, path: str | bytes) -> None:
        """A descriptor that had the file at `path` open for writing was closed."""
        with self._lock:
            self._written.discard(_key(path))

    def moved(self, src: str | bytes, dest: str | bytes) -> None:
        """`src` (a file, or a folder with everything below it) is now `dest`; either may be
        "" (moved in from, or out to, a place not watched)."""
        old, new = _key(src), _key(dest)
        if not old:
            return
        prefix = old.rstrip(os.sep) + os.sep
        with self._lock:
            hit = {p for p in self._written if p == old or p.startswith(prefix)}
            self._written -= hit
            if new:
                self._written |= {new + p[len(old):] for p in hit}

    def forget(self, path: str | bytes) -> None:
        """`path` (a file, or a folder with everything below it) is gone."""
        self.moved(path, "")

    def clear(self) -> None:
        """Forget everything: events were lost."""
        with self._lock:
            self._written.clear()

    def still_being_written(self, path: str | bytes) -> bool:
        """True when `path` was written since its last close-write (see the class doc for
        what this cannot see)."""
        with self._lock:
            return _key(path) in self._written

    def __len__(self) -> int:
        with self._lock:
            return len(self._written)

    def on_event(self, event: FileSystemEvent) -> None:
        """Apply one watchdog event, mapped as the class doc says."""
        if isinstance(event, FileModifiedEvent):
            self.modified(event.src_path)
        elif isinstance(event, FileClosedEvent):
            self.closed_after_write(event.src_path)
        elif isinstance(event, FileMovedEvent | DirMovedEvent):
            self.moved(event.src_path, event.dest_path)
        elif isinstance(event, FileDeletedEvent | DirDeletedEvent):
            self.forget(event.src_path)


class WriterGate:
    """The writer check of one process: the kernel's answer (a lease) where it gives one,
    else the close-write tracker where the daemon watches, else nothing (the settle time
    alone, as for `scan` on a filesystem without leases)."""

    def __init__(self, leases: bool = True, tracker: WriteTracker | None = None) -> None:
        self.leases = leases
        self.tracker = tracker

    def busy(self, fd: int, path: str | bytes) -> bool:
        """Whether the file open read-only at `fd` (found at `path`) has a writer."""
        if self.leases:
            check = open_for_writing(fd)
            if check is not WriterCheck.UNKNOWN:
                return check is WriterCheck.WRITING
        return self.tracker is not None and self.tracker.still_being_written(path)


# --- command line ------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    """`python -m contimg_publisher.writers PATH...`: for a folder, the method the daemon would
    use there; for anything else, whether it is open for writing. One JSON object a line."""
    args = sys.argv[1:] if argv is None else argv
    if not args:
        print("usage: python -m contimg_publisher.writers PATH...", file=sys.stderr)
        return 2
    for path in args:
        out: dict[str, object] = {"path": path, "uid": os.geteuid()}
        try:
            if os.path.isdir(path):
                probe = lease_method_probe(path)
                out.update(method=str(probe.method), reason=probe.reason)
            else:
                out["check"] = str(check_path(path))
        except OSError as exc:
            out["error"] = f"{exc.strerror or exc} ({_errname(exc.errno or 0)})"
        print(json.dumps(out), flush=True)
    return 0


if __name__ == "__main__":
    with contextlib.suppress(BrokenPipeError):
        sys.exit(main())
