"""A registry that misbehaves under a running daemon: a real second process holding the
write lock for longer than the busy timeout in the middle of a slow copy. The publish must
not die with the lease, or, if it does, be resolved by the same process without a restart.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import apsw
import pytest

from contimg_publisher.registry import Registry
from contimg_publisher.transfer import DELAY_ENV
from tests.helpers import (
    MakeSandbox,
    MountExt4,
    Sandbox,
    free_port,
    log_events,
    mount_tmpfs,
    skip_with,
    start_daemon,
    stop,
    umount,
    wait_for,
    write_fits,
)
from tests.test_publish import archive_files, register_only, temps
from tests.test_registry import _hold_lock
from tests.test_service import NotifySocket


def status_of(db: Path, data_id: str) -> str | None:
    """A read from another process's point of view (its own connection, no lock kept)."""
    if not db.exists():
        return None
    conn = apsw.Connection(str(db))
    conn.set_busy_timeout(5000)
    try:
        row = conn.execute("SELECT status FROM data_registry WHERE data_id = ?",
                           (data_id,)).fetchone()
        return None if row is None else str(row[0])
    except apsw.SQLError:  # the daemon has not created its tables yet
        return None
    finally:
        conn.close()


@pytest.mark.slow
@pytest.mark.root("mounting a tmpfs for the products area (so the publish is a copy) needs root")
def test_write_lock_held_past_the_busy_timeout_during_a_slow_copy(
        tmp_path: Path, make_sandbox: MakeSandbox) -> None:
    products = tmp_path / "products"
    mount_tmpfs(products, "256m")
    try:
        sandbox = make_sandbox(products_root=products,
                               registry={"busy_timeout_seconds": 0.5})
        data = write_fits(sandbox.mosaics / "big.fits", pixels=3000)  # 36 MB: 5 chunks
        # 1.2 s per 8 MiB chunk: a copy of about 6 s, with lease renewals once a second, so
        # the lock below is taken while it runs even on a loaded machine.
        proc = start_daemon(sandbox, extra_env={DELAY_ENV: "1.2"})
        try:
            wait_for(lambda: status_of(sandbox.registry, "big") == "publishing", timeout=30,
                     what="the copy to start")
            holder = _hold_lock(sandbox.registry, "stdin")
            try:
                time.sleep(7.0)  # past the busy timeout, and past the end of the copy
                assert proc.poll() is None, "the daemon died while the registry was locked"
            finally:
                holder.communicate("go\n", timeout=30)
            wait_for(lambda: status_of(sandbox.registry, "big") == "published", timeout=60,
                     what="big published once the lock was released, without a restart")
            assert proc.poll() is None
        finally:
            assert stop(proc) == 0
        assert archive_files(products / "mosaics") == {"big.fits": data}
        assert temps(products, sandbox.stage) == []
        assert not (sandbox.mosaics / "big.fits").exists()
        events = [e.get("event") for e in log_events(sandbox)]
        assert "lease_not_renewed" in events, events
        assert events.count("published") + events.count("reconciled") >= 1
        assert os.path.exists(sandbox.registry)
    finally:
        umount(products)


def _published_then(sandbox: Sandbox, name: str, seed: int) -> bytes:
    data = write_fits(sandbox.mosaics / f"{name}.fits", seed=seed)
    wait_for(lambda: status_of(sandbox.registry, name) == "published", timeout=30,
             what=f"{name} published")
    return data


def _exited_for_the_registry(sandbox: Sandbox, proc: subprocess.Popen[str], why: str) -> None:
    assert proc.wait(timeout=30) == 1, "the daemon must stop, non-zero, for systemd"
    [gone] = [e for e in log_events(sandbox) if e.get("event") == "registry_gone"]
    assert gone["level"] == "critical" and why in gone["error"], gone


@pytest.mark.slow
def test_registry_deleted_while_running_stops_publishing(make_sandbox: MakeSandbox) -> None:
    """Nothing is published into a deleted registry, no staged file is removed on its word,
    and the restart refuses to create an empty registry beside the archive."""
    sandbox = make_sandbox()
    proc = start_daemon(sandbox)
    try:
        first = _published_then(sandbox, "first", seed=1)
        sandbox.registry.unlink()
        late = write_fits(sandbox.mosaics / "late.fits", seed=2)
        _exited_for_the_registry(sandbox, proc, "deleted while in use")
    finally:
        stop(proc)
    assert archive_files(sandbox.products / "mosaics") == {"first.fits": first}
    assert (sandbox.mosaics / "late.fits").read_bytes() == late
    # systemd restarts it: the start refuses, names the way out, and creates nothing.
    again = start_daemon(sandbox)
    assert again.wait(timeout=60) == 1
    [refused] = [e for e in log_events(sandbox) if e.get("event") == "registry_unusable"]
    assert "refusing to start on a new, empty registry" in refused["error"]
    assert "contimg-publisher migrate" in refused["error"]
    assert not sandbox.registry.exists()
    out = sandbox.cli("scan")
    assert out.returncode == 1 and "no such file" in out.stderr
    assert not sandbox.registry.exists()
    assert (sandbox.mosaics / "late.fits").read_bytes() == late
    # The way out the message names: an empty registry made on purpose, then publishing
    # goes on (the archived product is left as it is).
    sandbox.cli("migrate", check=True)
    sandbox.cli("scan", check=True)
    assert archive_files(sandbox.products / "mosaics") == {"first.fits": first,
                                                           "late.fits": late}


@pytest.mark.slow
def test_registry_replaced_by_an_older_copy_stops_publishing(
        tmp_path: Path, make_sandbox: MakeSandbox) -> None:
    sandbox = make_sandbox()
    backup = tmp_path / "backup.sqlite3"
    proc = start_daemon(sandbox)
    try:
        first = _published_then(sandbox, "first", seed=1)
        src = apsw.Connection(str(sandbox.registry))
        dst = apsw.Connection(str(backup))
        with dst.backup("main", src, "main") as b:
            b.step()
        src.close()
        dst.close()
        second = _published_then(sandbox, "second", seed=2)
        os.replace(backup, sandbox.registry)  # the older copy, restored by hand
        late = write_fits(sandbox.mosaics / "late.fits", seed=3)
        _exited_for_the_registry(sandbox, proc, "replaced by another file")
    finally:
        stop(proc)
    assert archive_files(sandbox.products / "mosaics") == {"first.fits": first,
                                                           "second.fits": second}
    assert (sandbox.mosaics / "late.fits").read_bytes() == late


def _register_held(sandbox: Sandbox, data_id: str) -> None:
    """Registered (not published) and held, before the daemon sees it."""
    assert data_id in register_only(sandbox)
    sandbox.cli("hold", data_id, check=True)


def _reload(sandbox: Sandbox, proc: subprocess.Popen[str], stage_root: Path) -> None:
    sandbox.update(paths={"stage_root": str(stage_root)})
    proc.send_signal(signal.SIGHUP)


@pytest.mark.slow
def test_reload_that_moves_stage_root_parks_what_waits_under_the_old_one(
        tmp_path: Path, make_sandbox: MakeSandbox) -> None:
    """stage_root A -> B, then B -> A, by SIGHUP. A product waiting under the root that was
    left becomes `failed` with a reason naming the change (never a silent wait); with the
    root set back and `retry`, it is published."""
    sandbox = make_sandbox()
    root_a, root_b = sandbox.stage, tmp_path / "stage-b"
    (root_b / "mosaics").mkdir(parents=True)
    held_a = write_fits(root_a / "mosaics" / "held_a.fits", seed=2)
    _register_held(sandbox, "held_a")
    proc = start_daemon(sandbox)
    try:
        wait_for(lambda: any(e.get("event") == "started" for e in log_events(sandbox)),
                 what="the daemon to start")
        _reload(sandbox, proc, root_b)  # A -> B
        wait_for(lambda: status_of(sandbox.registry, "held_a") == "failed", timeout=30,
                 what="held_a parked by the change of stage_root")
        row = sandbox.row("held_a")
        assert f"registered under {root_a}" in row["publish_error"]
        assert f"stage_root is now {root_b}" in row["publish_error"]
        assert [f["kind"] for f in row["failures"]] == ["other"]
        status = json.loads(sandbox.cli("status", "--json").stdout)
        assert status["counts"]["failed"] == 1 and status["problems"]
        in_b = write_fits(root_b / "mosaics" / "in_b.fits", seed=3)
        wait_for(lambda: status_of(sandbox.registry, "in_b") == "published", timeout=30,
                 what="in_b published from the new root")
    finally:
        assert stop(proc) == 0
    held_b = write_fits(root_b / "mosaics" / "held_b.fits", seed=4)
    _register_held(sandbox, "held_b")  # the config names root B now
    proc = start_daemon(sandbox)
    try:
        wait_for(lambda: sum(e.get("event") == "started" for e in log_events(sandbox)) == 2,
                 what="the daemon to start again")
        _reload(sandbox, proc, root_a)  # B -> A
        wait_for(lambda: status_of(sandbox.registry, "held_b") == "failed", timeout=30,
                 what="held_b parked by the change back")
        assert f"registered under {root_b}" in sandbox.row("held_b")["publish_error"]
        sandbox.cli("retry", "held_a", check=True)
        sandbox.cli("release", "held_a", check=True)
        wait_for(lambda: status_of(sandbox.registry, "held_a") == "published", timeout=30,
                 what="held_a published after the root was set back and it was retried")
    finally:
        assert stop(proc) == 0
    archived = archive_files(sandbox.products / "mosaics")
    assert archived == {"held_a.fits": held_a, "in_b.fits": in_b}
    assert (root_b / "mosaics" / "held_b.fits").read_bytes() == held_b
    assert status_of(sandbox.registry, "held_b") == "failed"


@pytest.mark.slow
def test_reload_that_moves_products_root_publishes_what_comes_next_there(
        tmp_path: Path, make_sandbox: MakeSandbox) -> None:
    """products_root P -> Q -> P by SIGHUP: what was published stays recorded where it is,
    and each product goes where the configuration says when it is published."""
    sandbox = make_sandbox()
    root_p, root_q = sandbox.products, tmp_path / "products-q"
    root_q.mkdir()
    published: dict[str, bytes] = {}
    proc = start_daemon(sandbox)
    try:
        # Publish one product, then move products_root by SIGHUP; three times.
        for reloads, (name, next_root) in enumerate(
                (("first", root_q), ("second", root_p), ("third", None)), start=1):
            published[name] = write_fits(sandbox.mosaics / f"{name}.fits", seed=reloads)
            wait_for(lambda name=name: status_of(sandbox.registry, name) == "published",
                     what=f"{name} published")
            if next_root is None:
                break
            sandbox.update(paths={"products_root": str(next_root)})
            proc.send_signal(signal.SIGHUP)
            wait_for(lambda n=reloads: sum(e.get("event") == "reload_ok"
                                           for e in log_events(sandbox)) == n,
                     what=f"reload {reloads}")
    finally:
        assert stop(proc) == 0
    first, second, third = published["first"], published["second"], published["third"]
    assert archive_files(root_p / "mosaics") == {"first.fits": first, "third.fits": third}
    assert archive_files(root_q / "mosaics") == {"second.fits": second}
    paths_recorded = {r["data_id"]: r["published_path"] for r in sandbox.registry_rows()}
    assert paths_recorded == {"first": str(root_p / "mosaics/first.fits"),
                              "second": str(root_q / "mosaics/second.fits"),
                              "third": str(root_p / "mosaics/third.fits")}


@pytest.mark.slow
@pytest.mark.root("mounting a small tmpfs for the registry needs root")
def test_registry_disk_full_pauses_and_resumes_without_a_restart(
        tmp_path: Path, make_sandbox: MakeSandbox) -> None:
    """The registry's filesystem fills (a small tmpfs): the daemon stays alive, records and
    removes nothing it could not record, and publishes everything once there is room."""
    state = tmp_path / "state"
    mount_tmpfs(state, "2m")
    try:
        sandbox = make_sandbox()
        proc = start_daemon(sandbox)
        try:
            first = write_fits(sandbox.mosaics / "first.fits", seed=1)
            wait_for(lambda: status_of(sandbox.registry, "first") == "published",
                     what="first published")
            filler = state / "filler"
            # Every free block of the registry's disk.
            with open(filler, "wb") as fh, contextlib.suppress(OSError):
                while True:
                    fh.write(b"\0" * 65536)
                    fh.flush()
            waiting = {f"w{i}": write_fits(sandbox.mosaics / f"w{i}.fits", seed=10 + i)
                       for i in range(3)}
            wait_for(lambda: _events(sandbox, "registry_unavailable"), timeout=30,
                     what="the full registry reported")
            time.sleep(4)  # a few retries, each one failing
            assert proc.poll() is None, "the daemon died of a full registry disk"
            [first_report] = _events(sandbox, "registry_unavailable")
            assert "cannot be written now" in first_report["error"], first_report
            assert not _events(sandbox, "loop_error")
            for name, data in waiting.items():  # nothing left staging unrecorded
                assert (sandbox.mosaics / f"{name}.fits").read_bytes() == data
            filler.unlink()
            for name in waiting:
                wait_for(lambda name=name: status_of(sandbox.registry, name) == "published",
                         timeout=60, what=f"{name} published once there was room")
            assert proc.poll() is None
            assert len(_events(sandbox, "registry_available")) == 1
        finally:
            assert stop(proc) == 0
        assert archive_files(sandbox.products / "mosaics") == {
            "first.fits": first, **{f"{n}.fits": d for n, d in waiting.items()}}
    finally:
        umount(state)


def _events(sandbox: Sandbox, name: str) -> list[dict[str, Any]]:
    return [e for e in log_events(sandbox) if e.get("event") == name]


def _reported(sandbox: Sandbox, proc: subprocess.Popen[str], what: str) -> dict[str, Any]:
    """The registry_unavailable event, waited for; a daemon that died meanwhile (SIGBUS:
    exit -7) fails at once, saying how it ended."""
    wait_for(lambda: proc.poll() is not None or _events(sandbox, "registry_unavailable"),
             timeout=30, what=what)
    assert proc.poll() is None, f"the daemon died (exit {proc.returncode})"
    return _events(sandbox, "registry_unavailable")[0]


def _fetch(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=10) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def _gauge(metrics_text: str, name: str) -> float:
    [line] = [ln for ln in metrics_text.splitlines() if ln.startswith(name + " ")]
    return float(line.split()[1])



@contextlib.contextmanager
def _registry_on_ext4(loop_ext4: MountExt4, tmp_path: Path, options: str = ""
                      ) -> Iterator[Path]:
    """The registry's folder (state/) on a small loop-mounted ext4: a tmpfs has no chattr
    flags. The `loop_ext4` fixture unmounts it after the test."""
    yield loop_ext4(tmp_path / "state", tmp_path / "state.img", 64, options)


def _chattr(flag: str, files: list[Path]) -> None:
    subprocess.run(["chattr", flag, *map(str, files)], check=True)


@pytest.mark.slow
def test_registry_made_immutable_pauses_without_sigbus_and_resumes(
        tmp_path: Path, make_sandbox: MakeSandbox, loop_ext4: MountExt4) -> None:
    """chattr +i on the registry, its -wal and its -shm under a running daemon: SQLite's
    writes to the memory-mapped -shm would raise SIGBUS. The daemon stays alive, says once
    why it paused (STATUS=, status, the page, the metrics), keeps pinging the watchdog,
    removes and archives nothing without its record, and resumes by itself at chattr -i."""
    with _registry_on_ext4(loop_ext4, tmp_path):
        port = free_port()
        sandbox = make_sandbox(metrics={"listen": f"127.0.0.1:{port}"})
        files = [sandbox.registry, *(Path(f"{sandbox.registry}{s}") for s in ("-wal", "-shm"))]
        notify = NotifySocket(tmp_path / "notify.sock")
        proc = start_daemon(sandbox, notify_path=notify.path, watchdog_usec=2_000_000)
        immutable = False
        try:
            first = write_fits(sandbox.mosaics / "first.fits", seed=1)
            wait_for(lambda: status_of(sandbox.registry, "first") == "published",
                     what="first published")
            assert all(f.exists() for f in files)
            # A commit by another process (as `hold` makes), then at once the flags: the
            # daemon's next read must write a new read mark into the -shm.
            with Registry(sandbox.registry, migrate=False) as other:
                assert other.set_hold("first", False)
            _chattr("+i", files)
            immutable = True
            waiting = {f"w{i}": write_fits(sandbox.mosaics / f"w{i}.fits", seed=10 + i)
                       for i in range(3)}
            _reported(sandbox, proc, "the immutable registry reported")
            paused_at = time.monotonic()
            time.sleep(8)  # retries after 1, 2 and 4 s, each one failing
            assert proc.poll() is None, f"the daemon died (exit {proc.returncode})"
            [report] = _events(sandbox, "registry_unavailable")
            assert report["level"] == "error" and "immutable (chattr +i)" in report["error"]
            assert not _events(sandbox, "registry_available")
            assert not _events(sandbox, "loop_error")
            status_line = notify.with_key("STATUS")[-1][1]["STATUS"]
            assert status_line.startswith("paused: registry unavailable: "), status_line
            assert "immutable" in status_line
            pings = [t for t, _ in notify.with_key("WATCHDOG") if t > paused_at]
            assert len(pings) >= 5, "the watchdog must be pinged while paused"
            _, metrics_text = _fetch(f"http://127.0.0.1:{port}/metrics")
            assert _gauge(metrics_text, "contimg_publisher_registry_available") == 0
            assert _gauge(metrics_text, "contimg_publisher_registry_unavailable_seconds") > 5
            code, page = _fetch(f"http://127.0.0.1:{port}/")
            assert code == 503 and "publishing paused" in page and "immutable" in page
            out = sandbox.cli("status", "--json")
            assert out.returncode == 1, out.stderr
            status = json.loads(out.stdout)
            assert "immutable" in status["paused"]["reason"] and status["daemon_running"]
            assert any("publishing paused" in p for p in status["problems"])
            assert status["counts"]["published"] == 1  # still readable by another process
            text = sandbox.cli("status").stdout
            assert "publishing paused" in text, text
            # Nothing left staging, nothing archived, without its record.
            for name, data in waiting.items():
                assert (sandbox.mosaics / f"{name}.fits").read_bytes() == data
                assert status_of(sandbox.registry, name) is None
            assert archive_files(sandbox.products / "mosaics") == {"first.fits": first}
            _chattr("-i", files)
            immutable = False
            for name in waiting:
                wait_for(lambda name=name: status_of(sandbox.registry, name) == "published",
                         timeout=60, what=f"{name} published once the files were writable")
            assert proc.poll() is None
            [back] = _events(sandbox, "registry_available")
            assert back["seconds"] >= 8 and "immutable" in back["error_was"]
            assert len(_events(sandbox, "registry_unavailable")) == 1
            wait_for(lambda: not notify.with_key("STATUS")[-1][1]["STATUS"].startswith(
                "paused"), what="STATUS= no longer paused")
            _, metrics_text = _fetch(f"http://127.0.0.1:{port}/metrics")
            assert _gauge(metrics_text, "contimg_publisher_registry_available") == 1
            assert _gauge(metrics_text, "contimg_publisher_registry_unavailable_seconds") == 0
            assert json.loads(sandbox.cli("status", "--json").stdout)["paused"] is None
        finally:
            if immutable:
                _chattr("-i", files)
            code = stop(proc)
            notify.close()
        assert code == 0
        assert archive_files(sandbox.products / "mosaics") == {
            "first.fits": first, **{f"{n}.fits": d for n, d in waiting.items()}}
        assert [e["data_id"] for e in _events(sandbox, "published")].count("w0") == 1


def test_stopped_while_the_registry_is_immutable(
        tmp_path: Path, make_sandbox: MakeSandbox, loop_ext4: MountExt4) -> None:
    """SIGTERM while paused: a clean exit, without the checkpoint the last connection makes
    on closing (it writes the -shm, so it would be a SIGBUS)."""
    with _registry_on_ext4(loop_ext4, tmp_path):
        sandbox = make_sandbox()
        files = [sandbox.registry, *(Path(f"{sandbox.registry}{s}") for s in ("-wal", "-shm"))]
        proc = start_daemon(sandbox)
        try:
            write_fits(sandbox.mosaics / "first.fits", seed=1)
            wait_for(lambda: status_of(sandbox.registry, "first") == "published",
                     what="first published")
            with Registry(sandbox.registry, migrate=False) as other:
                assert other.set_hold("first", False)
            _chattr("+i", files)
            try:
                late = write_fits(sandbox.mosaics / "late.fits", seed=2)
                _reported(sandbox, proc, "the immutable registry reported")
                assert stop(proc) == 0
            finally:
                _chattr("-i", files)
        finally:
            stop(proc)
        assert (sandbox.mosaics / "late.fits").read_bytes() == late
        assert _events(sandbox, "stopped")


@pytest.mark.slow
def test_registry_filesystem_gone_read_only_pauses(
        tmp_path: Path, make_sandbox: MakeSandbox, loop_ext4: MountExt4) -> None:
    """ext4 remounts itself read-only after an error (errors=remount-ro; the error is
    injected through its trigger_fs_error): the daemon pauses and stays alive. A plain
    `mount -o remount,ro` is refused while the daemon has the files open for writing, and
    an emergency read-only ext4 only comes back by unmounting it, so no resume here."""
    with _registry_on_ext4(loop_ext4, tmp_path, "errors=remount-ro") as state:
        source = subprocess.run(["findmnt", "-no", "SOURCE", str(state)], check=True,
                                capture_output=True, text=True).stdout.strip()
        trigger = Path("/sys/fs/ext4") / os.path.basename(source) / "trigger_fs_error"
        if not trigger.exists():
            skip_with(f"no {trigger}")
        sandbox = make_sandbox()
        proc = start_daemon(sandbox)
        try:
            write_fits(sandbox.mosaics / "first.fits", seed=1)
            wait_for(lambda: status_of(sandbox.registry, "first") == "published",
                     what="first published")
            trigger.write_text("test: the registry disk fails\n")
            late = write_fits(sandbox.mosaics / "late.fits", seed=2)
            _reported(sandbox, proc, "the read-only registry reported")
            time.sleep(4)
            assert proc.poll() is None
            assert len(_events(sandbox, "registry_unavailable")) == 1
            assert (sandbox.mosaics / "late.fits").read_bytes() == late
            assert set(archive_files(sandbox.products / "mosaics")) == {"first.fits"}
        finally:
            assert stop(proc) == 0


@pytest.mark.slow
def test_write_lock_held_past_the_busy_timeout_while_registering(make_sandbox: MakeSandbox) -> None:
    """Another process holds BEGIN IMMEDIATE for longer than the busy timeout when a new
    file is to be registered: the daemon pauses (once, with the reason) and publishes it
    by itself when the lock is released."""
    sandbox = make_sandbox(registry={"busy_timeout_seconds": 0.5})
    proc = start_daemon(sandbox)
    try:
        first = _published_then(sandbox, "first", seed=1)
        holder = _hold_lock(sandbox.registry, "stdin")
        try:
            late = write_fits(sandbox.mosaics / "late.fits", seed=2)
            _reported(sandbox, proc, "the held lock reported")
            time.sleep(4)
            assert proc.poll() is None
            [report] = _events(sandbox, "registry_unavailable")
            assert "locked by another process" in report["error"], report
            assert (sandbox.mosaics / "late.fits").read_bytes() == late
        finally:
            holder.communicate("go\n", timeout=30)
        wait_for(lambda: status_of(sandbox.registry, "late") == "published", timeout=60,
                 what="late published once the lock was released")
        assert len(_events(sandbox, "registry_available")) == 1
        assert not _events(sandbox, "loop_error")
    finally:
        assert stop(proc) == 0
    assert archive_files(sandbox.products / "mosaics") == {"first.fits": first,
                                                           "late.fits": late}


@pytest.mark.slow
def test_registry_immutable_at_start_waits_instead_of_exiting(
        tmp_path: Path, make_sandbox: MakeSandbox, loop_ext4: MountExt4) -> None:
    """The registry made immutable before the daemon starts (as a full disk at boot would
    be): no exit (under Restart=on-failure that would be a restart loop), one
    registry_unavailable, no READY while it lasts, systemd's start timeout extended; at
    chattr -i it starts by itself and publishes what waited."""
    with _registry_on_ext4(loop_ext4, tmp_path):
        sandbox = make_sandbox()
        Registry(sandbox.registry).close()
        waiting = write_fits(sandbox.mosaics / "waiting.fits", seed=3)
        notify = NotifySocket(tmp_path / "notify.sock")
        _chattr("+i", [sandbox.registry])
        immutable = True
        proc = start_daemon(sandbox, notify_path=notify.path)
        try:
            _reported(sandbox, proc, "the immutable registry reported at start")
            time.sleep(4)  # retries after 1 and 2 s
            assert proc.poll() is None, f"the daemon exited ({proc.returncode})"
            [report] = _events(sandbox, "registry_unavailable")
            assert "immutable" in report["error"], report
            assert not notify.with_key("READY")
            assert notify.with_key("EXTEND_TIMEOUT_USEC")
            assert notify.with_key("STATUS")[-1][1]["STATUS"].startswith(
                "paused: registry unavailable: ")
            assert (sandbox.mosaics / "waiting.fits").read_bytes() == waiting
            _chattr("-i", [sandbox.registry])
            immutable = False
            notify.wait("READY", "1", timeout=60)
            wait_for(lambda: status_of(sandbox.registry, "waiting") == "published",
                     timeout=60, what="the waiting product published")
            assert len(_events(sandbox, "registry_available")) == 1
        finally:
            if immutable:
                _chattr("-i", [sandbox.registry])
            code = stop(proc)
            notify.close()
        assert code == 0
        assert archive_files(sandbox.products / "mosaics") == {"waiting.fits": waiting}
