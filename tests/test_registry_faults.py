"""A registry that misbehaves under a running daemon: a real second process holding the
write lock for longer than the busy timeout in the middle of a slow copy. The publish must
not die with the lease, or, if it does, be resolved by the same process without a restart.
"""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

import apsw
import pytest

from contimg_publisher.transfer import DELAY_ENV
from tests.helpers import (
    Sandbox,
    is_root,
    log_events,
    mount_tmpfs,
    start_daemon,
    stop,
    umount,
    wait_for,
    write_fits,
)
from tests.test_publish import archive_files, temps
from tests.test_registry import _hold_lock


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


def test_write_lock_held_past_the_busy_timeout_during_a_slow_copy(tmp_path: Path) -> None:
    if not is_root():
        pytest.skip("mounting a tmpfs for the products area (so the publish is a copy) "
                    "needs root")
    products = tmp_path / "products"
    mount_tmpfs(products, "256m")
    try:
        sandbox = Sandbox(tmp_path, products_root=products,
                          registry={"busy_timeout_seconds": 0.5})
        data = write_fits(sandbox.mosaics / "big.fits", pixels=3000)  # 36 MB: 5 chunks
        # 0.6 s per 8 MiB chunk: a copy of about 3 s, with lease renewals once a second.
        proc = start_daemon(sandbox, extra_env={DELAY_ENV: "0.6"})
        try:
            wait_for(lambda: status_of(sandbox.registry, "big") == "publishing", timeout=30,
                     what="the copy to start")
            holder = _hold_lock(sandbox.registry, "stdin")
            try:
                time.sleep(4.0)  # past the busy timeout, and past the end of the copy
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


def test_registry_deleted_while_running_stops_publishing(tmp_path: Path) -> None:
    """Nothing is published into a deleted registry, no staged file is removed on its word,
    and the restart refuses to create an empty registry beside the archive."""
    sandbox = Sandbox(tmp_path)
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


def test_registry_replaced_by_an_older_copy_stops_publishing(tmp_path: Path) -> None:
    sandbox = Sandbox(tmp_path)
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
