"""A backlog as the running daemon meets it: real files, a real daemon process, real
signals. Products are claimed and published in batches that share their commits; a stop
during a batch gives the rest back; the products area is swept for stray temporary files
only after READY."""

from __future__ import annotations

import contextlib
import hashlib
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import apsw
import pytest

from contimg_publisher.paths import TEMP_PREFIX
from contimg_publisher.registry import Registry
from contimg_publisher.transfer import DELAY_ENV
from tests.helpers import (
    MakeSandbox,
    MountTmpfs,
    Sandbox,
    log_events,
    start_daemon,
    stop,
    wait_for,
    write_fits,
)
from tests.test_service import NotifySocket


def stage_burst(sandbox: Sandbox, count: int) -> dict[str, str]:
    """`count` small mosaics in staging; returns name -> sha256 of its bytes."""
    folder = sandbox.mosaics / "burst"
    folder.mkdir(parents=True, exist_ok=True)
    digests = {}
    for i in range(count):
        data = write_fits(folder / f"m{i:04}.fits", pixels=8, seed=i)
        digests[f"m{i:04}.fits"] = hashlib.sha256(data).hexdigest()
    return digests


@contextlib.contextmanager
def products_on_tmpfs(tmpfs: MountTmpfs, tmp_path: Path) -> Iterator[Path]:
    """A products area on another filesystem, so that publishing copies (the copy loop's
    test delay applies) instead of renaming; the `tmpfs` fixture unmounts it."""
    yield tmpfs(tmp_path / "products", "64m")


def archived(sandbox: Sandbox) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sandbox.products.rglob("*") if p.is_file()}


def rows(sandbox: Sandbox) -> list[dict[str, object]]:
    if not sandbox.registry.exists():
        return []  # the daemon has not created it yet
    with Registry(sandbox.registry, migrate=False) as reg:
        try:
            return [{"data_id": p.data_id, "status": p.status, "published_at": p.published_at,
                     "publish_attempts": p.publish_attempts} for p in reg.products()]
        except apsw.SQLError:
            return []  # created, its tables not yet


@pytest.mark.slow
def test_a_burst_is_published_in_batches_that_share_their_commits(
        make_sandbox: MakeSandbox) -> None:
    sandbox = make_sandbox()
    digests = stage_burst(sandbox, 300)
    proc = start_daemon(sandbox)
    try:
        wait_for(lambda: sum(r["status"] == "published" for r in rows(sandbox)) == 300,
                 timeout=120, what="300 products published")
    finally:
        assert stop(proc) == 0
    assert archived(sandbox) == digests  # each once, byte for byte, no .v2, no temporary
    assert not any((sandbox.mosaics / "burst").iterdir())
    # mark_published stamps one time per commit: one commit per product would give 300.
    commits = {r["published_at"] for r in rows(sandbox)}
    assert len(commits) <= 30, f"{len(commits)} publish commits for 300 products"
    published = [e for e in log_events(sandbox) if e.get("event") == "published"]
    assert sorted(e["data_id"] for e in published) == sorted(r["data_id"]  # type: ignore[type-var]
                                                             for r in rows(sandbox))


@pytest.mark.slow
@pytest.mark.root("a products area on another filesystem (a tmpfs mount)")
def test_a_stop_during_a_batch_gives_the_rest_back(
        tmp_path: Path, make_sandbox: MakeSandbox, tmpfs: MountTmpfs) -> None:
    """Copies made slow (a delay per chunk, in the daemon's copy loop): the watchdog is
    pinged on time meanwhile; SIGTERM once the first copy of a batch is in place. The
    product in hand is finished, the rest wait again with no attempt counted, and the next
    start publishes each of them exactly once."""
    with products_on_tmpfs(tmpfs, tmp_path) as products:
        sandbox = make_sandbox(products_root=products)
        digests = stage_burst(sandbox, 40)
        notify = NotifySocket(tmp_path / "notify.sock")
        proc = start_daemon(sandbox, notify.path, watchdog_usec=1_000_000,
                            extra_env={DELAY_ENV: "0.25"})
        try:
            # A batch's copies are placed one by one, then recorded by one commit: stop once
            # the first copy has its final name.
            wait_for(lambda: [p for p in products.rglob("*.fits")
                              if not p.name.startswith(TEMP_PREFIX.decode())],
                     timeout=60, what="a first copy placed")
            placing = time.monotonic()
            time.sleep(2.0)
            # The main loop keeps pinging the watchdog while the batch is copied.
            pings = [t for t, _m in notify.with_key("WATCHDOG") if t >= placing]
            gaps = [b - a for a, b in zip(pings, pings[1:], strict=False)]
            assert len(pings) >= 3 and max(gaps) < 0.75, pings
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(timeout=30) == 0
        finally:
            stop(proc)
            notify.close()
        events = log_events(sandbox)
        stopping = next(e for e in events if e.get("event") == "stopping")
        assert stopping["batch"] > 1, stopping  # the stop came in the middle of a batch
        after_stop = [e for e in events if e.get("event") == "published"]
        done = [r for r in rows(sandbox) if r["status"] == "published"]
        waiting = [r for r in rows(sandbox) if r["status"] == "staging"]
        assert len(done) == len(after_stop) and 1 <= len(done) < 40, (len(done), len(after_stop))
        assert len(done) + len(waiting) == 40
        assert all(r["publish_attempts"] == 0 for r in waiting)
        left = {p.name for p in (sandbox.mosaics / "burst").iterdir()}
        assert left == {str(r["data_id"]).split("/")[-1] + ".fits" for r in waiting}
        assert not [p for p in products.rglob("*") if p.name.startswith(TEMP_PREFIX.decode())]

        proc = start_daemon(sandbox)
        try:
            wait_for(lambda: all(r["status"] == "published" for r in rows(sandbox)),
                     timeout=60, what="the rest published")
        finally:
            assert stop(proc) == 0
        assert archived(sandbox) == digests


def test_stray_temporary_files_are_swept_after_ready(make_sandbox: MakeSandbox) -> None:
    """A temporary copy that a killed publisher left (no row names it) is removed, after
    the daemon said READY; nothing else in the products area is touched."""
    sandbox = make_sandbox()
    folder = sandbox.products / "mosaics" / "2026"
    folder.mkdir(parents=True)
    stray = folder / (TEMP_PREFIX.decode() + "m1.fits.vm-4242-1-boot")
    stray.write_bytes(b"half a copy")
    kept = folder / "m0.fits"
    kept.write_bytes(b"an archived product")
    sandbox.registry.parent.mkdir(parents=True, exist_ok=True)
    Registry(sandbox.registry).close()  # the site's registry (none beside an archive: refused)
    proc = start_daemon(sandbox)
    try:
        wait_for(lambda: not stray.exists(), timeout=30, what="the stray temporary removed")
    finally:
        assert stop(proc) == 0
    names = [e.get("event") for e in log_events(sandbox)]
    assert names.index("started") < names.index("temp_removed"), names
    assert kept.read_bytes() == b"an archived product"
    assert sorted(os.listdir(folder)) == ["m0.fits"]


@pytest.mark.slow
def test_a_burst_moved_in_as_one_folder_is_published_once_each(
        tmp_path: Path, make_sandbox: MakeSandbox) -> None:
    """The pipeline's nights arrive as folders of folders, moved in at once: the loop walks
    the moved folder on its one event, registering and publishing take turns, and every
    product is registered once and published once, with no product reported vanished."""
    sandbox = make_sandbox()
    outside = tmp_path / "incoming"
    digests = {}
    for i in range(300):
        sub = outside / f"n{i // 100:02}"
        sub.mkdir(parents=True, exist_ok=True)
        data = write_fits(sub / f"m{i:04}.fits", pixels=8, seed=i)
        digests[f"m{i:04}.fits"] = hashlib.sha256(data).hexdigest()
    sandbox.mosaics.mkdir(parents=True, exist_ok=True)
    notify = NotifySocket(tmp_path / "notify.sock")
    proc = start_daemon(sandbox, notify.path)
    try:
        notify.wait("READY", "1", timeout=60)
        os.rename(outside, sandbox.mosaics / "night")
        wait_for(lambda: sum(r["status"] == "published" for r in rows(sandbox)) == 300,
                 timeout=120, what="300 products published")
    finally:
        assert stop(proc) == 0
        notify.close()
    assert archived(sandbox) == digests
    events = log_events(sandbox)
    registered = [e["data_id"] for e in events if e.get("event") == "registered"]
    published = [e["data_id"] for e in events if e.get("event") == "published"]
    assert len(registered) == len(set(registered)) == 300
    assert sorted(published) == sorted(registered)
    assert not [e for e in events if e.get("level") in ("warning", "error", "critical")]


@pytest.mark.slow
@pytest.mark.root("a products area on another filesystem (a tmpfs mount)")
def test_detection_goes_on_beside_a_long_copy(
        tmp_path: Path, make_sandbox: MakeSandbox, tmpfs: MountTmpfs) -> None:
    """Registering waits for a short batch in flight, never for a long copy: a mosaic
    staged while a slow copy runs is registered before that copy is done."""
    with products_on_tmpfs(tmpfs, tmp_path) as products:
        sandbox = make_sandbox(products_root=products)
        big = sandbox.mosaics / "big" / "big.fits"
        big.parent.mkdir(parents=True)
        write_fits(big, pixels=2048, seed=1)  # two chunks of the copy, 3 s each
        proc = start_daemon(sandbox, extra_env={DELAY_ENV: "3.0"})
        try:
            wait_for(lambda: [p for p in products.rglob("*") if p.is_file()],
                     timeout=60, what="the slow copy begun (its temporary file)")
            late = sandbox.mosaics / "late" / "late.fits"
            late.parent.mkdir()
            write_fits(late, pixels=8, seed=99)
            wait_for(lambda: sum(r["status"] == "published" for r in rows(sandbox)) == 2,
                     timeout=120, what="both published")
        finally:
            assert stop(proc) == 0
        events = log_events(sandbox)
        first = next(e for e in events if e.get("event") == "published")
        late_registered = next(e for e in events if e.get("event") == "registered"
                               and e["data_id"].endswith("late"))
        assert first["data_id"].endswith("big"), first
        assert late_registered["timestamp"] < first["timestamp"], (late_registered, first)
