"""The single-writer lock: one publishing process at a time, for its lifetime.

An flock on a small file that records the holder's pid and role, so a refused
process can name who holds it, and a note from the holder when it cannot do its work
(the daemon's pause while the registry is unavailable), so `status` can say so even
when it cannot read the registry itself. The kernel drops the lock when the holder dies,
however it dies, so a stale lock file never blocks anyone.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import time
from dataclasses import dataclass


class LockHeld(Exception):
    """Another process holds the lock; the message names its pid and role."""

    def __init__(self, path: str, holder: str) -> None:
        self.path = path
        self.holder = holder
        super().__init__(f"lock {path} is held by {holder}")


NOTE_MAX_CHARS = 2000


@dataclass
class Lock:
    path: str
    fd: int
    role: str = ""

    def note(self, text: str | None) -> None:
        """Say what the holder is doing when it cannot do its work (one line after the
        holder's own, read by `status` through read_note()); None clears it. Rewritten in
        place within the file's first block, so it works on a full disk too; best effort."""
        line = f"{os.getpid()} {self.role}\n"
        if text:
            line += text.replace("\n", " ")[:NOTE_MAX_CHARS] + "\n"
        data = line.encode("utf-8", "replace")
        with contextlib.suppress(OSError):
            os.pwrite(self.fd, data, 0)
            os.ftruncate(self.fd, len(data))

    def release(self) -> None:
        if self.fd >= 0:
            with contextlib.suppress(OSError):
                os.ftruncate(self.fd, 0)
            os.close(self.fd)  # closing drops the flock
            self.fd = -1

    def __enter__(self) -> Lock:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def holder(path: str) -> str | None:
    """Who holds the lock ("pid 123 (daemon)"), or None when it is free."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
    except FileNotFoundError:
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return _describe(fd)
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)


def _describe(fd: int) -> str:
    text = os.pread(fd, 200, 0).decode("utf-8", "replace").split()
    if len(text) >= 2:
        return f"pid {text[0]} ({text[1]})"
    if text:
        return f"pid {text[0]}"
    return "another process"


def acquire(path: str, role: str, wait_seconds: float = 0.0) -> Lock:
    """Take the lock, waiting up to wait_seconds; LockHeld when it stays taken."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o644)
    deadline = time.monotonic() + wait_seconds
    delay = 0.02
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            break
        except OSError as exc:
            if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
                os.close(fd)
                raise
            if time.monotonic() >= deadline:
                who = _describe(fd)
                os.close(fd)
                raise LockHeld(path, who) from None
            time.sleep(min(delay, max(deadline - time.monotonic(), 0.001)))
            delay = min(delay * 2, 0.25)
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()} {role}\n".encode(), 0)
    return Lock(path, fd, role)


def read_note(path: str) -> str | None:
    """The note of the lock's holder (Lock.note), or None: no note, or nobody holds it (a
    note left by a holder that died means nothing)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
    except OSError:
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            lines = os.pread(fd, NOTE_MAX_CHARS * 4 + 100, 0).decode("utf-8", "replace")
            _, _, note = lines.partition("\n")
            return note.strip() or None
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)


def _boot_id() -> str:
    try:
        with open("/proc/sys/kernel/random/boot_id") as fh:
            return fh.read().strip()
    except OSError:
        return "unknown-boot"


def _start_ticks(pid: int) -> str | None:
    """The process's start time in clock ticks: tells a live pid from a reused one."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            stat = fh.read()
    except OSError:
        return None
    # Field 22, counted after the command name, which may itself hold spaces and ')'.
    return stat[stat.rindex(b")") + 2:].split()[19].decode()


def owner_id(pid: int | None = None) -> str:
    """Lease owner: host, pid, the pid's start time and the boot id."""
    pid = os.getpid() if pid is None else pid
    return f"{os.uname().nodename}:{pid}:{_start_ticks(pid)}:{_boot_id()}"


def owner_alive(owner: str | None) -> bool | None:
    """Whether the process behind a lease owner still runs; None when it is on another host."""
    if not owner:
        return False
    try:
        host, pid, ticks, boot = owner.rsplit(":", 3)
        pid_number = int(pid)
    except ValueError:
        return False  # not an owner this program wrote (a legacy row)
    if host != os.uname().nodename:
        return None
    if boot != _boot_id():
        return False
    return _start_ticks(pid_number) == ticks
