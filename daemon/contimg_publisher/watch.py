"""Filesystem events under the staging root, turned into candidate paths for the main loop.

The watcher owns no product state: its threads put `Change` objects on a queue and wake the
loop. Inotify loses events in three ways, and each puts `RESCAN` on the queue so the loop
rescans at once instead of waiting for its next periodic rescan:

- the kernel queue overflows: watchdog repairs its watches and delivers `EventsLostEvent`;
- a subfolder cannot be watched (max_user_watches, EACCES): watchdog skips it with a line in
  its own log, so the watcher compares the folders it walks with the inodes the kernel says
  this process watches (/proc/self/fdinfo, see proc(5)) and reports the difference;
- a watch thread dies: `healthy()` checks the threads that starting the observer created.

Only watchdog's public API is used (observer, handler, events), so a patch release of
watchdog cannot change what this module relies on without changing its documentation.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import errno
import os
import queue
import stat
import threading
import time
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from watchdog.events import (
    DirAttribEvent,
    DirCreatedEvent,
    DirDeletedEvent,
    DirMovedEvent,
    EventsLostEvent,
    FileAttribEvent,
    FileClosedEvent,
    FileCreatedEvent,
    FileDeletedEvent,
    FileModifiedEvent,
    FileMovedEvent,
    FileSystemEvent,
    FileSystemEventHandler,
    FileSystemMovedEvent,
)
from watchdog.observers.inotify import InotifyObserver

from contimg_publisher import paths

RESCAN = "rescan"
STOP_SECONDS = 2.0
CHECK_FOLDERS_MAX = 100_000  # folders compared with the watch list in one check, at most
PROBES_MAX = 8  # unwatched folders whose reason is asked of the kernel in one check
WARN_EVERY_SECONDS = 60.0  # a flood overflows the kernel queue again and again: warn once a minute

# Only these reach the queue. Leaving out opens and read-only closes keeps the detector's own
# reads of staged files from coming back as events (and from filling the kernel queue).
# DirModifiedEvent is what watchdog adds for the parent folder of every child change; the
# child's own event already names the path, so it is left out too.
# EventsLostEvent reaches a watch with an event filter only when the filter lists it.
EVENT_TYPES: list[type[FileSystemEvent]] = [
    FileCreatedEvent, DirCreatedEvent, FileModifiedEvent, FileAttribEvent, DirAttribEvent,
    FileClosedEvent, FileDeletedEvent, DirDeletedEvent, FileMovedEvent, DirMovedEvent,
    EventsLostEvent,
]
# A folder can be watched twice (added by the walk of its new parent, then by its own
# IN_CREATE); watchdog keeps one callback and warns. Expected here, so kept out of the journal.
warnings.filterwarnings("ignore", message=r"Callback with id '\d+' already exists",
                        category=RuntimeWarning, module=r"contimg_publisher\.watch")

class ChangeKind(StrEnum):
    """What happened to a watched path (Change.kind)."""

    CREATED = "created"
    MODIFIED = "modified"    # written: IN_MODIFY
    ATTRIB = "attrib"        # chmod, chown, touch: no write
    CLOSED = "closed"        # a descriptor open for writing was closed: IN_CLOSE_WRITE
    MOVED_IN = "moved_in"
    DELETED = "deleted"
    MOVED_OUT = "moved_out"  # Change.dest says where it went ("" outside the watch)


_KIND_OF: dict[type[FileSystemEvent], ChangeKind] = {
    FileCreatedEvent: ChangeKind.CREATED, DirCreatedEvent: ChangeKind.CREATED,
    FileModifiedEvent: ChangeKind.MODIFIED,
    FileAttribEvent: ChangeKind.ATTRIB, DirAttribEvent: ChangeKind.ATTRIB,
    FileClosedEvent: ChangeKind.CLOSED,
    FileDeletedEvent: ChangeKind.DELETED, DirDeletedEvent: ChangeKind.DELETED,
}


@dataclass(frozen=True)
class Change:
    """Something happened to `path` (absolute, os.fsdecode form). A moved_out names in
    `dest` where it went ("" outside the watch): a rename keeps the writers' descriptors,
    and the close-write tracker follows it."""

    path: str
    kind: ChangeKind
    dest: str = ""


def _sysctl(name: str) -> str:
    try:
        with open(f"/proc/sys/{name.replace('.', '/')}") as f:
            return f.read().strip()
    except OSError:
        return "?"


def _watch_limit() -> str:
    text = f"fs.inotify.max_user_watches={_sysctl('fs.inotify.max_user_watches')}"
    ns_limit = _sysctl("user.max_inotify_watches")  # lower inside a container's user namespace
    if ns_limit not in ("?", _sysctl("fs.inotify.max_user_watches")):
        text += f", user.max_inotify_watches={ns_limit}"
    return text


def reason_for(exc: OSError) -> str:
    """Why a watch could not be added, in words an operator can act on."""
    if exc.errno == errno.ENOSPC:
        return f"inotify watch limit reached ({_watch_limit()}); relying on periodic rescans"
    if exc.errno == errno.EMFILE:
        return ("inotify instance limit reached (fs.inotify.max_user_instances="
                f"{_sysctl('fs.inotify.max_user_instances')}); relying on periodic rescans")
    if exc.errno in (errno.ENOENT, errno.ENOTDIR):
        return "the folder went away before it could be watched"
    return f"{exc.strerror or exc} (errno {exc.errno})"


# How long a path the daemon published from stays expected: the event of its rename reaches the
# queue after the publish's result, as late as watchdog's pairing of moves (half a second).
OWN_MOVE_SECONDS = 30.0


class OwnMoves:
    """Paths the daemon itself is moving out of the staging area (the products it publishes).

    The event of such a rename tells the loop nothing it does not know, and in a burst there
    is one per product: the watch drops it (`take`) instead of queueing it and waking the
    loop. The loop `expect`s a batch's paths before the publish thread starts on them and
    `settle`s each when its result comes back: a path published from stays expected a while,
    for its event; any other outcome gives back the event if one was dropped (`release`).
    Shared by the loop and the watch's dispatch thread; every step is one dict operation."""

    def __init__(self, seconds: float = OWN_MOVE_SECONDS) -> None:
        self.seconds = seconds
        # path -> (monotonic time it stops being expected, whether its publish is done)
        self._until: dict[str, tuple[float, bool]] = {}
        # path -> kind of the event dropped, publish not done
        self._dropped: dict[str, ChangeKind] = {}

    def expect(self, paths_: list[str]) -> None:
        now = time.monotonic()
        for path, (until, _done) in list(self._until.items()):
            if until < now:
                self._until.pop(path, None)
        entry = (now + self.seconds, False)
        for path in paths_:
            self._until[path] = entry
            self._dropped.pop(path, None)

    def take(self, change: Change) -> bool:
        """Whether `change` is the event of one of our own moves (then it is dropped)."""
        if change.kind not in (ChangeKind.MOVED_OUT, ChangeKind.DELETED) or change.dest:
            return False
        entry = self._until.pop(change.path, None)
        if entry is None or entry[0] < time.monotonic():
            return False
        if not entry[1]:
            self._dropped[change.path] = change.kind
        return True

    def published(self, path: str) -> None:
        """The product at `path` left staging through our publish: its event, if still to
        come, is dropped for a while yet."""
        if self._dropped.pop(path, None) is None and path in self._until:
            self._until[path] = (time.monotonic() + self.seconds, True)

    def release(self, path: str) -> Change | None:
        """The publish from `path` did not happen: it is no longer expected, and the event
        dropped for it (the file left by another hand), if any, is returned."""
        self._until.pop(path, None)
        kind = self._dropped.pop(path, None)
        return None if kind is None else Change(path, kind)

    def __len__(self) -> int:
        return len(self._until)


class _NullLog:
    def __getattr__(self, _name: str) -> Callable[..., None]:
        return lambda *_args, **_kwargs: None


def _default_log() -> Any:
    try:
        from contimg_publisher import logs
        return logs.get_logger()
    except (ImportError, AttributeError):
        return _NullLog()


def inotify_fds() -> set[int]:
    """This process's inotify instances: descriptors whose link names an inotify inode."""
    found = set()
    with contextlib.suppress(OSError):
        for name in os.listdir("/proc/self/fd"):
            with contextlib.suppress(OSError, ValueError):
                if os.readlink(f"/proc/self/fd/{name}") == "anon_inode:inotify":
                    found.add(int(name))
    return found


def watched_inodes(fds: Iterable[int]) -> set[int] | None:
    """Inode numbers watched through the inotify instances `fds`, as the kernel lists them in
    /proc/self/fdinfo (proc(5): one "inotify wd:.. ino:<hex> sdev:<hex> ..." line a watch).
    Only inode numbers are compared: a stat's st_dev and the kernel's sdev differ on some
    filesystems (btrfs subvolumes). None when no instance could be read."""
    found: set[int] = set()
    read = False
    for fd in fds:
        try:
            with open(f"/proc/self/fdinfo/{fd}", encoding="ascii", errors="replace") as f:
                text = f.read()
        except OSError:
            continue
        read = True
        for line in text.splitlines():
            if not line.startswith("inotify wd:"):
                continue
            for part in line.split():
                if part.startswith("ino:"):
                    with contextlib.suppress(ValueError):
                        found.add(int(part[4:], 16))
    return found if read else None


def folders_below(top: str, limit: int = CHECK_FOLDERS_MAX) -> list[tuple[str, int]]:
    """(path, inode) of `top` and every folder below it, symlinks not followed; an iterative
    walk of at most `limit` folders. Folders that cannot be listed are still returned (their
    own watch is what is checked); what vanishes meanwhile is left out."""
    found: list[tuple[str, int]] = []
    try:
        st = os.lstat(top)
    except OSError:
        return found
    if not stat.S_ISDIR(st.st_mode):
        return found
    found.append((top, st.st_ino))
    pending = [top]
    while pending and len(found) < limit:
        folder = pending.pop()
        try:
            with os.scandir(folder) as entries:
                for entry in entries:
                    with contextlib.suppress(OSError):
                        if entry.is_dir(follow_symlinks=False):
                            found.append((entry.path, entry.inode()))
                            pending.append(entry.path)
                    if len(found) >= limit:
                        break
        except OSError:
            continue
    return found


_IN_CREATE = 0x100
_libc: Any = None


def watch_error(folder: str) -> OSError | None:
    """Why inotify would refuse to watch `folder` now: a watch tried on an instance of its
    own, then dropped with it. None when the kernel accepts it."""
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
    fd = _libc.inotify_init1(os.O_CLOEXEC)
    if fd < 0:
        code = ctypes.get_errno()
        return OSError(code, os.strerror(code))
    try:
        if _libc.inotify_add_watch(fd, os.fsencode(folder), _IN_CREATE) < 0:
            code = ctypes.get_errno()
            return OSError(code, os.strerror(code))
        return None
    finally:
        os.close(fd)


class _Sink:
    """Where the watch threads hand what they found: the queue, the wake-up, the log."""

    def __init__(self, root: str, out: queue.SimpleQueue[Change | str],
                 wake: Callable[[], None] | None, log: Any, own: OwnMoves | None = None
                 ) -> None:
        self.root = root
        self.own = own
        self.watched = os.path.realpath(root)  # a symlinked root is watched where it points
        self.out = out
        self.wake = wake
        self.log = log
        self.queued_limit = _sysctl("fs.inotify.max_queued_events")  # fixed at inotify_init
        self.closed = False  # set by Watcher.stop(): nothing reaches the queue afterwards
        self.broken: str | None = None  # why the watch stopped working, once it has
        self.warned: dict[str, tuple[float, int]] = {}  # key -> (last warning, warnings held)
        self.fds: set[int] = set()  # the observer's inotify instances, known once started

    def put(self, item: Change | str) -> None:
        if self.closed:
            return
        self.out.put(item)
        if self.wake is not None:
            with contextlib.suppress(Exception):
                self.wake()

    def rebase(self, path: bytes | str) -> str | None:
        """The path under the configured root, or None when it is not below it."""
        path = os.fsdecode(path)
        if path == self.watched:
            return self.root
        prefix = self.watched.rstrip(os.sep) + os.sep
        if path.startswith(prefix):
            return os.path.join(self.root, path[len(prefix):])
        return None

    def changes_for(self, event: FileSystemEvent) -> list[Change]:
        found: list[tuple[bytes | str, ChangeKind | None]]
        if isinstance(event, FileSystemMovedEvent):
            found = [(event.src_path, ChangeKind.MOVED_OUT),
                     (event.dest_path, ChangeKind.MOVED_IN)]
        else:
            found = [(event.src_path, _KIND_OF.get(type(event)))]
        if event.is_synthetic:
            # watchdog's walk of a folder created or moved in: the loop walks that folder
            # itself on the folder's own event, so only the old paths of a move are news.
            found = found[:1] if isinstance(event, FileSystemMovedEvent) else []
        changes = []
        for raw, kind in found:
            path = self.rebase(raw) if raw and kind else None
            if path is not None and kind is not None:
                changes.append(Change(path, kind))
        if isinstance(event, FileSystemMovedEvent) and changes and \
                changes[0].kind == ChangeKind.MOVED_OUT:
            dest = self.rebase(event.dest_path) if event.dest_path else None
            changes[0] = Change(changes[0].path, ChangeKind.MOVED_OUT, dest or "")
        return changes

    def event(self, event: FileSystemEvent) -> None:
        """One event from the observer's dispatch thread."""
        try:
            changes = self.changes_for(event)
        except Exception as exc:  # never let one odd event stop the dispatch thread
            self.lost(f"an event could not be read: {type(exc).__name__}: {exc}")
            return
        own = self.own
        for change in changes:
            if own is None or not own.take(change):
                self.put(change)
        if not event.is_directory or event.is_synthetic:
            return
        if isinstance(event, DirDeletedEvent) and os.fsdecode(event.src_path) == self.watched:
            # watchdog stops the emitter once the root itself is gone
            self.broken = "the watched folder went away"
            self.lost(self.broken)
        elif isinstance(event, DirCreatedEvent | DirMovedEvent):
            # watchdog added the new folder's watches before it queued this event
            new = event.dest_path if isinstance(event, DirMovedEvent) else event.src_path
            if new and self.rebase(new) is not None:
                self.check_watched(os.fsdecode(new))

    def check_watched(self, top: str) -> int:
        """Compare `top` and the folders below it with the watch list; report the folders
        that are not watched (RESCAN). Returns how many were not."""
        watched = watched_inodes(self.fds)
        if watched is None:
            return 0
        unwatched = [folder for folder, inode in folders_below(top) if inode not in watched]
        missing: list[tuple[str, OSError | None]] = []
        for folder in unwatched:
            # the first few say why; the others are counted with them
            error = watch_error(folder) if len(missing) < PROBES_MAX else None
            if error is None or error.errno not in (errno.ENOENT, errno.ENOTDIR):
                missing.append((folder, error))  # a folder gone meanwhile is no failure
        if missing:
            self.watch_failed(missing)
        return len(missing)

    def lost(self, reason: str, key: str = "", **fields: Any) -> None:
        """Events may have been lost: say why (at most once a minute per `key`, when given),
        and ask the loop for a rescan."""
        if self.closed:
            return
        now = time.monotonic()
        last, held = self.warned.get(key, (-WARN_EVERY_SECONDS, 0))
        if not key or now - last >= WARN_EVERY_SECONDS:
            if held:
                fields["suppressed"] = held  # warnings of this kind not logged since the last
            self.log.warning("watch_degraded", root=self.root, reason=reason, **fields)
            self.warned[key] = (now, 0)
        else:
            self.warned[key] = (last, held + 1)
        self.put(RESCAN)

    def overflowed(self) -> None:
        self.lost("inotify event queue overflowed (fs.inotify.max_queued_events="
                  f"{self.queued_limit}); events were lost, rescanning", key="overflow")

    def watch_failed(self, failures: list[tuple[str, OSError | None]]) -> None:
        folder, exc = failures[0]
        reason = (reason_for(exc) if exc is not None else
                  "not watched, though inotify would accept it now; relying on periodic rescans")
        code = exc.errno if exc is not None else 0
        self.lost(f"a subfolder cannot be watched: {reason}", key=f"watch:{code}",
                  folder=paths.display(self.rebase(folder) or folder), folders=len(failures))


class _Handler(FileSystemEventHandler):
    def __init__(self, sink: _Sink) -> None:
        self.sink = sink

    def on_any_event(self, event: FileSystemEvent) -> None:
        if not isinstance(event, EventsLostEvent):
            self.sink.event(event)

    def on_events_lost(self, event: EventsLostEvent) -> None:
        # watchdog has rebuilt its watches before it queues this: the rescan will see them
        self.sink.overflowed()


def _stop_observer(observer: InotifyObserver) -> None:
    with contextlib.suppress(Exception):
        observer.stop()  # also stops the emitter and the reader, and closes the inotify fd


class Watcher:
    """Recursive inotify watch of `root`, feeding Change objects and RESCAN into `out`."""

    def __init__(self, root: str, out: queue.SimpleQueue[Change | str],
                 wake: Callable[[], None] | None = None, log: Any | None = None,
                 own: OwnMoves | None = None) -> None:
        self.root = os.path.abspath(os.fsdecode(root))
        self.own = own
        self.out = out
        self.wake = wake
        self.log = log if log is not None else _default_log()
        self._sink: _Sink | None = None
        self._observer: InotifyObserver | None = None
        self._threads: list[threading.Thread] = []  # what starting the observer started

    def start(self) -> bool:
        """Start watching. False (and a `watch_unavailable` log) when no watch could be set
        up; the daemon then relies on its periodic rescans."""
        if self._observer is not None:
            raise RuntimeError(f"the watch on {self.root} is already running")
        if not os.path.isdir(self.root):
            return self._unavailable(f"{self.root} is not a folder or does not exist")
        sink = self._sink = _Sink(self.root, self.out, self.wake, self.log, self.own)
        threads_before = set(threading.enumerate())
        fds_before = inotify_fds()
        observer = InotifyObserver(generate_full_events=True)
        try:
            # schedule() creates the inotify instance; start() adds every watch before it
            # returns, and raises when the root, or the tree at the watch limit, cannot be.
            observer.schedule(_Handler(sink), sink.watched, recursive=True,
                              event_filter=EVENT_TYPES)
            observer.start()
        except Exception as exc:
            sink.closed = True
            _stop_observer(observer)
            return self._unavailable(reason_for(exc) if isinstance(exc, OSError)
                                     else f"{type(exc).__name__}: {exc}")
        self._threads = [t for t in threading.enumerate() if t not in threads_before]
        sink.fds = (inotify_fds() - fds_before) or inotify_fds()
        self._observer = observer
        sink.check_watched(sink.watched)  # folders skipped while the tree was added
        return True

    def _unavailable(self, reason: str) -> bool:
        self.log.warning("watch_unavailable", root=self.root, reason=reason)
        return False

    def stop(self) -> None:
        """Stop the threads, waiting at most STOP_SECONDS; late threads are daemons and
        put nothing more on the queue."""
        observer, self._observer = self._observer, None
        if self._sink is not None:
            self._sink.closed = True
        if observer is None:
            return
        deadline = time.monotonic() + STOP_SECONDS
        stopper = threading.Thread(target=_stop_observer, args=(observer,),
                                   name="watch-stop", daemon=True)
        stopper.start()
        stopper.join(STOP_SECONDS)
        with contextlib.suppress(RuntimeError):
            observer.join(max(0.0, deadline - time.monotonic()))
        if stopper.is_alive() or observer.is_alive():
            self.log.warning("watch_stop_slow", root=self.root, seconds=STOP_SECONDS)

    def healthy(self) -> bool:
        """True while every watch thread runs and the root is watched. Subfolders that could
        not be watched do not count: they were reported (RESCAN), and a restart would not
        add them while the limit holds."""
        observer, sink = self._observer, self._sink
        if observer is None or sink is None or sink.closed or sink.broken is not None:
            return False
        dead = [t.name for t in self._threads if not t.is_alive()]
        if not dead:
            return True
        if not os.path.isdir(sink.watched):
            sink.broken = f"the watched folder went away (thread {dead[0]} stopped)"
        else:
            sink.broken = f"a watch thread is no longer running ({', '.join(dead)})"
        sink.lost(sink.broken)
        return False
