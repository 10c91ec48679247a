"""Deep and long trees around the daemon: staging folders thousands of levels deep (paths
far over PATH_MAX, 4,096 bytes), a folder product holding such a chain, and an archive with
one. Real trees made with mkdir relative to folder descriptors, real daemon processes and the
real commands. Nothing may end the daemon or a command; what is not walked is said, with
the reason."""

from __future__ import annotations

import json
import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from contimg_publisher import detect, paths, treewalk
from contimg_publisher import fits as fits_mod
from contimg_publisher.publish import CRASH_ENV, CrashPoint
from contimg_publisher.registry import Registry
from tests.helpers import (
    MakeSandbox,
    Sandbox,
    fits_bytes,
    log_events,
    mount_tmpfs,
    start_daemon,
    stop,
    umount,
    wait_for,
    write_fits,
)
from tests.test_service import NotifySocket

DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW


def make_chain(parent: Path, names: list[bytes]) -> None:
    """Folders parent/names[0]/names[1]/..., each made relative to its parent's descriptor:
    a path of any length can be made this way."""
    fd = os.open(parent, DIR_FLAGS)
    try:
        for name in names:
            os.mkdir(name, dir_fd=fd)
            nxt = os.open(name, DIR_FLAGS, dir_fd=fd)
            os.close(fd)
            fd = nxt
    finally:
        os.close(fd)


def write_at(parent: Path, names: list[bytes], leaf: bytes, data: bytes) -> None:
    """A file at parent/names.../leaf, reached through descriptors."""
    fd = os.open(parent, DIR_FLAGS)
    try:
        for name in names:
            nxt = os.open(name, DIR_FLAGS, dir_fd=fd)
            os.close(fd)
            fd = nxt
        out = os.open(leaf, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644, dir_fd=fd)
        try:
            os.write(out, data)
        finally:
            os.close(out)
    finally:
        os.close(fd)


def exists_at(parent: Path, names: list[bytes]) -> bool:
    fd = os.open(parent, DIR_FLAGS)
    try:
        for name in names[:-1]:
            nxt = os.open(name, DIR_FLAGS, dir_fd=fd)
            os.close(fd)
            fd = nxt
        os.stat(names[-1], dir_fd=fd, follow_symlinks=False)
        return True
    except FileNotFoundError:
        return False
    finally:
        os.close(fd)


@pytest.fixture
def deep_cleanup(tmp_path: Path) -> Iterator[Path]:
    """tmp_path, emptied with rm -rf afterwards: shutil.rmtree (pytest's clean-up) recurses
    and fails on a chain thousands of folders deep."""
    yield tmp_path
    subprocess.run(["rm", "-rf", "--one-file-system", str(tmp_path)], check=False,
                   timeout=300)


def _events(box: Sandbox, name: str) -> list[dict[str, Any]]:
    return [e for e in log_events(box) if e.get("event") == name]


def _alive(box: Sandbox, proc: subprocess.Popen[str]) -> None:
    """Fails at once, with the end of its log, when the daemon has exited."""
    code = proc.poll()
    if code is not None:
        raise AssertionError(f"the daemon exited {code}:\n"
                             + (box.root / "daemon.log").read_text()[-3000:])


def _ready(box: Sandbox, proc: subprocess.Popen[str], notify: NotifySocket) -> None:
    def ready() -> bool:
        _alive(box, proc)
        return bool([m for _t, m in notify.with_key("READY") if m["READY"] == "1"])
    wait_for(ready, timeout=90, interval=0.1, what="READY=1")


def _published(box: Sandbox, data_ids: set[str], proc: subprocess.Popen[str] | None = None
               ) -> dict[str, dict[str, Any]]:
    def done() -> dict[str, dict[str, Any]] | None:
        if proc is not None:
            _alive(box, proc)
        rows = {r["data_id"]: r for r in box.registry_rows()}
        if all(rows.get(d, {}).get("status") == "published" for d in data_ids):
            return rows
        return None
    return wait_for(done, timeout=90, interval=0.3, what=f"{sorted(data_ids)} published")


@pytest.mark.slow
def test_staging_tree_2100_deep_daemon_ready_and_publishes_beside_it(
        deep_cleanup: Path) -> None:
    """A chain of 2,100 folders (paths over 10,000 bytes) under the mosaics folder: the
    daemon reaches READY, stays up, says which folder it did not walk and why, and publishes
    the mosaic beside the chain and one 22 long-named folders down (a path over 4,096 bytes
    within the depth limit: path length alone never stops a product)."""
    box = Sandbox(deep_cleanup)
    box.update(detect={"rescan_seconds": 3})
    make_chain(box.mosaics, [b"abyss"] + [b"deep"] * 2099)
    long_names = [bytes([ord("a") + i % 26]) * 200 for i in range(22)]
    make_chain(box.mosaics, long_names)
    far = write_fits(deep_cleanup / "far.fits", seed=2)
    write_at(box.mosaics, long_names, b"far.fits", far)
    assert len(os.fsencode(str(box.mosaics))) + 22 * 201 + 9 > 4096
    ordinary = write_fits(box.mosaics / "ordinary.fits", seed=1)
    notify = NotifySocket(deep_cleanup / "notify.sock")
    proc = start_daemon(box, notify.path)
    try:
        _ready(box, proc, notify)
        far_id = "/".join(n.decode() for n in long_names) + "/far"
        rows = _published(box, {"ordinary", far_id}, proc)
        assert (box.products / "mosaics" / "ordinary.fits").read_bytes() == ordinary
        assert exists_at(box.products / "mosaics", [*long_names, b"far.fits"])
        assert not exists_at(box.mosaics, [*long_names, b"far.fits"])
        assert rows[far_id]["stage_path"].endswith("/far.fits")
        # Published after READY too (by the watch, or a rescan): the loop goes on.
        later = write_fits(box.mosaics / "later.fits", seed=3)
        _published(box, {"later"}, proc)
        assert (box.products / "mosaics" / "later.fits").read_bytes() == later
        assert proc.poll() is None, "the daemon exited"
        said = _events(box, "folder_not_walked")
        assert said, "the folder not walked was not logged"
        first = said[0]
        assert first["problem"] == "too_deep"
        assert "256 levels" in first["error"]
        assert first["path"].startswith(str(box.mosaics / "abyss" / "deep"))
        assert "levels" in first["path"] and len(first["path"]) < 400
        # Said once while it lasts, not at every rescan.
        wait_for(lambda: len(_events(box, "rescan")) >= 3, timeout=30, what="two more rescans")
        assert len(_events(box, "folder_not_walked")) == 1
        assert not _events(box, "loop_error")
    finally:
        code = stop(proc)
        notify.close()
    assert code == 0, (box.root / "daemon.log").read_text()[-3000:]


@pytest.mark.slow
def test_deep_folder_moved_in_later_the_watch_comes_back_and_publishing_goes_on(
        deep_cleanup: Path) -> None:
    """A chain of 1,100 folders moved into a watched staging area: watchdog's own walk of
    it (os.walk, which recurses on Python 3.11) kills its thread; the watch reports itself
    unhealthy, the daemon restarts it (relying on rescans while it cannot be set up), stays
    up, says which folder it did not walk and why, and publishes a mosaic staged after."""
    box = Sandbox(deep_cleanup)
    box.update(detect={"rescan_seconds": 3})
    first = write_fits(box.mosaics / "first.fits", seed=1)
    notify = NotifySocket(deep_cleanup / "notify.sock")
    proc = start_daemon(box, notify.path)
    try:
        _ready(box, proc, notify)
        _published(box, {"first"}, proc)
        assert _events(box, "started")[0]["watching"] is True
        make_chain(deep_cleanup, [b"incoming"] + [b"d"] * 1099)
        os.rename(deep_cleanup / "incoming", box.mosaics / "incoming")
        wait_for(lambda: _events(box, "folder_not_walked"), timeout=60,
                 what="the deep folder reported")
        later = write_fits(box.mosaics / "later.fits", seed=3)
        _published(box, {"later"}, proc)
        assert (box.products / "mosaics" / "later.fits").read_bytes() == later
        assert (box.products / "mosaics" / "first.fits").read_bytes() == first
        said = _events(box, "folder_not_walked")[0]
        assert said["problem"] == "too_deep"
        assert said["path"].startswith(str(box.mosaics / "incoming" / "d" / "d"))
        assert proc.poll() is None
        assert not _events(box, "loop_error")
    finally:
        code = stop(proc)
        notify.close()
    assert code == 0, (box.root / "daemon.log").read_text()[-3000:]
    # watchdog's thread died on the chain: healthy() said so and the loop restarted the
    # watch (which cannot be set up again while the chain is there: rescans take over).
    assert _events(box, "watch_restarting")


@pytest.mark.slow
def test_folder_product_holding_a_1100_level_chain_is_rejected(deep_cleanup: Path) -> None:
    """A CASA image folder with a chain of 1,100 folders inside: rejected with a reason that
    names the depth limit; the daemon stays up and the other products publish."""
    box = Sandbox(deep_cleanup, products=[
        {"type": "mosaic", "glob": "mosaics/**/*.fits", "destination": "mosaics"},
        {"type": "image", "glob": "images/*.image", "destination": "images",
         "kind": "directory", "required": ["table.dat"]},
    ])
    bad = box.stage / "images" / "deep.image"
    bad.mkdir(parents=True)
    (bad / "table.dat").write_bytes(b"table")
    make_chain(bad, [b"d"] * 1100)
    good = box.stage / "images" / "good.image"
    good.mkdir()
    (good / "table.dat").write_bytes(b"good table")
    (good / "sub").mkdir()
    (good / "sub" / "data.bin").write_bytes(os.urandom(4000))
    mosaic = write_fits(box.mosaics / "m.fits", seed=4)
    notify = NotifySocket(deep_cleanup / "notify.sock")
    proc = start_daemon(box, notify.path)
    try:
        _ready(box, proc, notify)
        _published(box, {"m", "good"}, proc)

        def rejected() -> dict[str, Any] | None:
            _alive(box, proc)
            row = box.row("deep")
            return row if row is not None and row["status"] == "rejected" else None
        row = wait_for(rejected, timeout=60, interval=0.3, what="deep.image rejected")
        assert "more than 256 levels of folders deep" in row["publish_error"]
        assert row["publish_error"].startswith("d/d/d/")
        assert (box.products / "mosaics" / "m.fits").read_bytes() == mosaic
        assert (box.products / "images" / "good.image" / "sub" / "data.bin").exists()
        assert bad.is_dir() and not (box.products / "images" / "deep.image").exists()
        assert proc.poll() is None, "the daemon exited"
        assert not _events(box, "loop_error")
    finally:
        code = stop(proc)
        notify.close()
    assert code == 0, (box.root / "daemon.log").read_text()[-3000:]


@pytest.mark.slow
def test_audit_and_rebuild_report_a_deep_chain_in_the_archive(deep_cleanup: Path) -> None:
    """An archived folder product with a 1,100-level chain inside, and a dark chain of
    1,100 folders beside it: the audit reports the product as not read back whole, the
    rebuild lists what it did not walk; neither crashes, and the rest is still done."""
    box = Sandbox(deep_cleanup, products=[
        {"type": "mosaic", "glob": "mosaics/**/*.fits", "destination": "mosaics"},
        {"type": "image", "glob": "images/*.image", "destination": "images",
         "kind": "directory", "required": ["table.dat"]},
    ])
    image = box.stage / "images" / "x.image"
    image.mkdir(parents=True)
    (image / "table.dat").write_bytes(b"table")
    write_fits(box.mosaics / "a.fits", seed=1)
    box.cli("scan", check=True)
    _published(box, {"a", "x"})
    archived = box.products / "images" / "x.image"
    make_chain(archived, [b"d"] * 1100)
    make_chain(box.products / "mosaics", [b"junk"] * 1100)

    out = box.cli("audit", "--json")
    assert out.returncode == 1 and "Traceback" not in out.stderr, out.stderr[-3000:]
    report = json.loads(out.stdout)
    assert report["checked"] == 2
    by_path = {f["path"]: f for f in report["findings"]}
    finding = by_path[str(archived)]
    assert finding["kind"] == "unreadable"
    assert "more than 256 levels of folders deep" in finding["detail"]
    assert str(box.products / "mosaics" / "junk") in by_path  # the dark chain, not entered

    for suffix in ("", "-wal", "-shm"):
        Path(f"{box.registry}{suffix}").unlink(missing_ok=True)
    out = box.cli("rebuild", "--from-archive", "--json")
    assert out.returncode == 1 and "Traceback" not in out.stderr, out.stderr[-3000:]
    rebuilt = json.loads(out.stdout)
    assert [r["data_id"] for r in rebuilt["created"]] == ["a"]
    skipped = {s["path"]: s["reason"] for s in rebuilt["skipped"]}
    assert "more than 256 levels of folders deep" in skipped[str(archived)]
    deep_junk = [p for p in skipped if p.startswith(str(box.products / "mosaics" / "junk"))]
    assert len(deep_junk) == 1
    assert "more than 256 levels of folders deep" in skipped[deep_junk[0]]


@pytest.mark.slow
@pytest.mark.root("a products area on a tmpfs of its own needs root")
def test_a_copy_interrupted_at_a_path_over_path_max_is_reconciled(deep_cleanup: Path) -> None:
    """A mosaic 22 long-named folders down (its paths over 4,096 bytes) whose copy to
    another filesystem is killed after its temporary file is written: the next pass
    reconciles it through descriptors (the temporary removed) and publishes it, instead of
    ending on the length of the recorded temporary name."""
    products = deep_cleanup / "products"
    mount_tmpfs(products, "64m")
    try:
        box = Sandbox(deep_cleanup, products_root=products)
        long_names = [bytes([ord("a") + i % 26]) * 200 for i in range(22)]
        make_chain(box.mosaics, long_names)
        data = fits_bytes(seed=5)
        write_at(box.mosaics, long_names, b"far.fits", data)
        time.sleep(box.config().settle_seconds + 0.2)
        crashed = box.cli("scan", env={CRASH_ENV: CrashPoint.AFTER_TEMP_WRITE})
        assert crashed.returncode == -9, crashed.stderr[-2000:]
        [row] = box.registry_rows()
        assert row["status"] == "publishing"
        again = box.cli("scan")
        assert again.returncode == 0 and "Traceback" not in again.stderr, again.stderr[-3000:]
        [row] = box.registry_rows()
        assert row["status"] == "published"
        final = [*long_names, b"far.fits"]
        assert exists_at(products / "mosaics", final)
        fd = _open_path(products / "mosaics", long_names)
        try:
            assert sorted(os.listdir(fd)) == ["far.fits"]  # the temporary is gone
            with open(os.open(b"far.fits", os.O_RDONLY, dir_fd=fd), "rb") as f:
                assert f.read() == data
        finally:
            os.close(fd)
    finally:
        umount(products)


def test_one_paths_unexpected_failure_does_not_stop_the_others(
        make_sandbox: MakeSandbox, monkeypatch: pytest.MonkeyPatch) -> None:
    """A check that fails in a way nothing expected (here the hash of one file raises) is
    that path's alone: it is reported with its path and reason and looked at again later,
    and the other paths of the same pass are registered."""
    box = make_sandbox(products=[
        {"type": "table", "glob": "tables/*.txt", "destination": "tables"}])
    (box.stage / "tables").mkdir()
    (box.stage / "tables" / "bad.txt").write_bytes(b"bad")
    (box.stage / "tables" / "good.txt").write_bytes(b"good")
    config = box.config()
    real_hash = fits_mod.hash_fd

    def hash_fd(fd: int, algorithm: str = "sha256") -> tuple[int, str]:
        if os.readlink(f"/proc/self/fd/{fd}").endswith("/bad.txt"):
            raise RuntimeError("an error nobody expected")
        return real_hash(fd, algorithm=algorithm)

    monkeypatch.setattr(fits_mod, "hash_fd", hash_fd)
    with Registry(config.registry) as registry:
        detector = detect.Detector(config, registry)
        detector.scan()
        now = time.time() + config.settle_seconds + 1
        outcomes = {o.data_id: o for o in detector.process(now=now)}
        assert outcomes["good"].action == "registered"
        bad = outcomes["bad"]
        assert bad.action == "deferred"
        assert bad.stage_path == str(box.stage / "tables" / "bad.txt")
        assert bad.reason == "RuntimeError: an error nobody expected"
        [waiting] = detector.pending.values()
        assert waiting.check_at == now + detect.DEFER_SECONDS
        assert [r.data_id for r in registry.products()] == ["good"]


def test_walk_reaches_paths_over_path_max_and_stops_at_the_depth_limit(
        deep_cleanup: Path) -> None:
    """The walk itself: files far beyond 4,096 bytes of path are reached; a chain deeper than
    the limit is reported once with its reason (or raised, without a handler); a comb of
    folders (two at every level) is walked whole while the walk holds at most WINDOW folder
    descriptors."""
    top = deep_cleanup / "top"
    top.mkdir()
    long_names = [bytes([ord("a") + i % 26]) * 250 for i in range(40)]
    make_chain(top, long_names)
    write_at(top, long_names, b"leaf", b"x")
    make_chain(top, [b"chain"] + [b"c"] * 400)
    comb = [b"comb"] + [b"x"] * 100
    make_chain(top, comb)
    for depth in range(1, len(comb)):
        os.mkdir(b"y", dir_fd=(fd := _open_path(top, comb[:depth])))
        os.close(fd)
    baseline = len(os.listdir("/proc/self/fd"))
    most = 0
    problems: list[paths.TreeProblem] = []
    seen: list[tuple[bytes, ...]] = []
    leaf_found = False
    top_fd = os.open(top, DIR_FLAGS)
    try:
        for folder in treewalk.walk(top_fd, on_problem=problems.append):
            seen.append(folder.parts)
            most = max(most, len(os.listdir("/proc/self/fd")))
            if folder.parts == tuple(long_names):
                leaf_found = folder.files == [b"leaf"]
        assert leaf_found
        assert len(b"/".join(long_names)) > 10_000
        assert len(seen) == len(set(seen))
        comb_folders = [p for p in seen if p[:1] == (b"comb",)]
        assert len(comb_folders) == 1 + 100 + 100  # the comb, and an x and a y in each
        assert [p.kind for p in problems] == ["too_deep"]
        assert len(problems[0].parts) == treewalk.MAX_DEPTH + 1
        assert problems[0].parts[0] == b"chain"
        assert most - baseline <= treewalk.WINDOW + 2
        with pytest.raises(paths.TreeProblem) as raised:
            for _folder in treewalk.walk(top_fd):
                pass
        assert "more than 256 levels" in str(raised.value)
        assert len(os.listdir("/proc/self/fd")) == baseline + 1  # only top_fd is left
        # Removal is iterative too: the long tree goes, the too-deep chain is refused.
        paths.remove_tree_under(top_fd, long_names[0])
        assert not os.path.lexists(top / os.fsdecode(long_names[0]))
        with pytest.raises(paths.TreeProblem):
            paths.remove_tree_under(top_fd, b"chain")
        assert exists_at(top, [b"chain", *[b"c"] * 400])
    finally:
        os.close(top_fd)


def _open_path(top: Path, names: list[bytes]) -> int:
    fd = os.open(top, DIR_FLAGS)
    for name in names:
        nxt = os.open(name, DIR_FLAGS, dir_fd=fd)
        os.close(fd)
        fd = nxt
    return fd


@pytest.mark.root("a bind mount needs root")
def test_walk_reports_a_bind_mount_loop(deep_cleanup: Path) -> None:
    """A folder bind-mounted below itself: the walk does not go round; it says where."""
    top = deep_cleanup / "top"
    (top / "a" / "b").mkdir(parents=True)
    (top / "a" / "file").write_bytes(b"x")
    subprocess.run(["mount", "--bind", str(top / "a"), str(top / "a" / "b")], check=True)
    try:
        problems: list[paths.TreeProblem] = []
        top_fd = os.open(top, DIR_FLAGS)
        try:
            seen = [f.parts for f in treewalk.walk(top_fd, on_problem=problems.append)]
        finally:
            os.close(top_fd)
        assert seen == [(), (b"a",)]
        assert [(p.kind, p.parts) for p in problems] == [("loop", (b"a", b"b"))]
        assert "one of its parents" in problems[0].reason
    finally:
        subprocess.run(["umount", str(top / "a" / "b")], check=False)
