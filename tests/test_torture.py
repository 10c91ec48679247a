"""Kill -9 torture: a publisher killed at random moments, again and again, never loses,
truncates, duplicates or overwrites a product.

The staging area is on the disk, the products area on another filesystem (a tmpfs, so
every publish is a cross-filesystem copy with a temporary file). Publishers (the daemon,
and sometimes a one-shot `scan`) are started and SIGKILLed at random moments at least 30
times. A tmpfs copies a few MiB faster than any disk, so the copies are slowed by a
per-chunk delay (read from a test-only variable, different in each run) to keep the
publishing going for the whole torture; kills land in copies and between the steps after.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import signal
import subprocess
import sys
import time
from collections import Counter

import pytest

from contimg_publisher.registry import Registry
from tests.helpers import REPO, Sandbox, fits_bytes, is_root, mount_tmpfs, umount, wait_for

PRODUCTS = 200
KILLS = 30
PIXELS = 720  # 720 x 720 float32: about 2 MiB per mosaic


def _publisher(sandbox: Sandbox, command: str, delay: float) -> subprocess.Popen[bytes]:
    env = {k: v for k, v in os.environ.items() if k not in ("NOTIFY_SOCKET", "WATCHDOG_USEC")}
    if delay:
        env["CONTIMG_PUBLISHER_TEST_COPY_DELAY"] = str(delay)
    log = open(sandbox.root / "publishers.log", "ab")  # noqa: SIM115 - closed with the process
    return subprocess.Popen([sys.executable, "-m", "contimg_publisher", "--config",
                             str(sandbox.config_path), command], cwd=REPO, env=env,
                            stdout=log, stderr=subprocess.STDOUT)


def _published_count(sandbox: Sandbox) -> int:
    out = sandbox.cli("status", "--json")
    if out.returncode not in (0, 1):
        return -1
    return json.loads(out.stdout)["counts"]["published"]


@pytest.fixture
def tmpfs_products(tmp_path):
    if not is_root():
        pytest.skip("the products tmpfs is mounted by the test, which needs root")
    products = tmp_path / "products"
    mount_tmpfs(products, "1g")
    yield products
    umount(products)


def test_sigkill_at_random_moments(tmp_path, tmpfs_products):
    rng = random.Random(20261129)
    sandbox = Sandbox(tmp_path, products_root=tmpfs_products,
                      detect={"settle_seconds": 0.2, "rescan_seconds": 300},
                      publish={"lease_seconds": 5})
    expected: dict[str, str] = {}
    for i in range(PRODUCTS):
        data = fits_bytes(PIXELS, seed=i)
        folder = sandbox.mosaics / f"night{i % 4}"
        folder.mkdir(exist_ok=True)
        (folder / f"mosaic_{i:03d}.fits").write_bytes(data)
        expected[f"night{i % 4}/mosaic_{i:03d}.fits"] = hashlib.sha256(data).hexdigest()

    kills = 0
    progress = []
    while kills < KILLS:
        command = "scan" if rng.random() < 0.25 else "run"
        proc = _publisher(sandbox, command, delay=rng.choice([0.15, 0.25, 0.35, 0.45]))
        time.sleep(rng.uniform(0.3, 2.0))
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            kills += 1
        proc.wait()
        progress.append(_published_count(sandbox))
    print(f"{kills} SIGKILLs; published after each: {progress}")
    assert progress[-1] < PRODUCTS, "every product was published before the kills ended; " \
        "the torture proved nothing"

    final = _publisher(sandbox, "run", delay=0)
    try:
        wait_for(lambda: _published_count(sandbox) == PRODUCTS, timeout=180, interval=0.5,
                 what="every product published after the last kill")
    finally:
        final.send_signal(signal.SIGTERM)
        assert final.wait(timeout=60) == 0

    archive = tmpfs_products / "mosaics"
    found = {str(p.relative_to(archive)): hashlib.sha256(p.read_bytes()).hexdigest()
             for p in archive.rglob("*") if p.is_file()}
    assert found == expected  # exactly once each, byte-identical, nothing else (no .v2)
    assert [p for p in tmpfs_products.rglob(".contimg-tmp.*")] == []
    assert [p for p in sandbox.stage.rglob("*.fits")] == []
    rows = sandbox.registry_rows()
    assert len(rows) == PRODUCTS
    assert {r["status"] for r in rows} == {"published"}
    assert all(r["publish_attempts"] == 0 for r in rows), \
        "an interrupted publish counted as a failed attempt"
    with Registry(sandbox.registry, migrate=False) as registry:
        kinds = [f.kind for r in rows for f in registry.history(r["data_id"])]
    print(f"failure history after the torture: {dict(Counter(kinds))}")
    assert set(kinds) <= {"interrupted", "source_changed"}, kinds
