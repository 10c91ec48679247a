"""Finished-product detection end to end: real writer processes, real inotify, the daemon as
a real process, the `scan` CLI, and the Detector on a real registry file.

A mosaic is taken only once it is complete and quiet; bad input is recorded as `rejected`
with a reason an operator can act on, and never stops the daemon.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import socket
import stat
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from contimg_publisher import content, detect, paths
from contimg_publisher import fits as fits_mod
from contimg_publisher.registry import Candidate, Identity, Product, Registry
from tests.helpers import (
    REPO,
    MakeSandbox,
    Sandbox,
    fits_bytes,
    is_root,
    start_daemon,
    stop,
    wait_for,
    write_fits,
)
from tests.test_service import NotifySocket

QUEUED_EVENTS = "/proc/sys/fs/inotify/max_queued_events"
TAKEN = ("staging", "publishing", "published", "failed")


def sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def rows(sandbox: Sandbox) -> list[Product]:
    """Every registry row, read straight from the SQLite file the daemon writes."""
    if not sandbox.registry.exists():
        return []
    with Registry(sandbox.registry) as reg:
        return reg.products()


def rows_for(sandbox: Sandbox, path: Path | bytes) -> list[Product]:
    raw = os.fsencode(path)
    return [r for r in rows(sandbox) if r.stage_bytes == raw]


def registered(sandbox: Sandbox, path: Path | bytes) -> Product | None:
    found = [r for r in rows_for(sandbox, path) if r.status in TAKEN]
    return found[0] if found else None


def rejected(sandbox: Sandbox, path: Path | bytes) -> Product | None:
    found = [r for r in rows_for(sandbox, path) if r.status == "rejected"]
    return found[0] if found else None


@pytest.fixture
def notify(tmp_path: Path) -> Iterator[NotifySocket]:
    sock = NotifySocket(tmp_path / "notify.sock")
    yield sock
    sock.close()


@contextlib.contextmanager
def daemon(sandbox: Sandbox, notify: NotifySocket) -> Iterator[subprocess.Popen[str]]:
    """The daemon running on the sandbox, READY (start-up scan done), stopped afterwards."""
    proc = start_daemon(sandbox, notify.path)
    try:
        notify.wait("READY", "1", timeout=60)
        yield proc
        assert proc.poll() is None, (sandbox.root / "daemon.log").read_text()[-3000:]
    finally:
        code = stop(proc)
    assert code == 0, (sandbox.root / "daemon.log").read_text()[-3000:]


class InProcess:
    """The Detector on the sandbox's real registry, for cases that need exact control of the
    order of events (no publisher runs, so a registered row stays `staging`)."""

    def __init__(self, sandbox: Sandbox) -> None:
        self.config = sandbox.config()
        self.registry = Registry(self.config.registry)
        self.detector = detect.Detector(self.config, self.registry)

    def settle(self, path: Path | bytes) -> list[detect.Outcome]:
        """Note the path, then check it once its settle time has passed."""
        self.detector.note(os.fsencode(path))
        out: list[detect.Outcome] = []
        deadline = time.time() + self.config.settle_seconds + 10
        while self.detector.pending and time.time() < deadline:
            time.sleep(0.05)
            out += self.detector.process(now=time.time())
        return out

    def close(self) -> None:
        self.registry.close()


@pytest.fixture
def inproc(sandbox: Sandbox) -> Iterator[InProcess]:
    ip = InProcess(sandbox)
    yield ip
    ip.close()


# --- writer processes --------------------------------------------------------------------

WRITER = textwrap.dedent("""
    import os, sys, time
    path, chunks, pause, mode = sys.argv[1], int(sys.argv[2]), float(sys.argv[3]), sys.argv[4]
    data = sys.stdin.buffer.read()
    step = -(-len(data) // chunks)
    held = open(path, "wb") if mode == "held-open" else None
    for i in range(chunks):
        # "reopen": one open/write/close per chunk, as a pipeline appending section by section
        # does; "held-open": one descriptor for the whole file, closed only at the end.
        fh = held or open(path, "ab" if i else "wb")
        fh.write(data[i * step:(i + 1) * step])
        fh.flush()
        os.fsync(fh.fileno())
        if held is None:
            fh.close()
        if i < chunks - 1:
            time.sleep(pause)
    if held is not None:
        held.close()
""")


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["reopen", "held-open"])
def test_chunked_writer_is_registered_once_only_after_last_write_plus_settle(
        sandbox: Sandbox, notify: NotifySocket, mode: str) -> None:
    """The pipeline writes mosaics in place in several writes: a half-written file must never
    be taken, however long the pauses between writes, as long as they are below settle."""
    sandbox.update(detect={"settle_seconds": 1.0})
    data = fits_bytes(pixels=200, seed=7)
    path = sandbox.mosaics / "2026" / "nightly_20261128.fits"
    path.parent.mkdir(parents=True)
    with daemon(sandbox, notify):
        writer = subprocess.Popen([sys.executable, "-c", WRITER, str(path), "5", "0.6", mode],
                                  stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=False)
        assert writer.stdin is not None
        writer.stdin.write(data)
        writer.stdin.close()
        seen_while_writing = []
        while writer.poll() is None:
            seen_while_writing += rows_for(sandbox, path)
            time.sleep(0.05)
        assert writer.returncode == 0
        assert seen_while_writing == []
        st = path.stat()   # the last write's ctime, before the publisher moves the file
        assert path.read_bytes() == data
        row = wait_for(lambda: registered(sandbox, path), timeout=30, what="registration")
        assert row.checksum == sha256(data)
        assert row.size_bytes == len(data)
        assert row.metadata["OBJECT"] == "MOSAIC7"
        assert row.created_at >= st.st_ctime_ns / 1e9 + 1.0
        # Exactly one row, still one after the publisher had time to act on it.
        wait_for(lambda: registered(sandbox, path).status == "published", timeout=30,
                 what="publication")
        time.sleep(1.5)
        assert len(rows_for(sandbox, path)) == 1
        assert [r.data_id for r in rows(sandbox)] == ["2026/nightly_20261128"]


def _truncated() -> bytes:
    return fits_bytes(pixels=64)[:-2880]


def _bad_datasum() -> bytes:
    data = bytearray(fits_bytes(pixels=64))
    data[-100] ^= 0xFF      # a flipped data byte: DATASUM no longer matches
    return bytes(data)


def _no_end() -> bytes:
    data = fits_bytes(pixels=64, checksum=False)
    at = data.index(b"END" + b" " * 77)
    return data[:at] + b"COMMENT" + b" " * 73 + data[at + 80:]


@pytest.mark.slow
@pytest.mark.parametrize(("maker", "reason"), [
    (_truncated, "truncated"),
    (_bad_datasum, "DATASUM mismatch"),
    (_no_end, "no END card"),
], ids=["truncated", "wrong-datasum", "no-end-card"])
def test_invalid_fits_is_rejected_with_reason_never_due(sandbox: Sandbox,
                                                        maker: Callable[[], bytes],
                                                        reason: str) -> None:
    """A file that fails its integrity checks after settling is bad input, not a product."""
    data = maker()
    path = sandbox.mosaics / "bad.fits"
    path.write_bytes(data)
    time.sleep(0.6)
    out = sandbox.cli("scan")
    assert out.returncode == 0, out.stderr
    assert "rejected" in out.stdout and reason in out.stdout, out.stdout
    [row] = rows_for(sandbox, path)
    assert row.status == "rejected"
    assert reason in (row.publish_error or "")
    assert row.checksum is None and row.next_attempt_at is None
    # Never published: the bytes are where they were, nothing reached the archive.
    assert path.read_bytes() == data
    assert not any(p.is_file() for p in sandbox.products.rglob("*"))
    # A second pass records nothing new.
    out = sandbox.cli("scan")
    assert [(r.status, r.publish_error) for r in rows_for(sandbox, path)] == \
        [("rejected", row.publish_error)]


@pytest.mark.slow
def test_rejected_file_fixed_in_place_is_registered(sandbox: Sandbox) -> None:
    """A rejection is not final: once the file changes it is looked at again."""
    path = sandbox.mosaics / "fixed.fits"
    path.write_bytes(_truncated())
    time.sleep(0.6)
    sandbox.cli("scan", check=True)
    assert rejected(sandbox, path) is not None
    data = write_fits(path, seed=3)
    time.sleep(0.6)
    out = sandbox.cli("scan", check=True)
    assert "registered" in out.stdout or "updated" in out.stdout, out.stdout
    [row] = rows_for(sandbox, path)
    assert row.status == "published" and row.checksum == sha256(data)


@pytest.mark.slow
def test_rename_copy_and_folder_product(sandbox: Sandbox, notify: NotifySocket) -> None:
    """The three other ways a product arrives: renamed into place, copied in with cp, and a
    CASA image folder built file by file (taken only once table.dat exists and all is quiet)."""
    sandbox.update(products=[
        {"type": "mosaic", "glob": "mosaics/**/*.fits", "destination": "mosaics"},
        {"type": "image", "glob": "images/*.image", "destination": "images",
         "kind": "directory", "required": ["table.dat"]},
    ])
    (sandbox.stage / "images").mkdir()
    outside = sandbox.root / "outside"
    outside.mkdir()
    renamed_data = write_fits(sandbox.mosaics / ".incoming.tmp", seed=1)
    copied_src = outside / "copied.fits"
    copied_data = write_fits(copied_src, seed=2)
    with daemon(sandbox, notify) as proc:
        os.rename(sandbox.mosaics / ".incoming.tmp", sandbox.mosaics / "renamed.fits")
        subprocess.run(["cp", str(copied_src), str(sandbox.mosaics / "copied.fits")], check=True)
        image = sandbox.stage / "images" / "field.image"
        image.mkdir()
        (image / "logtable").mkdir()
        for i in range(4):
            (image / f"table.f{i}").write_bytes(os.urandom(3000))
            time.sleep(0.2)
        assert registered(sandbox, image) is None
        (image / "logtable" / "table.dat").write_bytes(b"log")
        time.sleep(0.2)
        assert registered(sandbox, image) is None   # table.dat of the image itself is missing
        (image / "table.dat").write_bytes(b"image table")
        wait_for(lambda: registered(sandbox, sandbox.mosaics / "renamed.fits"), timeout=30,
                 what="renamed file")
        wait_for(lambda: registered(sandbox, sandbox.mosaics / "copied.fits"), timeout=30,
                 what="copied file")
        img = wait_for(lambda: registered(sandbox, image), timeout=30, what="folder product")
        assert proc.poll() is None
    assert registered(sandbox, sandbox.mosaics / "renamed.fits").checksum == sha256(renamed_data)
    assert registered(sandbox, sandbox.mosaics / "copied.fits").checksum == sha256(copied_data)
    assert img.data_type == "image" and img.metadata["files"] == 6
    assert img.size_bytes == 4 * 3000 + 3 + 11
    assert all(r.status != "rejected" for r in rows(sandbox))
    assert len(rows(sandbox)) == 3


@pytest.mark.slow
def test_files_written_while_no_daemon_ran_are_found_at_startup(
        sandbox: Sandbox, notify: NotifySocket) -> None:
    """The watcher cannot see what happened while it was down; the start-up scan does."""
    written = {}
    for i in range(20):
        path = sandbox.mosaics / f"night{i // 5}" / f"m{i:02}.fits"
        written[path] = write_fits(path, pixels=16, seed=i)
    time.sleep(0.6)
    with daemon(sandbox, notify):
        got = wait_for(lambda: [p for p in written if registered(sandbox, p)]
                       if all(registered(sandbox, p) for p in written) else None,
                       timeout=60, what="all 20 files")
    assert len(got) == 20
    for path, data in written.items():
        assert registered(sandbox, path).checksum == sha256(data)
    assert len(rows(sandbox)) == 20


def test_product_changed_after_registration_gets_a_new_checksum(
        sandbox: Sandbox, inproc: InProcess) -> None:
    """A product rewritten before publishing waits to settle again and is re-described:
    no stale checksum stays on the row."""
    path = sandbox.mosaics / "changing.fits"
    first = write_fits(path, seed=1)
    [out] = inproc.settle(path)
    assert out.action == "registered"
    before = inproc.registry.get(out.data_id)
    assert before is not None and before.checksum == sha256(first)
    second = write_fits(path, seed=2)
    inproc.detector.note(os.fsencode(path))
    # Right after the change the path is waiting, not re-described.
    assert inproc.detector.process(now=time.time()) == []
    assert os.fsencode(path) in [os.path.join(inproc.detector.root, *k)
                                 for k in inproc.detector.pending]
    outs = inproc.settle(path)
    assert [o.action for o in outs] == ["updated"]
    after = inproc.registry.get(out.data_id)
    assert after is not None
    assert after.checksum == sha256(second) != before.checksum
    assert after.status == "staging" and after.identity is not None
    assert after.identity.ctime_ns == path.stat().st_ctime_ns


# --- bad input -------------------------------------------------------------------------------

def _socket_at(path: Path) -> socket.socket:
    """A listening AF_UNIX socket at `path` (bound through its folder: sun_path is short)."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    cwd = os.getcwd()
    os.chdir(path.parent)
    try:
        sock.bind(path.name)
    finally:
        os.chdir(cwd)
    return sock


@pytest.mark.slow
def test_every_bad_input_is_rejected_with_a_reason_and_the_daemon_keeps_running(
        sandbox: Sandbox, notify: NotifySocket, tmp_path: Path) -> None:
    """Links, special files, empty files and unusable names are recorded with an actionable
    reason and never published; a good file staged after them all is still taken."""
    m = sandbox.mosaics
    outside = tmp_path / "outside"
    outside.mkdir()
    write_fits(outside / "real.fits", seed=9)
    inside = write_fits(m / "inside-target.fits", seed=8)
    os.symlink(m / "inside-target.fits", m / "link-to-file.fits")
    os.symlink(outside / "real.fits", m / "link-outside.fits")
    os.symlink("../../..", m / "link-relative-up.fits")
    (outside / "dir").mkdir()
    write_fits(outside / "dir" / "through-link.fits", seed=10)
    os.symlink(outside / "dir", m / "linked-folder")
    os.symlink(outside / "dir", m / "folder-link.fits")
    os.mkfifo(m / "pipe.fits")
    sock = _socket_at(m / "sock.fits")
    (m / "empty.fits").write_bytes(b"")
    write_fits(Path(os.fsdecode(os.path.join(os.fsencode(m), b"new\nline.fits"))), seed=11)
    latin1 = os.path.join(os.fsencode(m), b"caf\xe9.fits")
    with open(latin1, "wb") as fh:
        fh.write(fits_bytes(seed=12))
    long_name = "L" * 250 + ".fits"
    assert len(long_name.encode()) == 255
    write_fits(m / long_name, seed=13)
    expected = {
        m / "link-to-file.fits": "symbolic link",
        m / "link-outside.fits": "symbolic link",
        m / "link-relative-up.fits": "symbolic link",
        m / "folder-link.fits": "symbolic link",
        m / "pipe.fits": "is a FIFO",
        m / "sock.fits": "is a socket",
        m / "empty.fits": "empty file",
        os.path.join(os.fsencode(m), b"new\nline.fits"): "U+000A",
        latin1: "not valid UTF-8",
        m / long_name: "255 bytes long",
    }
    if is_root():
        os.mknod(m / "device.fits", stat.S_IFCHR | 0o600, os.makedev(1, 3))
        expected[m / "device.fits"] = "is a character device"
    else:
        print("device node case skipped: os.mknod of a character device needs root")
    time.sleep(0.6)
    try:
        with daemon(sandbox, notify) as proc:
            for path, reason in expected.items():
                row = wait_for(lambda p=path: rejected(sandbox, p), timeout=30,
                               what=f"rejection of {path!r}")
                assert reason in (row.publish_error or ""), (path, row.publish_error)
                assert row.checksum is None
            good = write_fits(m / "after-the-bad-ones.fits", seed=14)
            wait_for(lambda: registered(sandbox, m / "after-the-bad-ones.fits"), timeout=30,
                     what="the good file")
            wait_for(lambda: registered(sandbox, m / "inside-target.fits"), timeout=30,
                     what="the link's target itself")
            assert proc.poll() is None
    finally:
        sock.close()
    assert registered(sandbox, m / "after-the-bad-ones.fits").checksum == sha256(good)
    assert registered(sandbox, m / "inside-target.fits").checksum == sha256(inside)
    # Non-UTF-8 bytes: stored losslessly, shown escaped.
    row = rejected(sandbox, latin1)
    assert row.stage_path_bytes == latin1
    assert row.stage_path.endswith("caf\\xe9.fits")
    assert paths.undisplay(row.stage_path) == latin1
    assert rejected(sandbox, os.path.join(os.fsencode(m), b"new\nline.fits")
                    ).stage_path.endswith("new\\nline.fits")
    # Nothing below the linked folder was taken, nor anything published that was rejected.
    assert not any(b"through-link" in r.stage_bytes for r in rows(sandbox))
    published = sorted(p.name for p in sandbox.products.rglob("*.fits"))
    assert published == ["after-the-bad-ones.fits", "inside-target.fits"]
    assert (outside / "real.fits").exists() and (m / "link-outside.fits").is_symlink()
    assert stat.S_ISFIFO(os.lstat(m / "pipe.fits").st_mode)


def test_link_in_a_parent_component_is_refused(sandbox: Sandbox, inproc: InProcess,
                                               tmp_path: Path) -> None:
    """An event naming a file below a linked folder must not be followed into the target."""
    target = tmp_path / "elsewhere"
    write_fits(target / "a.fits", seed=1)
    os.symlink(target, sandbox.mosaics / "night")
    [out] = inproc.settle(sandbox.mosaics / "night" / "a.fits")
    assert out.action == "rejected"
    assert "symbolic link" in (out.reason or "")
    [row] = [r for r in inproc.registry.products() if r.status == "rejected"]
    assert row.stage_path == str(sandbox.mosaics / "night" / "a.fits")
    assert (target / "a.fits").exists()


def test_file_that_vanishes_before_its_checks_is_dropped(sandbox: Sandbox, inproc: InProcess
                                                         ) -> None:
    """A file deleted while it settles leaves no row and no error behind."""
    path = sandbox.mosaics / "gone.fits"
    write_fits(path)
    inproc.detector.note(os.fsencode(path))
    path.unlink()
    time.sleep(0.6)
    outs = inproc.detector.process(now=time.time())
    assert [o.action for o in outs] == ["vanished"]
    assert inproc.registry.products() == []
    assert inproc.detector.pending == {}


@pytest.mark.parametrize("change", ["replaced", "vanished"])
def test_file_changed_while_being_read_goes_back_to_waiting(sandbox: Sandbox,
                                                            inproc: InProcess,
                                                            change: str) -> None:
    """A name that leads to another file, or to nothing, once the content has been read must
    not be registered with the checksum of the file that was read."""
    path = sandbox.mosaics / "swap.fits"
    write_fits(path, seed=1)
    root_fd = paths.open_root(os.fsencode(sandbox.stage))
    real_scan = fits_mod.scan_fits
    replaced = write_fits(sandbox.root / "replacement.fits", seed=2)

    def scan_then_replace(fd: int, algorithm: str = "sha256"):  # noqa: ANN202
        report = real_scan(fd, algorithm=algorithm)
        if change == "replaced":
            os.replace(sandbox.root / "replacement.fits", path)
        else:
            path.unlink()
        return report

    try:
        with pytest.MonkeyPatch.context() as mp:
            # The replacement happens between the read and the final identity check.
            mp.setattr(fits_mod, "scan_fits", scan_then_replace)
            with pytest.raises(detect.NotReady):
                content.describe_file(root_fd, (b"mosaics", b"swap.fits"), "sha256")
    finally:
        os.close(root_fd)
    outs = inproc.settle(path)
    if change == "replaced":
        assert [o.action for o in outs] == ["registered"]
        assert inproc.registry.products()[0].checksum == sha256(replaced)
    else:
        assert [o.action for o in outs] == ["vanished"]
        assert inproc.registry.products() == []


# --- many files, lost events -----------------------------------------------------------------

BURST = textwrap.dedent("""
    import os, sys
    top, count = sys.argv[1], int(sys.argv[2])
    data = sys.stdin.buffer.read()
    for i in range(count):
        folder = os.path.join(top, f"b{i // 1000:02}")
        os.makedirs(folder, exist_ok=True)
        with open(os.path.join(folder, f"m{i:05}.fits"), "wb") as fh:
            fh.write(data)
""")


def burst(top: Path, count: int, data: bytes) -> list[Path]:
    """`count` small mosaics written as fast as a separate process can, in new folders."""
    subprocess.run([sys.executable, "-c", BURST, str(top), str(count)], input=data, check=True)
    return [top / f"b{i // 1000:02}" / f"m{i:05}.fits" for i in range(count)]


def counts_by_path(sandbox: Sandbox) -> dict[bytes, list[str]]:
    out: dict[bytes, list[str]] = {}
    for r in rows(sandbox):
        out.setdefault(r.stage_bytes, []).append(r.status)
    return out


@pytest.mark.slow
def test_burst_of_10000_files_all_registered_once(sandbox: Sandbox, notify: NotifySocket
                                                  ) -> None:
    """Files created faster than they can be described, in folders created during the burst
    (before their watch exists): each is registered exactly once."""
    sandbox.update(detect={"settle_seconds": 0.2})
    data = fits_bytes(pixels=4, checksum=True)
    with daemon(sandbox, notify) as proc:
        written = burst(sandbox.mosaics / "burst", 10_000, data)
        wait_for(lambda: len(counts_by_path(sandbox)) == 10_000, timeout=600, interval=1.0,
                 what="10,000 files registered")
        time.sleep(1.0)    # anything registered twice would show up by now
        found = counts_by_path(sandbox)
        assert proc.poll() is None
    assert set(found) == {os.fsencode(p) for p in written}
    assert all(len(v) == 1 and v[0] in TAKEN for v in found.values())
    assert {r.checksum for r in rows(sandbox)} == {sha256(data)}


@pytest.mark.slow
def test_mosaic_staged_after_ready_is_registered_by_the_watch(make_sandbox: MakeSandbox,
                                                             notify: NotifySocket) -> None:
    """The watch, not a rescan, finds a mosaic staged once the daemon is up: the periodic
    rescan is an hour away, and the start-up walk saw an empty staging area."""
    sandbox = make_sandbox(detect={"settle_seconds": 0.5, "rescan_seconds": 3600},
                           metrics={"enabled": False})
    with daemon(sandbox, notify):
        staged = sandbox.mosaics / "nightly_20250101.fits"
        data = write_fits(staged, seed=11)
        wait_for(lambda: any(r.stage_path == str(staged) and r.status == "published"
                             for r in rows(sandbox)),
                 timeout=30, interval=0.1, what="the mosaic staged after READY published")
    (row,) = rows(sandbox)
    assert row.checksum == sha256(data)
    assert Path(row.published_path or "").read_bytes() == data
    log = (sandbox.root / "daemon.log").read_text()
    assert "watch_unavailable" not in log and "watch_degraded" not in log, log[-2000:]


@pytest.mark.slow
def test_watch_lost_with_its_root_is_restarted_and_logged(make_sandbox: MakeSandbox,
                                                          notify: NotifySocket) -> None:
    """The staging root removed and made again: the watch on the old folder ended with it;
    the daemon logs it, restarts the watch, and the watch finds the next mosaic (the
    periodic rescan is an hour away)."""
    sandbox = make_sandbox(detect={"settle_seconds": 0.3, "rescan_seconds": 3600},
                           metrics={"enabled": False})
    with daemon(sandbox, notify):
        shutil.rmtree(sandbox.stage)
        wait_for(lambda: "watch_restarting" in (sandbox.root / "daemon.log").read_text(),
                 timeout=30, interval=0.1, what="the watch restarted")
        sandbox.mosaics.mkdir(parents=True, exist_ok=True)
        staged = sandbox.mosaics / "group_3.fits"
        data = write_fits(staged, seed=12)
        wait_for(lambda: any(r.stage_path == str(staged) and r.status == "published"
                             for r in rows(sandbox)),
                 timeout=30, interval=0.1, what="the mosaic staged after the restart published")
    (row,) = rows(sandbox)
    assert Path(row.published_path or "").read_bytes() == data
    events = [json.loads(line) for line in (sandbox.root / "daemon.log").read_text().splitlines()
              if line.startswith("{")]
    degraded = [e for e in events if e.get("event") == "watch_degraded"]
    assert any("went away" in e["reason"] for e in degraded), degraded


@pytest.mark.slow
@pytest.mark.root("lowering fs.inotify.max_queued_events needs root")
def test_overflowed_event_queue_is_recovered_by_rescan(make_sandbox: MakeSandbox,
                                                       notify: NotifySocket) -> None:
    """When the kernel drops events (queue overflow), the rescan that the lost events start
    finds every file: the periodic rescan is an hour away."""
    sandbox = make_sandbox(detect={"settle_seconds": 0.2, "rescan_seconds": 3600},
                           metrics={"enabled": False})
    data = fits_bytes(pixels=4)
    with open(QUEUED_EVENTS) as fh:
        saved = fh.read().strip()
    try:
        # The limit applies to inotify instances created after the change: set it first.
        with open(QUEUED_EVENTS, "w") as fh:
            fh.write("16")
        with daemon(sandbox, notify) as proc:
            with open(QUEUED_EVENTS, "w") as fh:  # the daemon's instance has it now
                fh.write(saved)
            written = burst(sandbox.mosaics / "flood", 3000, data)
            wait_for(lambda: len(counts_by_path(sandbox)) == 3000, timeout=300, interval=0.5,
                     what="3,000 files registered")
            assert proc.poll() is None
    finally:
        with open(QUEUED_EVENTS, "w") as fh:
            fh.write(saved)
    with open(QUEUED_EVENTS) as fh:
        assert fh.read().strip() == saved
    found = counts_by_path(sandbox)
    assert set(found) == {os.fsencode(p) for p in written}
    assert all(len(v) == 1 and v[0] in TAKEN for v in found.values())
    log = (sandbox.root / "daemon.log").read_text()
    assert "inotify event queue overflowed" in log and "max_queued_events=16" in log


def test_future_mtime_does_not_delay_registration(sandbox: Sandbox, inproc: InProcess) -> None:
    """Copies that keep their timestamps (cp -p, tar, rsync -t from a host whose clock runs
    ahead) may carry an mtime in the future; only the ctime says when the file last changed."""
    sandbox.update(products=[
        {"type": "mosaic", "glob": "mosaics/**/*.fits", "destination": "mosaics"},
        {"type": "image", "glob": "images/*.image", "destination": "images",
         "kind": "directory", "required": ["table.dat"]},
    ])
    inproc.detector.reconfigure(sandbox.config())
    future = time.time() + 30 * 86400
    path = sandbox.mosaics / "from-the-future.fits"
    data = write_fits(path, seed=4)
    os.utime(path, (future, future))
    image = sandbox.stage / "images" / "skewed.image"
    image.mkdir(parents=True)
    (image / "table.dat").write_bytes(b"table")
    os.utime(image / "table.dat", (future, future))
    outs = inproc.settle(path) + inproc.settle(image)
    assert sorted(o.action for o in outs) == ["registered", "registered"]
    by_path = {r.stage_path: r for r in inproc.registry.products()}
    assert by_path[str(path)].checksum == sha256(data)
    assert by_path[str(image)].status == "staging"


@pytest.mark.slow
def test_folder_product_losing_a_file_while_being_read_is_not_marked_gone(
        sandbox: Sandbox, inproc: InProcess, monkeypatch: pytest.MonkeyPatch) -> None:
    """CASA rewrites image folders in place, removing files as it goes: a file that vanishes
    inside a registered folder while it is being read means the folder is still changing, not
    that the product left the staging area."""
    sandbox.update(products=[{"type": "image", "glob": "images/*.image", "destination": "images",
                              "kind": "directory", "required": ["table.dat"]}])
    inproc.detector.reconfigure(sandbox.config())
    image = sandbox.stage / "images" / "field.image"
    image.mkdir(parents=True)
    (image / "table.dat").write_bytes(b"table")
    (image / "table.f0").write_bytes(b"zero")
    (image / "table.f9").write_bytes(b"nine")
    [first] = inproc.settle(image)
    assert first.action == "registered"
    (image / "table.f0").write_bytes(b"zero, rewritten")
    real_hash = fits_mod.hash_fd
    removed: list[str] = []

    def hash_then_remove(fd: int, algorithm: str = "sha256"):  # noqa: ANN202
        if not removed:
            removed.append("table.f9")
            (image / "table.f9").unlink()
        return real_hash(fd, algorithm=algorithm)

    monkeypatch.setattr(fits_mod, "hash_fd", hash_then_remove)
    outs = inproc.settle(image)
    assert removed == ["table.f9"]
    assert [o.action for o in outs] == ["updated"], [(o.action, o.reason) for o in outs]
    [row] = inproc.registry.products()
    assert row.status == "staging" and row.metadata["files"] == 2
    assert row.checksum not in (None, first.product.checksum)


def test_product_deleted_before_publishing_then_staged_again(sandbox: Sandbox,
                                                             inproc: InProcess) -> None:
    """A waiting product whose file is removed is recorded as gone, with the reason; the same
    name staged again later is a product again, with the new content's checksum."""
    path = sandbox.mosaics / "again.fits"
    write_fits(path, seed=1)
    [first] = inproc.settle(path)
    assert first.action == "registered"
    path.unlink()
    inproc.detector.forget(os.fsencode(path))
    [row] = inproc.registry.products()
    assert row.status == "rejected" and "left the staging area" in (row.publish_error or "")
    data = write_fits(path, seed=2)
    outs = inproc.settle(path)
    assert [o.action for o in outs] == ["updated"]
    [row] = inproc.registry.products()
    assert (row.status, row.checksum, row.publish_error) == ("staging", sha256(data), None)


def as_nobody(home: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """Python run as the unprivileged user nobody, as the daemon runs under systemd."""
    return subprocess.run(
        ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", sys.executable, *args],
        capture_output=True, text=True, timeout=120, cwd=REPO,
        env={**os.environ, "HOME": str(home), "XDG_CACHE_HOME": str(home / ".cache"),
             "XDG_CONFIG_HOME": str(home / ".config")})


@pytest.fixture
def nobody_sandbox(as_root: None, setpriv: str) -> Iterator[tuple[Path, Sandbox, Path]]:
    """(base, sandbox, night folder) in a fresh folder that the user nobody can reach (pytest's
    tmp_path lies under root's private folder); removed afterwards."""
    base = Path(tempfile.mkdtemp(prefix="contimg-perm-"))
    try:
        base.chmod(0o755)
        sandbox = Sandbox(base, detect={"settle_seconds": 0.2}, metrics={"enabled": False})
        yield base, sandbox, sandbox.mosaics / "night"
    finally:
        shutil.rmtree(base, ignore_errors=True)


@pytest.mark.slow
@pytest.mark.root("running as the user nobody (setpriv) and chowning the tree")
def test_unreadable_folder_does_not_make_its_products_gone(nobody_sandbox) -> None:
    """A folder the daemon cannot list for a while (a wrong chmod by the pipeline) is not
    proof that the product in it left the staging area: it must stay waiting, and still be
    waiting once the folder is readable again."""
    base, sandbox, night = nobody_sandbox
    path = night / "x.fits"
    data = write_fits(path, seed=5)
    st = path.stat()
    with Registry(sandbox.registry) as reg:
        # Registered and held: a scan describes the folder but publishes nothing.
        reg.register(Candidate("night/x", "mosaic", str(sandbox.stage), str(path),
                               os.fsencode(path),
                               Identity(st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns,
                                        st.st_ctime_ns), sha256(data), {}))
        assert reg.set_hold("night/x", True)
    for item in [base, *base.rglob("*")]:
        os.chown(item, 65534, 65534, follow_symlinks=False)

    def scan_as_nobody() -> str:
        out = as_nobody(base, "-m", "contimg_publisher", "--config",
                        str(sandbox.config_path), "scan")
        assert out.returncode == 0, out.stdout + out.stderr
        with Registry(sandbox.registry) as reg:
            row = reg.get("night/x")
        assert row is not None
        return row.status

    assert scan_as_nobody() == "staging"
    night.chmod(0o000)
    try:
        during = scan_as_nobody()
    finally:
        night.chmod(0o755)
    after = scan_as_nobody()
    assert (during, after) == ("staging", "staging")
    assert path.read_bytes() == data


CHECK_ONE = textwrap.dedent("""
    import json, os, sys, time
    from contimg_publisher import config, detect
    from contimg_publisher.registry import Registry
    cfg = config.load(sys.argv[1])
    with Registry(cfg.registry) as reg:
        detector = detect.Detector(cfg, reg)
        detector.note(os.fsencode(sys.argv[2]))
        outs = detector.process(now=time.time() + 3600)
        print(json.dumps([[o.action, o.reason] for o in outs]))
""")


@pytest.mark.root("running as the user nobody (setpriv) and chowning the tree")
def test_pending_file_in_a_folder_that_became_unreadable_is_rejected_not_a_crash(
        nobody_sandbox) -> None:
    """An event named a file, then its folder lost its read and search permission before the
    file settled: the check must record why it cannot proceed, not raise out of the loop."""
    base, sandbox, night = nobody_sandbox
    write_fits(night / "x.fits", seed=5)
    sandbox.registry.parent.mkdir(parents=True, exist_ok=True)
    for item in [base, *base.rglob("*")]:
        os.chown(item, 65534, 65534, follow_symlinks=False)
    night.chmod(0o000)
    try:
        out = as_nobody(base, "-c", CHECK_ONE, str(sandbox.config_path),
                        str(night / "x.fits"))
    finally:
        night.chmod(0o755)
    assert out.returncode == 0, out.stdout + out.stderr
    [[action, reason]] = json.loads(out.stdout)
    assert action == "rejected" and "Permission denied" in reason, reason
    with Registry(sandbox.registry) as reg:
        [row] = reg.products()
    assert row.status == "rejected" and row.publish_error == reason
    # Once the folder is readable again the next scan takes the file.
    out = as_nobody(base, "-m", "contimg_publisher", "--config", str(sandbox.config_path),
                    "scan")
    assert out.returncode == 0, out.stdout + out.stderr
    with Registry(sandbox.registry) as reg:
        [row] = reg.products()
    assert row.status == "published", (row.status, row.publish_error)


# --- folder descriptors shared within one pass ---------------------------------------------------

def test_folder_replaced_by_a_link_in_the_middle_of_a_pass_is_refused(
        sandbox: Sandbox, inproc: InProcess, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The files of one folder share its descriptor within a pass, so each use looks the
    folder up again: a folder renamed and replaced by a link while a file in it is read
    leaves that file waiting, and the next file of the same pass is refused as a link."""
    night = sandbox.mosaics / "night"
    write_fits(night / "a.fits", seed=1)
    write_fits(night / "b.fits", seed=2)
    moved = tmp_path / "moved"
    real_scan = fits_mod.scan_fits

    def scan_then_swap(fd: int, algorithm: str = "sha256"):  # noqa: ANN202
        report = real_scan(fd, algorithm=algorithm)
        if not moved.exists():
            os.rename(night, moved)
            os.symlink(moved, night)
        return report

    monkeypatch.setattr(fits_mod, "scan_fits", scan_then_swap)
    inproc.detector.note(os.fsencode(night / "a.fits"))
    inproc.detector.note(os.fsencode(night / "b.fits"))
    outs = inproc.detector.process(now=time.time() + 3600)
    assert [(o.action, o.stage_path) for o in outs] == [("rejected", str(night / "b.fits"))]
    assert "symbolic link" in (outs[0].reason or "")
    # The file that was being read is not registered with what was read: it waits, and is
    # refused on its next check.
    assert list(inproc.detector.pending) == [(b"mosaics", b"night", b"a.fits")]
    outs = inproc.detector.process(now=time.time() + 7200)
    assert [(o.action, o.stage_path) for o in outs] == [("rejected", str(night / "a.fits"))]
    assert "symbolic link" in (outs[0].reason or "")
    assert {r.status for r in inproc.registry.products()} == {"rejected"}


def test_folder_replaced_between_passes_is_walked_afresh(sandbox: Sandbox, inproc: InProcess,
                                                        tmp_path: Path) -> None:
    """No folder descriptor outlives its pass: a folder renamed away and replaced, first by a
    link to it and then by a new folder, is seen as what the name now leads to."""
    night = sandbox.mosaics / "night"
    write_fits(night / "a.fits", seed=1)
    [first] = inproc.settle(night / "a.fits")
    assert first.action == "registered"
    moved = tmp_path / "moved"
    os.rename(night, moved)
    os.symlink(moved, night)
    [out] = inproc.settle(night / "a.fits")
    assert out.action == "rejected" and "symbolic link" in (out.reason or "")
    night.unlink()
    data = write_fits(night / "a.fits", seed=3)
    [out] = inproc.settle(night / "a.fits")
    assert out.action in ("registered", "updated"), (out.action, out.reason)
    assert out.product is not None and out.product.checksum == sha256(data)


def _package_imports() -> dict[str, set[str]]:
    """Each module of the package with the package's modules it imports (at the top or in a
    function: an import deferred to run time still ties the two)."""
    import ast
    top = REPO / "daemon"
    files = {".".join(f.relative_to(top).with_suffix("").parts).removesuffix(".__init__"): f
             for f in (top / "contimg_publisher").rglob("*.py")}

    def module_of(name: str) -> str | None:
        while name and name not in files:
            name = name.rpartition(".")[0]
        return name or None

    graph: dict[str, set[str]] = {}
    for name, path in files.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        found: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                found |= {a.name for a in node.names}
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    parent = package.rsplit(".", node.level - 1)[0] if node.level > 1 \
                        else package
                    base = f"{parent}.{base}" if base else parent
                found |= {f"{base}.{a.name}" if f"{base}.{a.name}" in files else base
                          for a in node.names}
        graph[name] = {m for f in found if (m := module_of(f)) not in (None, name)}
    return graph


def test_rule_matching_stands_below_detection_and_the_archive() -> None:
    """rules.py answers which rule a path belongs to for detection, the archive, rebuild
    and the audit; it imports none of them, and nothing in the package imports in a loop."""
    graph = _package_imports()
    assert "contimg_publisher.rules" in graph
    below = {"contimg_publisher.detect", "contimg_publisher.archive",
             "contimg_publisher.kinds", "contimg_publisher.rebuild", "contimg_publisher.audit"}
    assert not graph["contimg_publisher.rules"] & below
    assert "contimg_publisher.detect" not in graph["contimg_publisher.archive"]

    def reaches(start: str, goal: str) -> bool:
        seen, todo = set(), [start]
        while todo:
            for nxt in graph[todo.pop()] - seen:
                if nxt == goal:
                    return True
                seen.add(nxt)
                todo.append(nxt)
        return False

    loops = sorted(m for m in graph if reaches(m, m))
    assert not loops, f"modules in an import cycle: {loops}"
