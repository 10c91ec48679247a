"""Several nodes, one PostgreSQL registry, one products area on another filesystem (a
tmpfs), daemons SIGKILLed at random moments and restarted while products keep arriving,
and the server itself restarted once with `pg_ctl restart -m immediate`. At the end every
product is in the archive exactly once and byte-identical, no temporary name is left,
every staging folder is empty, and every row is `published` by the node that staged it,
with one publish record each. Read from the disk and from the server.

Copies are slowed by the test-only per-chunk delay so that kills land inside copies and
in the steps after them, not only between products.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import time
from pathlib import Path

from tests.helpers import Sandbox, wait_for
from tests.pg import Server, pg_server, pg_template  # noqa: F401 - fixtures
from tests.test_publish import (  # noqa: F401 - tmpfs_products is a fixture
    _start,
    archive_files,
    sha256,
    stage,
    temps,
    tmpfs_products,
)

NODES = ("node-a", "node-b", "node-c")
FIRST, LATE = 8, 4       # products per node staged before the kills, and during them
KILLS = 14
PIXELS = 400             # 400 x 400 float32: about 640 KiB per mosaic


def _sandbox(root: Path, server: Server, node: str, products: Path) -> Sandbox:
    root.mkdir(parents=True)
    return Sandbox(root, products_root=products,
                   paths={"registry": server.uri, "lock_file": str(root / "publisher.lock")},
                   node={"name": node}, metrics={"enabled": False},
                   detect={"settle_seconds": 0.0, "rescan_seconds": 2},
                   publish={"lease_seconds": 5, "reconcile_seconds": 3})


def _on_disk_is_sound(products: Path, expected: dict[str, str]) -> None:
    """Between kills: whatever sits under a final name is a complete, identical product."""
    for rel, data in archive_files(products / "mosaics").items():
        assert not rel.endswith(".fits") or sha256(data) == expected.get(rel), \
            f"{rel} under its final name is not the product it names"


def test_daemons_killed_at_random_on_three_nodes_publish_each_product_once(
        tmp_path: Path, pg_server: Server, tmpfs_products: Path) -> None:  # noqa: F811
    seed = int(os.environ.get("TORTURE_SEED", "15"))
    rng = random.Random(seed)
    boxes = {node: _sandbox(tmp_path / node, pg_server, node, tmpfs_products)
             for node in NODES}
    expected: dict[str, str] = {}

    def arrive(node: str, i: int) -> None:
        rel = f"{node[-1]}/m_{node[-1]}_{i:02d}.fits"
        expected[rel] = sha256(stage(boxes[node], rel, pixels=PIXELS, seed=hash((node, i))
                                     % 10_000))

    for node in NODES:
        for i in range(FIRST):
            arrive(node, i)
    procs: dict[str, subprocess.Popen[bytes]] = {
        node: _start(box, "run", delay=0.2) for node, box in boxes.items()}
    late = [(node, FIRST + i) for node in NODES for i in range(LATE)]
    rng.shuffle(late)
    kills, restarted_server = 0, False
    started = time.monotonic()
    try:
        while kills < KILLS:
            time.sleep(rng.uniform(0.4, 1.2))
            if late:
                arrive(*late.pop())
            node = rng.choice(NODES)
            if procs[node].poll() is None:
                procs[node].send_signal(signal.SIGKILL)
                kills += 1
            procs[node].wait()
            _on_disk_is_sound(tmpfs_products, expected)
            if kills == KILLS // 2 and not restarted_server:
                pg_server.restart("immediate")
                restarted_server = True
            procs[node] = _start(boxes[node], "run", delay=rng.choice([0.1, 0.2, 0.3]))
        for node, i in late:
            arrive(node, i)
        late = []
        # The kills are over: the daemons running now (no more delay) finish the work.
        for node in NODES:
            if procs[node].poll() is None:
                procs[node].send_signal(signal.SIGKILL)
            procs[node].wait()
            procs[node] = _start(boxes[node], "run", delay=0.0)

        def done() -> bool:
            rows = pg_server.psql("SELECT count(*) FILTER (WHERE status = 'published'),"
                                  " count(*) FROM data_registry").split("|")
            return rows == [str(len(expected))] * 2 and not temps(tmpfs_products)
        wait_for(done, 180, interval=0.5, what="every product published")
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in procs.values():
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
    print(f"seed {seed}: {kills} SIGKILLs and one server restart in "
          f"{time.monotonic() - started:.0f} s")
    assert restarted_server and kills == KILLS

    found = archive_files(tmpfs_products / "mosaics")
    assert {rel: sha256(data) for rel, data in found.items()} == expected  # once, identical
    assert temps(tmpfs_products, *(box.stage for box in boxes.values())) == []
    for box in boxes.values():
        assert list(box.mosaics.rglob("*.fits")) == [], f"{box.root.name}: staging not empty"
    rows = [line.split("|") for line in pg_server.psql(
        "SELECT data_id, status, node, published_path FROM data_registry").splitlines()]
    assert len(rows) == len(expected)
    for data_id, status, node, published in rows:
        assert status == "published", data_id
        assert node == f"node-{data_id.split('/')[0]}", (data_id, node)
        assert os.path.relpath(published, tmpfs_products / "mosaics") in expected
    assert pg_server.psql("SELECT count(*), count(DISTINCT data_id) FROM publish_log") == \
        f"{len(expected)}|{len(expected)}", "a product was recorded as published twice"
    kinds = pg_server.psql("SELECT kind, count(*) FROM publish_failures GROUP BY kind")
    print(f"failure history: {kinds or 'none'}")
