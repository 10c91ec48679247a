"""writers: the kernel's answer to "is anyone writing this file?", with real processes.

Writers and readers are other real processes; checks whose failure would be a signal (a lease
break delivered as SIGIO) run in a child process, so the test sees the child die instead of
dying with it. The capability cases need root: a child keeps uid 0 but loses CAP_LEASE
(setpriv), or runs in a user namespace of its own (unshare, as PrivateUsers=yes does).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from watchdog.events import FileSystemEvent, FileSystemEventHandler
from watchdog.observers.inotify import InotifyObserver

from contimg_publisher import writers
from contimg_publisher.writers import Method, WriterCheck, WriteTracker
from tests.helpers import REPO, is_root, wait_for

CHILD_ENV = {**os.environ, "PYTHONPATH": os.pathsep.join(
    [str(REPO / "daemon"), str(REPO), os.environ.get("PYTHONPATH", "")])}
NOBODY = 65534


def test_module_is_this_checkout() -> None:
    assert Path(writers.__file__).resolve().is_relative_to(REPO / "daemon")


@contextlib.contextmanager
def held_open(path: Path, mode: str) -> Iterator[subprocess.Popen[str]]:
    """Another process with `path` open in `mode` until the block ends."""
    code = ("import sys; f = open(sys.argv[1], sys.argv[2]); print('ready', flush=True); "
            "sys.stdin.read()")
    proc = subprocess.Popen([sys.executable, "-c", code, str(path), mode], text=True,
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
        yield proc
    finally:
        if proc.stdin is not None:
            proc.stdin.close()
        proc.wait(timeout=10)


def check(path: Path) -> WriterCheck:
    fd = os.open(path, os.O_RDONLY)
    try:
        return writers.open_for_writing(fd)
    finally:
        os.close(fd)


def run_child(code: str, *args: str, prefix: tuple[str, ...] = (), timeout: float = 60
              ) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*prefix, sys.executable, "-c", code, *args], env=CHILD_ENV,
                          capture_output=True, text=True, timeout=timeout)


def cli(*paths: Path, prefix: tuple[str, ...] = ()) -> list[dict[str, object]]:
    proc = subprocess.run([*prefix, sys.executable, "-m", "contimg_publisher.writers",
                           *map(str, paths)], env=CHILD_ENV, capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 0, proc.stderr
    return [json.loads(line) for line in proc.stdout.splitlines()]


@pytest.fixture
def staged(tmp_path: Path) -> Path:
    path = tmp_path / "night1.fits"
    path.write_bytes(b"SIMPLE  =                    T" + b" " * 2850)
    return path


# --- open_for_writing --------------------------------------------------------------------------


def test_writer_in_another_process_then_none_after_it_closes(staged: Path) -> None:
    with held_open(staged, "ab"):
        assert check(staged) is WriterCheck.WRITING
        assert check(staged) is WriterCheck.WRITING  # asking changes nothing
    assert check(staged) is WriterCheck.NONE


def test_reader_in_another_process_is_no_writer(staged: Path) -> None:
    with held_open(staged, "rb"):
        assert check(staged) is WriterCheck.NONE


def test_leaves_no_lease_behind(staged: Path) -> None:
    fd = os.open(staged, os.O_RDONLY)
    try:
        assert writers.open_for_writing(fd) is WriterCheck.NONE
        assert fcntl.fcntl(fd, fcntl.F_GETLEASE) == fcntl.F_UNLCK
        assert fcntl.fcntl(fd, fcntl.F_GETSIG) == 0  # the kernel resets it with the lease
        # Without a lease, a writer's open does not wait for us.
        started = time.monotonic()
        with open(staged, "ab"):
            pass
        assert time.monotonic() - started < 0.5
    finally:
        os.close(fd)


def test_a_writable_descriptor_is_refused(staged: Path) -> None:
    for flags in (os.O_RDWR, os.O_WRONLY, os.O_PATH):
        fd = os.open(staged, flags)
        try:
            with pytest.raises(ValueError, match="O_RDONLY"):
                writers.open_for_writing(fd)
        finally:
            os.close(fd)


def test_check_path_on_files_folders_fifos_and_symlinks(tmp_path: Path, staged: Path) -> None:
    assert writers.check_path(staged) is WriterCheck.NONE
    with held_open(staged, "r+b"):
        assert writers.check_path(staged) is WriterCheck.WRITING
        dir_fd = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
        try:
            assert writers.check_path(staged.name, dir_fd=dir_fd) is WriterCheck.WRITING
        finally:
            os.close(dir_fd)
    assert writers.check_path(tmp_path) is WriterCheck.UNKNOWN  # a folder takes no lease
    os.mkfifo(tmp_path / "fifo")
    assert writers.check_path(tmp_path / "fifo") is WriterCheck.UNKNOWN  # and does not block
    (tmp_path / "link.fits").symlink_to(staged)
    with pytest.raises(OSError):  # the link itself is not the product
        writers.check_path(tmp_path / "link.fits")


# A child that widens the instant between taking and dropping the lease to 0.5 s (as a stall
# of this process would) and starts a writer inside it, so the break is certain to happen.
WIDENED = r"""
import fcntl, json, subprocess, sys, time
from contimg_publisher import writers
if sys.argv[2] == "sigio":
    writers.BREAK_SIGNAL = 0  # F_SETSIG 0: the kernel's default, SIGIO
real = fcntl.fcntl
writer = []
def slow(fd, cmd, arg=0):
    out = real(fd, cmd, arg)
    if cmd == fcntl.F_SETLEASE and arg == fcntl.F_RDLCK:
        code = ("import sys, time; t = time.monotonic(); open(sys.argv[1], 'ab').close(); "
                "print(time.monotonic() - t)")
        writer.append(subprocess.Popen([sys.executable, "-c", code, sys.argv[1]],
                                       stdout=subprocess.PIPE, text=True))
        time.sleep(0.5)
    return out
fcntl.fcntl = slow
fd = __import__("os").open(sys.argv[1], 0)
result = writers.open_for_writing(fd)
waited = float(writer[0].communicate(timeout=30)[0])
print(json.dumps({"result": str(result), "writer_waited": waited}))
"""


def test_a_writer_arriving_while_the_lease_is_held_cannot_kill_the_checker(staged: Path
                                                                           ) -> None:
    proc = run_child(WIDENED, str(staged), "safe")
    assert proc.returncode == 0, (proc.returncode, proc.stderr)
    seen = json.loads(proc.stdout)
    assert seen["writer_waited"] > 0.3  # the writer's open really broke our lease
    assert seen["result"] == "writing"  # and the check saw it arrive


def test_without_the_break_signal_sigio_would_kill_the_checker(staged: Path) -> None:
    proc = run_child(WIDENED, str(staged), "sigio")
    assert proc.returncode == -signal.SIGIO, (proc.returncode, proc.stdout, proc.stderr)


CHECK_LOOP = r"""
import collections, json, os, sys, time
from contimg_publisher import writers
counts = collections.Counter()
end = time.monotonic() + float(sys.argv[2])
while time.monotonic() < end:
    fd = os.open(sys.argv[1], os.O_RDONLY)
    try:
        counts[str(writers.open_for_writing(fd))] += 1
    finally:
        os.close(fd)
print(json.dumps(counts))
"""
WRITE_LOOP = r"""
import sys, time
end = time.monotonic() + float(sys.argv[2])
n = 0
while time.monotonic() < end:
    with open(sys.argv[1], "ab") as f:
        f.write(b"x")
        time.sleep(0.0005)
    n += 1
print(n)
"""


@pytest.mark.slow
def test_many_checks_while_another_process_opens_and_closes_for_writing(staged: Path) -> None:
    seconds = "3"
    writer = subprocess.Popen([sys.executable, "-c", WRITE_LOOP, str(staged), seconds],
                              stdout=subprocess.PIPE, text=True)
    checker = run_child(CHECK_LOOP, str(staged), seconds)
    opens = int(writer.communicate(timeout=30)[0])
    assert writer.returncode == 0
    assert checker.returncode == 0, (checker.returncode, checker.stderr)
    counts = json.loads(checker.stdout)
    print(f"writer opened {opens} times; checks: {counts}")
    assert set(counts) <= {"none", "writing"}
    assert counts.get("none", 0) > 0 and counts.get("writing", 0) > 0
    assert opens > 100


# --- capabilities ------------------------------------------------------------------------------


NO_CAP_LEASE = ("setpriv", "--inh-caps=-all", "--bounding-set=-lease", "--")


@pytest.mark.root("a file of another owner and a process without CAP_LEASE")
def test_other_owners_file_without_cap_lease_is_unknown(tmp_path: Path, staged: Path,
                                                        setpriv: str) -> None:
    os.chown(staged, NOBODY, NOBODY)
    folder, file = cli(tmp_path, staged, prefix=NO_CAP_LEASE)
    assert folder["uid"] == 0 and file["uid"] == 0  # root, but without the capability
    assert file["check"] == "unknown"
    assert folder["method"] == "close-write"
    assert "EACCES" in str(folder["reason"]) and "not in this process's effective" in str(
        folder["reason"]), folder
    # The same file for root with CAP_LEASE: the kernel answers.
    assert check(staged) is WriterCheck.NONE
    with held_open(staged, "ab"):
        assert check(staged) is WriterCheck.WRITING
    assert writers.lease_method_probe(tmp_path).method is Method.LEASE


@pytest.mark.root("a file of another owner and a process without CAP_LEASE")
def test_cap_lease_does_not_count_in_a_user_namespace(tmp_path: Path, staged: Path,
                                                      unshare: str) -> None:
    # What PrivateUsers=yes does to the unit: CAP_LEASE is in CapEff, but only for the
    # namespace the process runs in, and the kernel asks the initial one.
    os.chown(staged, NOBODY, NOBODY)
    folder, file = cli(tmp_path, staged, prefix=("unshare", "--user", "--map-root-user", "--"))
    assert file["check"] == "unknown"
    assert folder["method"] == "close-write"
    assert "user namespace" in str(folder["reason"]), folder


@pytest.mark.root("a file of another owner and a process without CAP_LEASE")
def test_own_files_need_no_capability(tmp_path: Path, staged: Path, setpriv: str) -> None:
    # Root without CAP_LEASE owns the file: the lease is granted. The probe still says
    # close-write: another user's files would be refused.
    with held_open(staged, "ab"):
        busy, folder = cli(staged, tmp_path, prefix=NO_CAP_LEASE)
    idle, = cli(staged, prefix=NO_CAP_LEASE)
    assert (busy["check"], idle["check"]) == ("writing", "none")
    assert folder["method"] == "close-write"
    assert "only on files this process owns (uid 0)" in str(folder["reason"]), folder


# --- lease_method_probe ------------------------------------------------------------------------


def _snapshot(root: Path) -> dict[str, tuple[int, int, int]]:
    out = {}
    for path in [root, *root.rglob("*")]:
        st = os.lstat(path)
        out[str(path)] = (st.st_mtime_ns, st.st_ctime_ns, st.st_atime_ns)
    return out


def test_probe_creates_and_changes_nothing(tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    full = tmp_path / "full"
    (full / "mosaics").mkdir(parents=True)
    product = full / "mosaics" / "night1.fits"
    product.write_bytes(b"x" * 100)
    os.utime(product, ns=(1_000_000_000, 2_000_000_000))  # relatime would move this atime
    before = _snapshot(tmp_path)
    probe = writers.lease_method_probe(empty)
    assert probe.method is Method.LEASE or not is_root(), probe
    probe = writers.lease_method_probe(full)
    if is_root():
        assert probe.method is Method.LEASE, probe
        assert str(product) in probe.reason and "answered" in probe.reason, probe
    assert _snapshot(tmp_path) == before
    method, reason = probe  # unpacks as (method, reason)
    assert isinstance(method, str) and reason


@pytest.mark.root("files of another owner need root (chown)")
def test_probe_prefers_a_file_of_another_owner(tmp_path: Path) -> None:
    for name in ("a.fits", "b.fits"):
        (tmp_path / name).write_bytes(b"x")
    os.chown(tmp_path / "b.fits", NOBODY, NOBODY)
    probe = writers.lease_method_probe(tmp_path)
    assert probe.method is Method.LEASE
    assert f"{tmp_path / 'b.fits'} (owner uid {NOBODY})" in probe.reason, probe


def test_cap_lease_status_here() -> None:
    ok, reason = writers.cap_lease_status()
    assert ok is is_root(), reason  # tests run as root in CI, in the initial user namespace
    assert "CAP_LEASE" in reason


@pytest.mark.root("mounting a tmpfs needs root")
def test_filesystem_type_of_a_tmpfs(tmp_path: Path) -> None:
    mnt = tmp_path / "with space"
    mnt.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mnt)], check=True)
    try:
        assert writers.filesystem_type(str(mnt / "x")) == "tmpfs"
        (mnt / "f").write_bytes(b"x")
        assert writers.lease_method_probe(mnt).method is Method.LEASE
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)
    assert writers.filesystem_type(str(mnt)) != "tmpfs"


# --- WriteTracker ------------------------------------------------------------------------------


def test_tracker_marks_and_clears() -> None:
    t = WriteTracker()
    assert not t.still_being_written("/s/a.fits")  # never seen: nothing known against it
    t.modified("/s/a.fits")
    t.modified(b"/s/b.fits")
    assert t.still_being_written("/s/a.fits") and t.still_being_written("/s/b.fits")
    t.closed_after_write("/s/a.fits")
    assert not t.still_being_written("/s/a.fits") and len(t) == 1
    t.moved("/s/b.fits", "/s/c.fits")
    assert not t.still_being_written("/s/b.fits") and t.still_being_written("/s/c.fits")
    t.modified("/s/night/1.fits")
    t.modified("/s/night2.fits")
    t.moved("/s/night", "/s/done")  # a folder takes what is below it, not its namesakes
    assert t.still_being_written("/s/done/1.fits") and t.still_being_written("/s/night2.fits")
    t.moved("/s/done", "")  # out of the watch
    assert not t.still_being_written("/s/done/1.fits")
    t.moved("", "/s/in.fits")  # in from outside: nothing known
    assert not t.still_being_written("/s/in.fits")
    t.forget("/s/c.fits")
    assert not t.still_being_written("/s/c.fits")
    t.clear()
    assert len(t) == 0


class _Feed(FileSystemEventHandler):
    def __init__(self, tracker: WriteTracker) -> None:
        self.tracker = tracker
        self.count = 0

    def dispatch(self, event: FileSystemEvent) -> None:
        self.tracker.on_event(event)
        self.count += 1


@pytest.fixture
def watched(tmp_path: Path) -> Iterator[tuple[Path, WriteTracker, _Feed]]:
    root = tmp_path / "stage"
    root.mkdir()
    tracker = WriteTracker()
    feed = _Feed(tracker)
    observer = InotifyObserver(generate_full_events=True)
    observer.schedule(feed, str(root), recursive=True)
    observer.start()
    try:
        yield root, tracker, feed
    finally:
        observer.stop()
        observer.join(5)


def _settled(feed: _Feed) -> None:
    """Wait until no event arrived for 0.2 s."""
    last, since = feed.count, time.monotonic()
    while time.monotonic() - since < 0.2:
        time.sleep(0.02)
        if feed.count != last:
            last, since = feed.count, time.monotonic()


def test_tracker_fed_by_watchdog_follows_a_real_writer(watched) -> None:
    root, tracker, feed = watched
    path = root / "night1.fits"
    with open(path, "ab") as f:
        f.write(b"x" * 2880)
        f.flush()
        wait_for(lambda: tracker.still_being_written(str(path)), what="write seen", timeout=5)
    wait_for(lambda: not tracker.still_being_written(str(path)), what="close-write seen",
             timeout=5)


@pytest.mark.slow
def test_tracker_ignores_readers_metadata_and_keeps_a_renamed_writer(watched) -> None:
    root, tracker, feed = watched
    done = root / "done.fits"
    done.write_bytes(b"x")
    _settled(feed)
    assert not tracker.still_being_written(str(done))
    done.read_bytes()  # open, close without writing
    done.chmod(0o600)  # IN_ATTRIB
    os.utime(done)
    _settled(feed)
    assert not tracker.still_being_written(str(done))

    (root / "night").mkdir()
    _settled(feed)  # its watch is added once its IN_CREATE is read; writes before are missed
    src = root / "night" / "2.fits"
    with open(src, "ab") as f:
        f.write(b"y")
        f.flush()
        wait_for(lambda: tracker.still_being_written(str(src)), what="write seen", timeout=5)
        (root / "night").rename(root / "moved")  # the writer keeps its descriptor
        dest = root / "moved" / "2.fits"
        wait_for(lambda: tracker.still_being_written(str(dest)), what="rename seen", timeout=5)
        assert not tracker.still_being_written(str(src))
        f.write(b"z")
    wait_for(lambda: not tracker.still_being_written(str(dest)), what="close-write seen",
             timeout=5)

    gone = root / "gone.fits"
    f = open(gone, "ab")  # noqa: SIM115 - deleted while open on purpose
    try:
        f.write(b"x")
        f.flush()
        wait_for(lambda: tracker.still_being_written(str(gone)), what="write seen", timeout=5)
        gone.unlink()
        wait_for(lambda: not tracker.still_being_written(str(gone)), what="delete seen",
                 timeout=5)
    finally:
        f.close()
    _settled(feed)
    assert len(tracker) == 0
