"""The watcher on real inotify: events become Changes, lost events become RESCAN."""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import queue
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from contimg_publisher import watch
from contimg_publisher.watch import RESCAN, Change, Watcher

REPO = Path(__file__).resolve().parent.parent
QUEUED_EVENTS = "/proc/sys/fs/inotify/max_queued_events"
NS_WATCHES = "/proc/sys/user/max_inotify_watches"

Item = Change | str

# watchdog warns when a new folder is watched twice (by its parent's walk and by its own
# event); the module filters that out, but pytest resets filters set during collection.
pytestmark = pytest.mark.filterwarnings("ignore:Callback with id:RuntimeWarning")


class ListLog:
    """Stands in for the structlog logger as a plain sink that keeps every record in a list;
    it is where the watcher's log lines land, not a part under test."""

    def __init__(self) -> None:
        self.records: list[tuple[str, str, dict[str, Any]]] = []

    def _record(self, level: str) -> Callable[..., None]:
        return lambda event, **fields: self.records.append((level, event, fields))

    def __getattr__(self, level: str) -> Callable[..., None]:
        if level in ("debug", "info", "warning", "error"):
            return self._record(level)
        raise AttributeError(level)

    def events(self, name: str) -> list[dict[str, Any]]:
        return [fields for _level, event, fields in self.records if event == name]


def collect(out: queue.SimpleQueue, done: Callable[[list[Item]], bool],
            timeout: float = 5.0) -> list[Item]:
    """Read the queue until `done` holds for what was read, or the time runs out."""
    items: list[Item] = []
    deadline = time.monotonic() + timeout
    while not done(items) and time.monotonic() < deadline:
        with contextlib.suppress(queue.Empty):
            items.append(out.get(timeout=0.05))
    return items


def drain(out: queue.SimpleQueue, quiet: float = 0.3, timeout: float = 5.0) -> list[Item]:
    """Read the queue until nothing has come for `quiet` seconds."""
    items: list[Item] = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            items.append(out.get(timeout=quiet))
        except queue.Empty:
            break
    return items


def seen(items: list[Item]) -> set[tuple[str, str]]:
    return {(i.path, i.kind) for i in items if isinstance(i, Change)}


def has(*wanted: tuple[str, str]) -> Callable[[list[Item]], bool]:
    return lambda items: set(wanted) <= seen(items)


class Running:
    """A started watcher on a fresh queue, stopped at the end of the test."""

    def __init__(self, root: Path) -> None:
        self.out: queue.SimpleQueue = queue.SimpleQueue()
        self.log = ListLog()
        self.wakes = 0
        self.watcher = Watcher(str(root), self.out, wake=self._wake, log=self.log)

    def _wake(self) -> None:
        self.wakes += 1


@pytest.fixture
def running(tmp_path: Path):
    root = tmp_path / "stage"
    root.mkdir()
    run = Running(root)
    assert run.watcher.start() is True
    yield run
    run.watcher.stop()


def stage(run: Running) -> Path:
    return Path(run.watcher.root)


def test_written_file_gives_created_modified_closed(running: Running) -> None:
    path = stage(running) / "mosaics_nightly_20250101.fits"
    with open(path, "wb") as f:
        for _ in range(4):
            f.write(b"\0" * 2880)
            f.flush()
    want = [(str(path), kind) for kind in ("created", "modified", "closed")]
    items = collect(running.out, has(*want))
    assert set(want) <= seen(items)
    kinds = [i.kind for i in items if isinstance(i, Change) and i.path == str(path)]
    assert kinds[0] == "created" and kinds[-1] == "closed"
    assert running.wakes >= len(items)  # every put woke the loop
    assert running.watcher.healthy()


def test_moves_in_and_out_name_the_right_side(running: Running, tmp_path: Path) -> None:
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    (outside / "group_7.fits").write_bytes(b"x" * 100)
    inside = stage(running) / "group_7.fits"
    os.rename(outside / "group_7.fits", inside)
    items = collect(running.out, has((str(inside), "moved_in")))
    assert (str(inside), "moved_in") in seen(items)
    assert not any(i.path.startswith(str(outside)) for i in items if isinstance(i, Change))

    renamed = stage(running) / "group_8.fits"
    os.rename(inside, renamed)  # within the tree: both sides
    away = outside / "group_8.fits"
    items = collect(running.out, has((str(inside), "moved_out"), (str(renamed), "moved_in")))
    assert {(str(inside), "moved_out"), (str(renamed), "moved_in")} <= seen(items)

    os.rename(renamed, away)  # out of the tree: only the source, reported after watchdog's
    items = collect(running.out, has((str(renamed), "moved_out")))  # 0.5 s pairing delay
    assert (str(renamed), "moved_out") in seen(items)
    assert (str(away), "moved_in") not in seen(items)


@pytest.mark.slow
def test_own_moves_out_are_dropped_and_given_back_when_not_published(tmp_path: Path) -> None:
    """The renames the daemon expects (its publishes) reach neither the queue nor the loop's
    wake-up; a path it stops expecting gets its dropped event back; others pass."""
    root, away = tmp_path / "stage", tmp_path / "products"
    (root / "night").mkdir(parents=True)
    away.mkdir()
    names = ("ours", "failed", "theirs", "within")
    for name in names:
        (root / "night" / f"{name}.fits").write_bytes(b"x" * 2880)
    out: queue.SimpleQueue = queue.SimpleQueue()
    own = watch.OwnMoves()
    wakes: list[int] = []
    watcher = Watcher(str(root), out, wake=lambda: wakes.append(1), log=ListLog(), own=own)
    assert watcher.start() is True
    try:
        path = {n: str(root / "night" / f"{n}.fits") for n in names}
        own.expect([path["ours"], path["failed"], path["within"]])
        for name in ("ours", "failed", "theirs"):
            os.rename(path[name], away / f"{name}.fits")
        os.rename(path["within"], root / "within2.fits")  # stays in staging: passed on
        items = drain(out, quiet=1.5)
        assert (path["theirs"], "moved_out") in seen(items)
        assert (path["within"], "moved_out") in seen(items)
        assert (path["ours"], "moved_out") not in seen(items)
        assert (path["failed"], "moved_out") not in seen(items)
        assert len(wakes) == len(items)
        own.published(path["ours"])
        assert own.release(path["failed"]) == Change(path["failed"], "moved_out")
        assert own.release(path["ours"]) is None  # its event was ours, nothing to give back
        assert own.release(path["within"]) is None  # a move within staging is never dropped
        assert len(own) == 0
        # Once released, the same path's events pass again.
        (root / "night" / "failed.fits").write_bytes(b"y")
        os.rename(root / "night" / "failed.fits", away / "failed2.fits")
        items = collect(out, has((path["failed"], "moved_out")))
        assert (path["failed"], "moved_out") in seen(items)
    finally:
        watcher.stop()


def test_own_moves_expire() -> None:
    own = watch.OwnMoves(seconds=0.05)
    own.expect(["/s/a.fits"])
    time.sleep(0.1)
    assert not own.take(Change("/s/a.fits", "moved_out"))
    own.expect(["/s/b.fits"])  # expired entries go as a new batch is expected
    assert len(own) == 1
    assert not own.take(Change("/s/b.fits", "modified"))
    assert own.take(Change("/s/b.fits", "deleted"))


def test_new_folder_and_a_file_written_in_it_at_once(running: Running) -> None:
    folder = stage(running) / "mosaics" / "2025"
    os.makedirs(folder)
    inner = folder / "mosaic_20250101_000000_n10.fits"
    inner.write_bytes(b"SIMPLE")
    # watchdog reports each new folder as created. The file has its own events only when the
    # folder's watch was added first; the events watchdog makes up by listing a new folder
    # are not passed on, since the loop walks the folder itself on the folder's event.
    want = [(str(folder.parent), "created"), (str(folder), "created")]
    items = collect(running.out, has(*want))
    assert set(want) <= seen(items)
    later = folder / "later.fits"  # the new folder is watched from then on
    later.write_bytes(b"SIMPLE")
    items = collect(running.out, has((str(later), "created"), (str(later), "closed")))
    assert {(str(later), "created"), (str(later), "closed")} <= seen(items)


def test_folder_moved_in_reports_the_folder_not_each_file(running: Running,
                                                         tmp_path: Path) -> None:
    """A burst arrives as one folder: one event for it (the loop walks it), not one made-up
    event per file inside, which in a burst of 20,000 is 20,000 more for the loop."""
    outside = tmp_path / "old.image"
    outside.mkdir()
    (outside / "table.f0").write_bytes(b"t")
    inside = stage(running) / "old.image"
    os.rename(outside, inside)
    items = collect(running.out, has((str(inside), "moved_in")))
    items += drain(running.out)
    assert (str(inside), "moved_in") in seen(items)
    assert not [path for path, _kind in seen(items) if path.startswith(str(inside) + "/")]
    # Moved within the watch: the old paths inside are still reported (the close-write
    # tracker follows writers' descriptors through the rename), the new ones are not.
    moved = stage(running) / "moved.image"
    os.rename(inside, moved)
    items = collect(running.out, has((str(inside / "table.f0"), "moved_out")))
    items += drain(running.out)
    assert {(str(inside), "moved_out"), (str(moved), "moved_in"),
            (str(inside / "table.f0"), "moved_out")} <= seen(items)
    assert (str(moved / "table.f0"), "moved_in") not in seen(items)
    inside = moved
    (inside / "table.f1").write_bytes(b"t")  # and it is watched
    items = collect(running.out, has((str(inside / "table.f1"), "closed")))
    assert (str(inside / "table.f1"), "closed") in seen(items)


def test_non_utf8_name_round_trips(running: Running) -> None:
    raw = os.path.join(os.fsencode(running.watcher.root), b"mosaic_\xff.fits")
    with open(raw, "wb") as f:
        f.write(b"x")
    items = collect(running.out, lambda got: any(
        isinstance(i, Change) and i.kind == "closed" for i in got))
    changes = [i for i in items if isinstance(i, Change)]
    assert {c.kind for c in changes} >= {"created", "closed"}
    for change in changes:
        assert change.path.endswith("mosaic_\udcff.fits")
        assert os.fsencode(change.path) == raw
    assert running.watcher.healthy()


def test_hidden_names_are_passed_on(running: Running) -> None:
    hidden = stage(running) / ".partial" / ".x.fits"
    hidden.parent.mkdir()
    hidden.write_bytes(b"x")
    # "created" always comes for the file, from its own event or from the listing of the new
    # folder; its "closed" only when the folder's watch was in place before the write.
    want = [(str(hidden.parent), "created"), (str(hidden), "created")]
    items = collect(running.out, has(*want))
    assert set(want) <= seen(items)


def test_deletions_are_reported(running: Running) -> None:
    path = stage(running) / "gone.fits"
    path.write_bytes(b"x")
    collect(running.out, has((str(path), "closed")))
    path.unlink()
    items = collect(running.out, has((str(path), "deleted")))
    assert (str(path), "deleted") in seen(items)


def test_symlinked_root_reports_paths_under_the_configured_root(tmp_path: Path) -> None:
    real = tmp_path / "ssd"
    real.mkdir()
    link = tmp_path / "stage-link"
    link.symlink_to(real)
    run = Running(link)
    assert run.watcher.start()
    try:
        (real / "a.fits").write_bytes(b"x")
        items = collect(run.out, has((str(link / "a.fits"), "closed")))
    finally:
        run.watcher.stop()
    assert (str(link / "a.fits"), "closed") in seen(items)
    assert not any(i.path.startswith(str(real)) for i in items if isinstance(i, Change))


def test_missing_root_is_unavailable(tmp_path: Path) -> None:
    run = Running(tmp_path / "absent")
    assert run.watcher.start() is False
    (record,) = run.log.events("watch_unavailable")
    assert record["root"] == str(tmp_path / "absent")
    assert "does not exist" in record["reason"]
    assert run.watcher.healthy() is False


def test_root_removed_makes_it_unhealthy_and_asks_for_a_rescan(tmp_path: Path) -> None:
    root = tmp_path / "stage"
    (root / "sub").mkdir(parents=True)
    run = Running(root)
    assert run.watcher.start()
    try:
        shutil.rmtree(root)
        items = collect(run.out, lambda got: RESCAN in got and (str(root), "deleted") in seen(got))
        assert RESCAN in items
        assert (str(root), "deleted") in seen(items)
        assert run.watcher.healthy() is False
        reasons = [r["reason"] for r in run.log.events("watch_degraded")]
        assert any("went away" in r for r in reasons), reasons
    finally:
        run.watcher.stop()


def test_stop_joins_its_threads_in_bounded_time(tmp_path: Path) -> None:
    root = tmp_path / "stage"
    root.mkdir()
    before = set(threading.enumerate())
    run = Running(root)
    assert run.watcher.start()
    assert len(set(threading.enumerate()) - before) >= 3  # reader, emitter, dispatcher
    (root / "a.fits").write_bytes(b"x")
    collect(run.out, has((str(root / "a.fits"), "closed")))
    started = time.monotonic()
    run.watcher.stop()
    elapsed = time.monotonic() - started
    assert elapsed < watch.STOP_SECONDS + 0.5, elapsed
    assert not [t for t in set(threading.enumerate()) - before if t.is_alive()]
    assert run.watcher.healthy() is False
    (root / "b.fits").write_bytes(b"x")  # nothing reaches the queue once stopped
    assert drain(run.out, quiet=0.7) == []
    run.watcher.stop()  # a second stop is harmless


def test_a_watch_thread_that_ends_is_noticed(running: Running) -> None:
    """healthy() follows the threads that starting the observer created: when they end
    (here stopped behind the watcher's back), the watch says so and asks for a rescan."""
    observer = running.watcher._observer
    assert observer is not None and running.watcher.healthy()
    observer.stop()
    observer.join(5)
    assert running.watcher.healthy() is False
    assert RESCAN in drain(running.out)
    reasons = [r["reason"] for r in running.log.events("watch_degraded")]
    assert any("no longer running" in r for r in reasons), reasons


@pytest.mark.root("lowering fs.inotify.max_queued_events needs root")
def test_queue_overflow_asks_for_a_rescan(tmp_path: Path, writable_sysctls: None) -> None:
    root = tmp_path / "stage"
    root.mkdir()
    run = Running(root)
    # The limit is taken when the inotify instance is created, so it only needs to be low
    # while start() runs; other processes see it for those few milliseconds only. The flock
    # keeps two test runs from saving each other's lowered value as the one to restore.
    with open("/tmp/contimg-publisher-inotify-sysctl.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        with open(QUEUED_EVENTS) as f:
            original = f.read()
        try:
            with open(QUEUED_EVENTS, "w") as f:
                f.write("4")
            started = run.watcher.start()
        finally:
            with open(QUEUED_EVENTS, "w") as f:
                f.write(original)
    assert started
    try:
        items: list[Item] = []
        for flood in range(10):  # another process writes faster than inotify events are read
            names = [str(root / f"tile_{flood}_{i}.fits") for i in range(300)]
            subprocess.run(["touch", *names], check=True)
            items += collect(run.out, lambda got: RESCAN in got, timeout=1.0)
            if RESCAN in items:
                break
        assert RESCAN in items
        reasons = [r["reason"] for r in run.log.events("watch_degraded")]
        assert any("overflowed" in r and "max_queued_events=4" in r for r in reasons), reasons
        assert run.watcher.healthy()  # watchdog rebuilt its watches; still watching
        drain(run.out)
        after = root / "after.fits"
        after.write_bytes(b"x")
        items = collect(run.out, has((str(after), "closed")))
        assert (str(after), "closed") in seen(items)
    finally:
        run.watcher.stop()


def _limit_child(root: str, limit: int) -> None:
    """Runs inside a new user namespace (see the test below); prints what it observed."""
    with open(NS_WATCHES, "w") as f:
        f.write(str(limit))
    out: queue.SimpleQueue = queue.SimpleQueue()
    log = ListLog()
    watcher = Watcher(root, out, log=log)
    started = watcher.start()
    folders = [os.path.join(root, f"night_{i}") for i in range(limit + 3)]
    for folder in folders:
        os.mkdir(folder)
    items = collect(out, lambda got: RESCAN in got and {
        (f, "created") for f in folders} <= seen(got))
    healthy = watcher.healthy()
    watcher.stop()
    with open(NS_WATCHES, "w") as f:
        f.write("0")
    second = Watcher(root, out, log=log)
    refused = second.start()
    second.stop()
    print(json.dumps({
        "started": started, "healthy": healthy, "refused": refused, "folders": folders,
        "rescans": items.count(RESCAN), "changes": sorted(seen(items)),
        "logs": [[event, fields] for _level, event, fields in log.records]}))


def test_watch_limit_reports_unwatched_folders(tmp_path: Path, user_namespaces: str) -> None:
    # The watch limit is set for a new user namespace only (user.max_inotify_watches); the
    # kernel refuses inotify_add_watch there with ENOSPC exactly as at the global
    # fs.inotify.max_user_watches, which stays untouched for the other processes of the machine.
    root = tmp_path / "stage"
    root.mkdir()
    code = ("import sys; sys.path.insert(0, sys.argv[1]); "
            "from tests.test_watch import _limit_child; _limit_child(sys.argv[2], 3)")
    result = subprocess.run(
        ["unshare", "--user", "--map-root-user", sys.executable, "-c", code, str(REPO),
         str(root)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout.splitlines()[-1])
    assert report["started"] is True
    assert report["rescans"] >= 1
    changes = {tuple(c) for c in report["changes"]}
    assert {(f, "created") for f in report["folders"]} <= changes  # the loop walks them
    assert report["healthy"] is True  # a restart would not add them; rescans cover them
    degraded = [fields for event, fields in report["logs"] if event == "watch_degraded"]
    assert degraded, report["logs"]
    assert "inotify watch limit reached" in degraded[0]["reason"]
    assert "user.max_inotify_watches=3" in degraded[0]["reason"]
    assert degraded[0]["folder"] in report["folders"][2:]  # root + 2 folders fit in 3 watches
    assert report["refused"] is False
    unavailable = [fields for event, fields in report["logs"] if event == "watch_unavailable"]
    assert len(unavailable) == 1 and "inotify watch limit reached" in unavailable[0]["reason"]
    assert unavailable[0]["root"] == str(root)
