"""Events in a real journald: the fields and MESSAGE_IDs operators filter on with journalctl.

The daemon runs beside a private systemd-journald (tests/support/with-journald.sh); the
journal is read back with journalctl, nothing is taken from a return value.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from contimg_publisher.logs import MESSAGE_IDS
from tests.helpers import REPO, Sandbox, mount_tmpfs, umount, write_fits

# Each test boots or drives systemd's own pieces: seconds apiece.
pytestmark = pytest.mark.slow

SUPPORT = REPO / "tests" / "support"


@pytest.fixture(scope="module")
def journal(tmp_path_factory, journald):
    """Run the scenario once; the journal entries of contimg-publisher, by EVENT."""
    tmp_path = tmp_path_factory.mktemp("journald")
    products = tmp_path / "products"
    # Full by inodes once the small mosaic is in (the root, mosaics/, small.fits): statvfs
    # shows room for the big one, so its copy starts and meets a real ENOSPC. (A product
    # larger than the free bytes would wait for space instead, without failing.)
    mount_tmpfs(products, "1m,nr_inodes=3")
    try:
        box = Sandbox(tmp_path, products_root=products,
                      log={"format": "journal", "level": "info"},
                      publish={"max_attempts": 2, "backoff_initial_seconds": 0.5,
                               "backoff_max_seconds": 1, "error_max_chars": 60})
        small = write_fits(box.mosaics / "small.fits", pixels=32, seed=1)
        late = write_fits(tmp_path / "incoming" / "big.fits", pixels=64, seed=2)
        assert len(late) < 512 * 1024
        whole = write_fits(box.mosaics / "truncated.fits", pixels=64, seed=3)
        (box.mosaics / "truncated.fits").write_bytes(whole[:-2880])
        broken = tmp_path / "broken.toml"
        broken.write_text(box.config_path.read_text().replace("settle_seconds", "settle_secs"))
        out = tmp_path / "journal.jsonl"
        env = dict(os.environ)
        env.pop("JOURNAL_STREAM", None)
        proc = subprocess.run([str(SUPPORT / "with-journald.sh"), sys.executable,
                               str(SUPPORT / "journal_scenario.py"), str(box.config_path),
                               str(broken), str(out), str(tmp_path / "incoming" / "big.fits"),
                               str(box.mosaics / "big.fits")], capture_output=True, text=True,
                              timeout=300, env=env, cwd=REPO)
        stderr = out.with_suffix(".stderr")
        assert proc.returncode == 0, (proc.stdout, proc.stderr,
                                      stderr.read_text() if stderr.exists() else "")
        summary = json.loads(proc.stdout.strip().splitlines()[-1])
        entries = [json.loads(line) for line in out.read_text().splitlines() if line]
        by_event: dict[str, list[dict[str, str]]] = {}
        for entry in entries:
            by_event.setdefault(entry.get("EVENT", ""), []).append(entry)
        published = (products / "mosaics" / "small.fits").read_bytes()
        yield {"summary": summary, "events": by_event, "published": published, "small": small}
    finally:
        umount(products)


@pytest.mark.slow
def test_publish_success_in_journal(journal):
    [entry] = journal["events"]["published"]
    assert entry["MESSAGE_ID"] == MESSAGE_IDS["published"]
    assert entry["DATA_ID"] == "small"
    assert entry["DATA_TYPE"] == "mosaic"
    assert entry["STAGE_PATH"].endswith("/mosaics/small.fits")
    assert entry["PUBLISHED_PATH"].endswith("/products/mosaics/small.fits")
    assert entry["PRIORITY"] == "6"
    assert entry["_PID"] == str(journal["summary"]["pid"])
    assert journal["published"] == journal["small"]


def test_publish_failure_in_journal_with_truncated_error(journal):
    failures = journal["events"]["publish_failed"]
    assert [e["PUBLISH_ATTEMPT"] for e in failures] == ["1", "2"]
    for entry in failures:
        assert entry["MESSAGE_ID"] == MESSAGE_IDS["publish_failed"]
        assert entry["DATA_ID"] == "big"
        assert entry["ERROR_KIND"] == "no_space"
        assert entry["PRIORITY"] == "4"
        assert 0 < len(entry["ERROR"]) <= 60
    [last] = journal["events"]["max_attempts_reached"]
    assert last["MESSAGE_ID"] == MESSAGE_IDS["max_attempts_reached"]
    assert last["DATA_ID"] == "big" and last["PRIORITY"] == "3"


def test_rejected_in_journal(journal):
    [entry] = journal["events"]["rejected"]
    assert entry["MESSAGE_ID"] == MESSAGE_IDS["rejected"]
    assert entry["DATA_ID"] == "truncated"
    assert "truncated" in entry["ERROR"] or "size" in entry["ERROR"], entry["ERROR"]


def test_reload_results_in_journal(journal):
    [failed] = journal["events"]["reload_failed"]
    assert failed["MESSAGE_ID"] == MESSAGE_IDS["reload_failed"]
    assert failed["KEY"] == "detect.settle_secs"
    assert failed["CONFIG"].endswith("config.toml")
    [ok] = journal["events"]["reload_ok"]
    assert ok["MESSAGE_ID"] == MESSAGE_IDS["reload_ok"]
    assert journal["summary"]["daemon_exit"] == 0
