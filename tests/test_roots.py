"""Roots compared by what they are: real bind mounts, which paths and realpath cannot see.

Each test mounts as root (skipped otherwise) and always unmounts what it mounted.
"""

from __future__ import annotations

import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import apsw
import pytest

from tests.helpers import (
    MakeSandbox,
    log_events,
    start_daemon,
    stop,
    umount,
    wait_for,
    write_fits,
)

pytestmark = pytest.mark.root("bind mounts")


@contextmanager
def bind(source: Path, target: Path) -> Iterator[None]:
    target.mkdir(parents=True, exist_ok=True)
    subprocess.run(["mount", "--bind", str(source), str(target)], check=True)
    try:
        yield
    finally:
        umount(target)


def _row(db: Path, data_id: str) -> tuple[str, str] | None:
    """(status, publish_error) read with a connection of this process's own."""
    conn = apsw.Connection(str(db))
    conn.set_busy_timeout(5000)
    try:
        row = conn.execute("SELECT status, publish_error FROM data_registry WHERE data_id = ?",
                           (data_id,)).fetchone()
        return None if row is None else (str(row[0]), str(row[1] or ""))
    finally:
        conn.close()


def test_products_root_bind_mounted_from_inside_stage_is_refused_by_check_config_and_run(
        tmp_path: Path, make_sandbox: MakeSandbox) -> None:
    inner = tmp_path / "stage" / "mosaics" / "inner"
    inner.mkdir(parents=True)
    products = tmp_path / "products"
    with bind(inner, products):
        box = make_sandbox(products_root=products)
        out = box.cli("check-config")
        assert out.returncode == 2, out.stdout + out.stderr
        assert "paths.products_root" in out.stderr
        assert str(products) in out.stderr and str(box.stage) in out.stderr, out.stderr
        assert "device and inode" in out.stderr

        write_fits(box.mosaics / "a.fits", seed=1)
        proc = start_daemon(box)
        try:
            code = proc.wait(timeout=60)
        finally:
            stop(proc)
        assert code == 2
        text = (box.root / "daemon.log").read_text()
        assert "paths.products_root" in text and str(box.stage) in text
        assert not box.registry.exists()
        assert sorted(p.name for p in box.mosaics.iterdir()) == ["a.fits", "inner"]
        assert list(inner.iterdir()) == []


def test_quarantine_or_registry_folder_bind_mounted_into_a_root_is_refused(
        tmp_path: Path, make_sandbox: MakeSandbox) -> None:
    box = make_sandbox()
    quarantine = tmp_path / "quarantine"
    quarantine.mkdir()
    box.update(hygiene={"quarantine_dir": str(quarantine)})
    assert box.cli("check-config").returncode == 0
    with bind(quarantine, box.products / "kept"):
        out = box.cli("check-config")
        assert out.returncode == 2, out.stdout + out.stderr
        assert "hygiene.quarantine_dir" in out.stderr
        assert str(quarantine) in out.stderr and str(box.products) in out.stderr, out.stderr
    assert box.cli("check-config").returncode == 0
    state = box.registry.parent
    state.mkdir(parents=True, exist_ok=True)
    with bind(state, box.stage / "state"):
        out = box.cli("check-config")
        assert out.returncode == 2, out.stdout + out.stderr
        assert "paths.registry" in out.stderr
        assert str(state) in out.stderr and str(box.stage) in out.stderr, out.stderr


@pytest.mark.slow
def test_publish_never_moves_an_archived_file_seen_through_a_bind_mount_in_staging(
        make_sandbox: MakeSandbox) -> None:
    """The archive bind-mounted into staging after the daemon started (so after its
    configuration was checked): its files look staged, and a rename or an unlink there
    would move or delete an archived product. Nothing there is touched; the product that
    looks staged fails with the reason and waits for an operator."""
    box = make_sandbox(detect={"settle_seconds": 0.3, "rescan_seconds": 1})
    data = write_fits(box.mosaics / "a.fits", seed=1)
    archived = box.products / "mosaics" / "a.fits"
    proc = start_daemon(box)
    try:
        wait_for(lambda: archived.exists() and box.row("a")["status"] == "published",
                 timeout=60, what="a published")
        with bind(box.products, box.mosaics / "arch"):
            # The configuration itself is refused now (the CLI says so); the registry is read
            # directly.
            refused = box.cli("status")
            assert refused.returncode == 2 and "device and inode" in refused.stderr

            def alias_failed() -> tuple[str, str] | None:
                row = _row(box.registry, "arch/mosaics/a")
                return row if row is not None and "inside the products area" in row[1] \
                    else None
            wait_for(alias_failed, timeout=60, interval=0.3,
                     what="the alias of the archived file refused")
            time.sleep(2.0)  # more rescans and retries: still nothing moves
            row = _row(box.registry, "arch/mosaics/a")
            assert row is not None and row[0] != "published", row
            assert str(box.products) in row[1]
            assert archived.read_bytes() == data
            assert sorted(p.name for p in (box.products / "mosaics").iterdir()) == ["a.fits"]
            assert sorted(p.name for p in box.products.iterdir()) == ["mosaics"]
    finally:
        assert stop(proc) == 0
    assert archived.read_bytes() == data
    rows = {r["data_id"]: r for r in box.registry_rows()}
    assert rows["a"]["status"] == "published"
    assert rows["a"]["published_path"] == str(archived)
    assert set(rows) == {"a", "arch/mosaics/a"}
    assert any(e.get("event") == "publish_failed" and e.get("data_id") == "arch/mosaics/a"
               for e in log_events(box))
