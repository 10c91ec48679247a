"""Several nodes, one PostgreSQL registry, one products area on another filesystem (a
tmpfs), daemons SIGKILLed at random moments and restarted while products keep arriving,
and the server itself restarted once with `pg_ctl restart -m immediate`. Three nodes, each
with its own staging folder; node-a runs two daemons, as a site adds a second publish
stream to one staging area: the same stage_root and node name, each daemon its own lock
file, the server's claims keeping them apart. At the end every product is in the archive
exactly once and byte-identical, no temporary name is left, every staging folder is
empty, and every row is `published` by the node that staged it, with one publish record
each, and by one daemon only. Read from the disk, the server and the daemons' logs.

Copies are slowed by the test-only per-chunk delay so that kills land inside copies and
in the steps after them, not only between products.
"""

from __future__ import annotations

import copy
import os
import random
import signal
import subprocess
import time
from pathlib import Path

import pytest

from contimg_publisher.transfer import DELAY_ENV
from tests.helpers import Sandbox, log_events, start_daemon, wait_for
from tests.pg import Server
from tests.test_publish import (
    archive_files,
    sha256,
    stage,
    temps,
)

NODES = ("node-a", "node-b", "node-c")
# The daemons: (node, index); node-a runs two.
DAEMONS = (("node-a", 1), ("node-a", 2), ("node-b", 1), ("node-c", 1))
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


def _second_daemon(box: Sandbox, root: Path) -> Sandbox:
    """Another daemon of box's node: its configuration is box's (staging folder, node name,
    registry, products area) but for its lock file; its log is its own."""
    second = copy.deepcopy(box)
    root.mkdir()
    second.root, second.config_path = root, root / "config.toml"
    second.update(paths={"lock_file": str(root / "publisher.lock")})
    return second


def _start(box: Sandbox, delay: float) -> subprocess.Popen[str]:
    return start_daemon(box, extra_env={DELAY_ENV: str(delay)})


def _on_disk_is_sound(products: Path, expected: dict[str, str]) -> None:
    """Between kills: whatever sits under a final name is a complete, identical product."""
    for rel, data in archive_files(products / "mosaics").items():
        assert not rel.endswith(".fits") or sha256(data) == expected.get(rel), \
            f"{rel} under its final name is not the product it names"


@pytest.mark.slow
def test_daemons_killed_at_random_on_three_nodes_publish_each_product_once(
        tmp_path: Path, pg_server: Server, tmpfs_products: Path) -> None:
    seed = int(os.environ.get("TORTURE_SEED", "15"))
    rng = random.Random(seed)
    boxes = {node: _sandbox(tmp_path / node, pg_server, node, tmpfs_products)
             for node in NODES}
    daemons = {(node, 1): box for node, box in boxes.items()}
    daemons["node-a", 2] = _second_daemon(boxes["node-a"], tmp_path / "node-a-2")
    assert daemons["node-a", 2].tables["paths"]["stage_root"] == str(boxes["node-a"].stage)
    expected: dict[str, str] = {}

    def arrive(node: str, i: int) -> None:
        rel = f"{node[-1]}/m_{node[-1]}_{i:02d}.fits"
        expected[rel] = sha256(stage(boxes[node], rel, pixels=PIXELS, seed=hash((node, i))
                                     % 10_000))

    for node in NODES:
        for i in range(FIRST):
            arrive(node, i)
    procs: dict[tuple[str, int], subprocess.Popen[str]] = {
        key: _start(box, delay=0.2) for key, box in daemons.items()}
    late = [(node, FIRST + i) for node in NODES for i in range(LATE)]
    rng.shuffle(late)
    kills, restarted_server = 0, False
    started = time.monotonic()
    try:
        while kills < KILLS:
            time.sleep(rng.uniform(0.4, 1.2))
            if late:
                arrive(*late.pop())
            key = rng.choice(DAEMONS)
            if procs[key].poll() is None:
                procs[key].send_signal(signal.SIGKILL)
                kills += 1
            procs[key].wait()
            _on_disk_is_sound(tmpfs_products, expected)
            if kills == KILLS // 2 and not restarted_server:
                pg_server.restart("immediate")
                restarted_server = True
            procs[key] = _start(daemons[key], delay=rng.choice([0.1, 0.2, 0.3]))
        for node, i in late:
            arrive(node, i)
        late = []
        # The kills are over: the daemons running now (no more delay) finish the work.
        for key in DAEMONS:
            if procs[key].poll() is None:
                procs[key].send_signal(signal.SIGKILL)
            procs[key].wait()
            procs[key] = _start(daemons[key], delay=0.0)

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
    # Each daemon published only its own node's products; node-a's two split theirs as
    # their claims fell (a claim takes a whole batch of due rows, so one may get none).
    published = {key: {e["data_id"] for e in log_events(box) if e.get("event") == "published"}
                 for key, box in daemons.items()}
    for key, ids in published.items():
        assert all(d.startswith(key[0][-1] + "/") for d in ids), (key, ids)
    assert not published["node-a", 1] & published["node-a", 2], "published by both"
    print("published per daemon: " + ", ".join(f"{node}#{i} {len(ids)}"
                                                for (node, i), ids in published.items()))
    kinds = pg_server.psql("SELECT kind, count(*) FROM publish_failures GROUP BY kind")
    print(f"failure history: {kinds or 'none'}")
