"""A registry that misbehaves under a running daemon: a real second process holding the
write lock for longer than the busy timeout in the middle of a slow copy. The publish must
not die with the lease, or, if it does, be resolved by the same process without a restart.
"""

from __future__ import annotations

import os
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
