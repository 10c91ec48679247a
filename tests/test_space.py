"""Free space first: a product that does not fit the products filesystem waits, without a
failed attempt or a leftover, and is published once space appears (a real tmpfs)."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import time
from pathlib import Path

import pytest

from contimg_publisher.registry import Registry
from tests.helpers import (
    REPO,
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

MIB = 1 << 20


@pytest.fixture
def small_products(tmp_path: Path, tmpfs: MountTmpfs) -> Path:
    return tmpfs(tmp_path / "products", "8m")


def row_of(box: Sandbox, data_id: str):  # noqa: ANN201 - a registry Product
    with Registry(box.registry) as reg:
        return reg.get(data_id), reg.history(data_id)


@pytest.mark.slow
@pytest.mark.root("mounting a small tmpfs for the products area")
def test_a_product_too_big_for_the_products_disk_waits_then_publishes(
        tmp_path: Path, make_sandbox: MakeSandbox, small_products: Path) -> None:
    box = make_sandbox(products_root=small_products,
                       detect={"settle_seconds": 0.2}, publish={"min_free_bytes": 1 * MIB,
                                                                "backoff_initial_seconds": 0.5})
    staged = box.mosaics / "nightly_20250101.fits"
    data = write_fits(staged, pixels=1500, seed=5)  # 9 MiB: more than the 8 MiB disk
    assert len(data) > 8 * MIB
    notify = NotifySocket(tmp_path / "notify.sock")
    proc = start_daemon(box, notify.path)
    try:
        notify.wait("READY", "1", timeout=60)
        wait_for(lambda: any(e.get("event") == "waiting_for_space" for e in log_events(box)),
                 timeout=30, what="the wait for space logged")
        time.sleep(3.0)  # several more tries, after 0.5 s each
        # Each try claims it for an instant (publishing) and gives it back (staging).
        row, history = wait_for(
            lambda: (got := row_of(box, "nightly_20250101"))[0] is not None
            and got[0].status == "staging" and got, timeout=10, interval=0.05,
            what="the product waiting between two tries")
        assert row.publish_attempts == 0 and history == []  # not a failed attempt
        assert list(small_products.rglob("*")) in ([], [small_products / "mosaics"])
        shown = json.loads(box.cli("show", "nightly_20250101", "--json", check=True).stdout)
        assert "space" in (shown["held_reason"] or ""), shown
        listed = box.cli("list", check=True).stdout
        assert "space" in listed, listed
        waits = [e for e in log_events(box) if e.get("event") == "waiting_for_space"]
        assert len(waits) == 1, waits  # logged once, however often it is tried
        assert "min_free_bytes" in waits[0]["reason"] and staged.name in waits[0]["reason"]

        subprocess.run(["mount", "-o", "remount,size=64m", str(small_products)], check=True)
        wait_for(lambda: row_of(box, "nightly_20250101")[0].status == "published",
                 timeout=30, what="published once space appeared")
    finally:
        assert stop(proc) == 0
        notify.close()
    row, history = row_of(box, "nightly_20250101")
    assert row.publish_attempts == 0 and history == []
    archived = Path(row.published_path)
    assert hashlib.sha256(archived.read_bytes()).hexdigest() == hashlib.sha256(data).hexdigest()
    assert not staged.exists()
    assert not [p for p in small_products.rglob("*") if ".contimg-tmp" in p.name]


@pytest.mark.root("mounting a small tmpfs for the products area")
def test_the_margin_counts_and_a_product_that_fits_is_copied(
        tmp_path: Path, make_sandbox: MakeSandbox, small_products: Path) -> None:
    """A 3 MiB product fits the 8 MiB disk, but not beside a 6 MiB margin: it waits; the
    same product with the margin lowered (a reload) is published."""
    box = make_sandbox(products_root=small_products, detect={"settle_seconds": 0.2},
                       publish={"min_free_bytes": 6 * MIB, "backoff_initial_seconds": 0.5})
    staged = box.mosaics / "group_1.fits"
    data = write_fits(staged, pixels=880, seed=6)
    assert 2 * MIB < len(data) < 4 * MIB
    notify = NotifySocket(tmp_path / "notify.sock")
    proc = start_daemon(box, notify.path)
    try:
        notify.wait("READY", "1", timeout=60)
        wait_for(lambda: any(e.get("event") == "waiting_for_space" for e in log_events(box)),
                 timeout=30, what="the wait for space logged")
        box.update(publish={"min_free_bytes": 1 * MIB})
        proc.send_signal(1)  # SIGHUP: reload
        wait_for(lambda: row_of(box, "group_1")[0].status == "published",
                 timeout=30, what="published with the margin lowered")
    finally:
        assert stop(proc) == 0
        notify.close()
    row, _history = row_of(box, "group_1")
    assert Path(row.published_path).read_bytes() == data


def test_promtool_unit_tests_the_filesystem_alert(tmp_path: Path, promtool: str) -> None:
    job = 'job="contimg-publisher", instance="pub:9465"'
    size = 1000 * 2**30
    tests = {
        "rule_files": [str(REPO / "etc" / "prometheus" / "contimg-publisher-rules.yml")],
        "evaluation_interval": "1m",
        "tests": [{
            "interval": "1m",
            "input_series": [
                {"series": f'contimg_publisher_filesystem_size_bytes{{{job}, root="products"}}',
                 "values": f"{size}x40"},
                # 20 % free for 10 minutes, then 10 % free (90 % used)
                {"series": f'contimg_publisher_filesystem_free_bytes{{{job}, root="products"}}',
                 "values": f"{size // 5}x10 {size // 10}x30"},
                {"series": f'contimg_publisher_filesystem_size_bytes{{{job}, root="stage"}}',
                 "values": f"{size}x40"},
                {"series": f'contimg_publisher_filesystem_free_bytes{{{job}, root="stage"}}',
                 "values": f"{size // 2}x40"}],
            "alert_rule_test": [
                {"eval_time": "9m", "alertname": "ContimgPublisherFilesystemFull",
                 "exp_alerts": []},
                {"eval_time": "15m", "alertname": "ContimgPublisherFilesystemFull",
                 "exp_alerts": []},  # above 85 % for 4 minutes only
                {"eval_time": "25m", "alertname": "ContimgPublisherFilesystemFull",
                 "exp_alerts": [{"exp_labels": {"severity": "warning", "root": "products",
                                                "job": "contimg-publisher",
                                                "instance": "pub:9465"},
                                 "exp_annotations": {
                                     "summary": "The products filesystem of contimg-publisher "
                                     "on pub:9465 is 90% full",
                                     "description": "Above 85 % used. A full products disk "
                                     "holds every product that does not fit "
                                     "(`waiting_for_space` in the journal, \"space\" in "
                                     "`contimg-publisher list`); a full staging disk stops "
                                     "the pipeline; a full registry disk stops publishing. "
                                     "Free space, or move the root to a larger disk."}}]},
            ]}]}
    path = tmp_path / "t.yml"
    path.write_text(json.dumps(tests))
    out = subprocess.run([promtool, "test", "rules", str(path)], capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr


def test_filesystem_gauges_name_each_root(make_sandbox: MakeSandbox) -> None:
    """The gauges come from statvfs of each root, as `df` sees them."""
    from contimg_publisher.metrics import Metrics
    box = make_sandbox()
    box.registry.parent.mkdir()
    metrics = Metrics(box.config())
    text = metrics.exposition().decode()
    for root, path in (("stage", box.stage), ("products", box.products),
                       ("registry", box.registry.parent)):
        st = os.statvfs(path)
        size_line = f'contimg_publisher_filesystem_size_bytes{{root="{root}"}} '
        (line,) = [x for x in text.splitlines() if x.startswith(size_line)]
        assert float(line.split()[-1]) == st.f_blocks * st.f_frsize
        assert f'contimg_publisher_filesystem_free_bytes{{root="{root}"}} ' in text
