"""Filesystem events under the staging root, turned into candidate paths for the main loop.

The watcher owns no product state: its threads put `Change` objects on a queue and wake the
loop. Inotify loses events in ways watchdog hides (a kernel queue overflow is only written to
watchdog's own log; a subfolder whose watch cannot be added, e.g. at max_user_watches, is
skipped silently; a thread that dies just stops the events). Each of those puts `RESCAN` on
the queue so the loop rescans at once instead of waiting for its next periodic rescan.

The observer is watchdog's InotifyObserver, assembled with thin subclasses that report those
cases; it relies on watchdog >= 7.1, which delivers IN_Q_OVERFLOW to the watch groups.
"""

from __future__ import annotations

import contextlib
import errno
import os
import queue
import threading
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from watchdog.events import (
    DirAttribEvent,
    DirCreatedEvent,
    DirDeletedEvent,
    DirMovedEvent,
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
from watchdog.observers.api import BaseObserver, EventQueue, ObservedWatch
from watchdog.observers.inotify import InotifyFullEmitter, InotifyObserver, InotifyWatchGroup
from watchdog.observers.inotify_c import InotifyEvent, InotifyFD
from watchdog.version import VERSION_STRING as WATCHDOG_VERSION

from contimg_publisher import paths

if not hasattr(InotifyWatchGroup, "on_queue_overflow"):  # overflows would go unreported
    raise ImportError(f"contimg_publisher.watch needs watchdog >= 7.1 (it reports inotify "
                      f"queue overflows to watch groups); watchdog {WATCHDOG_VERSION} is installed")

RESCAN = "rescan"
STOP_SECONDS = 2.0
DROPPED_FROM_KEPT = 4096  # first halves of own renames remembered, in case a second half comes
WARN_EVERY_SECONDS = 60.0  # a flood overflows the kernel queue again and again: warn once a minute

# Only these reach the queue. Leaving out opens and read-only closes keeps the detector's own
# reads of staged files from coming back as events (and from filling the kernel queue).
# DirModifiedEvent is what watchdog adds for the parent folder of every child change; the
# child's own event already names the path, so it is left out too.
EVENT_TYPES: list[type[FileSystemEvent]] = [
    FileCreatedEvent, DirCreatedEvent, FileModifiedEvent, FileAttribEvent, DirAttribEvent,
    FileClosedEvent, FileDeletedEvent, DirDeletedEvent, FileMovedEvent, DirMovedEvent,
]
# A folder can be watched twice (added by the walk of its new parent, then by its own
# IN_CREATE); watchdog keeps one callback and warns. Expected here, so kept out of the journal.
warnings.filterwarnings("ignore", message=r"Callback with id '\d+' already exists",
                        category=RuntimeWarning, module=r"contimg_publisher\.watch")

_KIND_OF: dict[type[FileSystemEvent], str] = {
    FileCreatedEvent: "created", DirCreatedEvent: "created",
    FileModifiedEvent: "modified", FileAttribEvent: "attrib", DirAttribEvent: "attrib",
    FileClosedEvent: "closed",
    FileDeletedEvent: "deleted", DirDeletedEvent: "deleted",
}


@dataclass(frozen=True)
class Change:
    """Something happened to `path` (absolute, os.fsdecode form); `kind` is created,
    modified (written: IN_MODIFY), attrib (chmod, chown, touch: no write), closed (a
    descriptor open for writing was closed: IN_CLOSE_WRITE), moved_in, deleted or moved_out.
    A moved_out names in `dest` where it went ("" outside the watch): a rename keeps the
    writers' descriptors, and the close-write tracker follows it."""

    path: str
    kind: str
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
        self._dropped: dict[str, str] = {}  # path -> kind of the event dropped, publish not done

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
        if change.kind not in ("moved_out", "deleted") or change.dest:
            return False
        return self._take(change.path, change.kind) is not None

    def take_moved_from(self, path: str) -> tuple[float, bool] | None:
        """take() for the first half of a rename, before its other half is known: the entry
        taken, to give back (`untake`) should the rename end inside the watch."""
        return self._take(path, "moved_out")

    def untake(self, path: str, entry: tuple[float, bool]) -> None:
        self._until[path] = entry
        self._dropped.pop(path, None)

    def _take(self, path: str, kind: str) -> tuple[float, bool] | None:
        entry = self._until.pop(path, None)
        if entry is None or entry[0] < time.monotonic():
            return None
        if not entry[1]:
            self._dropped[path] = kind
        return entry

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
        if isinstance(event, FileSystemMovedEvent):
            found = [(event.src_path, "moved_out"), (event.dest_path, "moved_in")]
        else:
            found = [(event.src_path, _KIND_OF.get(type(event), ""))]
        if event.is_synthetic:
            # watchdog's walk of a folder created or moved in: the loop walks that folder
            # itself on the folder's own event, so only the old paths of a move are news.
            found = found[:1] if isinstance(event, FileSystemMovedEvent) else []
        changes = []
        for raw, kind in found:
            path = self.rebase(raw) if raw and kind else None
            if path is not None:
                changes.append(Change(path, kind))
        if isinstance(event, FileSystemMovedEvent) and changes and \
                changes[0].kind == "moved_out":
            dest = self.rebase(event.dest_path) if event.dest_path else None
            changes[0] = Change(changes[0].path, "moved_out", dest or "")
        return changes

    def event(self, event: FileSystemEvent) -> None:
        try:
            changes = self.changes_for(event)
        except Exception as exc:  # never let one odd event stop the dispatch thread
            self.lost(f"an event could not be read: {type(exc).__name__}: {exc}")
            return
        own = self.own
        for change in changes:
            if own is None or not own.take(change):
                self.put(change)

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

    def watch_failed(self, failures: list[tuple[bytes, OSError]]) -> None:
        folder, exc = failures[0]
        self.lost(f"a subfolder cannot be watched: {reason_for(exc)}", key=f"watch:{exc.errno}",
                  folder=paths.display(folder), folders=len(failures))

    def thread_ended(self, name: str, exc: BaseException | None) -> None:
        if self.closed:
            return
        if exc is not None:
            reason = f"the {name} thread failed: {type(exc).__name__}: {exc}"
        elif not os.path.isdir(self.watched):
            reason = f"the watched folder went away (the {name} thread stopped)"
        else:
            reason = f"the {name} thread stopped"
        if self.broken is None:
            self.broken = reason
        self.lost(reason)


@dataclass
class _WatchGroup(InotifyWatchGroup):
    """watchdog's recursive watch group, reporting what it would otherwise swallow."""

    sink: _Sink | None = None
    _failures: list[tuple[bytes, OSError]] | None = field(default=None, init=False)
    # cookie -> (path, OwnMoves entry, event): first halves of renames dropped by on_event
    _dropped_from: dict[int, tuple[str, tuple[float, bool], InotifyEvent]] = field(
        default_factory=dict, init=False)

    def on_event(self, event: InotifyEvent) -> None:
        """The first half of one of the daemon's own renames out of staging is dropped here,
        before watchdog holds it half a second for its other half and builds an event of it
        in two more threads: a burst has one per product. Should the other half come after
        all (a rename within staging, by another hand), both go on as before. Called by the
        inotify reader thread only."""
        sink = self.sink
        own = sink.own if sink is not None else None
        if event.is_moved_to and self._dropped_from:
            dropped = self._dropped_from.pop(event.cookie, None)
            if dropped is not None and own is not None:
                moved, entry, first_half = dropped
                own.untake(moved, entry)
                super().on_event(first_half)
        elif event.is_moved_from and not event.is_directory and sink is not None and \
                own is not None and len(own):
            with self._lock:
                raw = self._build_event_source_path(event) if self.is_active else None
            path = sink.rebase(raw) if raw is not None else None
            taken = own.take_moved_from(path) if path is not None else None
            if path is not None and taken is not None:
                if len(self._dropped_from) >= DROPPED_FROM_KEPT:  # their renames ended outside
                    self._dropped_from.pop(next(iter(self._dropped_from)))
                self._dropped_from[event.cookie] = (path, taken, event)
                return
        super().on_event(event)

    def on_queue_overflow(self) -> None:
        super().on_queue_overflow()  # rebuilds the watches first, so the rescan sees them
        if self.sink is not None:
            self.sink.overflowed()

    def _add_all_callbacks(self, path: bytes) -> None:
        failures: list[tuple[bytes, OSError]] = []
        self._failures = failures
        try:
            super()._add_all_callbacks(path)
        except OSError as exc:
            if self.sink is not None and self.is_active:  # the root, lost after start
                self.sink.broken = f"the watch on the root was lost: {reason_for(exc)}"
                self.sink.lost(self.sink.broken)
            raise
        finally:
            self._failures = None
            if failures and self.sink is not None:
                self.sink.watch_failed(failures)

    def _add_callback(self, path: bytes) -> None:
        # Same as watchdog's, except that a subfolder that cannot be watched is recorded.
        try:
            wd = self._inotify_fd.add_callback(path, self.event_mask, self._callback, self._id)
            if wd < 0:  # InotifyFD returns -1 instead of raising on EACCES
                raise PermissionError(errno.EACCES, os.strerror(errno.EACCES))
        except OSError as exc:
            if path == self.path:
                raise
            if self._failures is not None:
                self._failures.append((path, exc))
            return
        self._active_callbacks_by_path[path] = wd
        self._active_callbacks_by_watch[wd] = path


class _Emitter(InotifyFullEmitter):
    """The full emitter (moves in and out reported as such) with the reporting watch group."""

    def __init__(self, event_queue: EventQueue, watch: ObservedWatch, *, sink: _Sink,
                 **kwargs: Any) -> None:
        super().__init__(event_queue, watch, **kwargs)
        self.sink = sink

    def on_thread_start(self) -> None:
        self._inotify = _WatchGroup(
            self._inotify_fd, os.fsencode(self.watch.path),
            event_mask=self.get_event_mask_from_filter(), is_recursive=self.watch.is_recursive,
            follow_symlink=self.watch.follow_symlink, sink=self.sink)

    def run(self) -> None:
        try:
            super().run()
        except Exception as exc:
            self.sink.thread_ended("event", exc)
        else:
            self.sink.thread_ended("event", None)


class _Reader(InotifyFD):
    """watchdog's inotify reader, saying so when it stops on its own."""

    def __init__(self, sink: _Sink) -> None:
        super().__init__()
        self.sink = sink

    def run(self) -> None:
        try:
            super().run()
        except Exception as exc:
            self.sink.thread_ended("inotify reader", exc)
        else:
            self.sink.thread_ended("inotify reader", None)


class _Observer(InotifyObserver):
    """InotifyObserver built from the reporting reader and emitter."""

    def __init__(self, sink: _Sink) -> None:
        # InotifyObserver.__init__ would create a plain reader; this is the same assembly.
        reader = _Reader(sink)
        BaseObserver.__init__(self, _Emitter, inotify_fd=reader, sink=sink)
        self._inotify_fd = self.reader = reader
        self.sink = sink
        reader.start()

    def run(self) -> None:
        try:
            super().run()
        except Exception as exc:
            self.sink.thread_ended("dispatch", exc)
        else:
            self.sink.thread_ended("dispatch", None)


class _Handler(FileSystemEventHandler):
    def __init__(self, sink: _Sink) -> None:
        self.sink = sink

    def dispatch(self, event: FileSystemEvent) -> None:
        self.sink.event(event)


def _stop_observer(observer: _Observer) -> None:
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
        self._observer: _Observer | None = None

    def start(self) -> bool:
        """Start watching. False (and a `watch_unavailable` log) when no watch could be set
        up; the daemon then relies on its periodic rescans."""
        if self._observer is not None:
            raise RuntimeError(f"the watch on {self.root} is already running")
        if not os.path.isdir(self.root):
            return self._unavailable(f"{self.root} is not a folder or does not exist")
        sink = self._sink = _Sink(self.root, self.out, self.wake, self.log, self.own)
        try:
            observer = _Observer(sink)
        except OSError as exc:
            return self._unavailable(reason_for(exc))
        observer.schedule(_Handler(sink), sink.watched, recursive=True, event_filter=EVENT_TYPES)
        try:
            observer.start()  # adds every watch before it returns; raises if the root fails
        except Exception as exc:
            sink.closed = True
            _stop_observer(observer)
            return self._unavailable(reason_for(exc) if isinstance(exc, OSError)
                                     else f"{type(exc).__name__}: {exc}")
        self._observer = observer
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
        threads = [observer, observer.reader, *observer.emitters]
        if all(thread.is_alive() for thread in threads):
            return True
        sink.broken = "a watch thread is no longer running"
        sink.lost(sink.broken)
        return False
