"""Taking over from the older registry code: what it left behind is resolved from disk.

The registry is written the way the older code wrote it (Python sqlite3, the legacy DDL,
rows stuck in `publishing`, attempt counters past the limit); then one `scan` pass runs.
"""

from __future__ import annotations

import hashlib
import sqlite3
import time
from pathlib import Path

import pytest

from contimg_publisher.registry import LEGACY_DDL
from tests.helpers import Sandbox, write_fits

LEGACY_COLUMNS = ("id", "data_type", "data_id", "base_path", "status", "stage_path",
                  "published_path", "created_at", "staged_at", "published_at", "publish_mode",
                  "metadata_json", "qa_status", "validation_status", "finalization_status",
                  "auto_publish_enabled", "publish_attempts", "publish_error",
                  "photometry_status", "photometry_job_id")


class LegacySite:
    """A sandbox whose registry was written by the older code."""

    def __init__(self, root: Path) -> None:
        self.box = Sandbox(root, publish={"max_attempts": 3})
        self.dest = self.box.products / "mosaics"
        self.dest.mkdir(parents=True)
        self.box.registry.parent.mkdir(parents=True, exist_ok=True)
        self.db = sqlite3.connect(self.box.registry)
        self.db.executescript(LEGACY_DDL)
        self.when = time.time() - 86400

    def row(self, data_id: str, status: str, attempts: int = 0,
            published_path: str | None = None) -> None:
        self.db.execute(
            "INSERT INTO data_registry (data_type, data_id, base_path, status, stage_path,"
            " published_path, created_at, staged_at, published_at, metadata_json,"
            " qa_status, publish_attempts, publish_error, photometry_status)"
            " VALUES ('mosaic', ?, ?, ?, ?, ?, ?, ?, ?, '{\"legacy\": 1}', 'good', ?, ?, 'done')",
            (data_id, str(self.box.stage), status, str(self.box.mosaics / f"{data_id}.fits"),
             published_path, self.when, self.when,
             self.when if status == "published" else None, attempts,
             "copy failed: disk full" if attempts else None))
        self.db.commit()

    def legacy_values(self) -> dict[str, tuple]:
        db = sqlite3.connect(self.box.registry)
        try:
            return {r[2]: r for r in db.execute(
                f"SELECT {', '.join(LEGACY_COLUMNS)} FROM data_registry")}
        finally:
            db.close()


@pytest.fixture
def site(tmp_path):
    s = LegacySite(tmp_path)
    yield s
    s.db.close()


def sha(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def test_stuck_publishing_with_complete_copy_becomes_published(site):
    data = write_fits(site.dest / "done.fits", seed=1)  # moved, then the process died
    site.row("done", "publishing")
    out = site.box.cli("scan", check=True)
    assert "reconciled done" in out.stdout and "published" in out.stdout, out.stdout
    row = site.box.row("done")
    assert row["status"] == "published"
    assert row["published_path"] == str(site.dest / "done.fits")
    assert row["checksum"] == sha(data) and row["size_bytes"] == len(data)
    assert (site.dest / "done.fits").read_bytes() == data
    assert sorted(p.name for p in site.dest.iterdir()) == ["done.fits"]


def test_stuck_publishing_with_truncated_copy_is_published_whole_under_its_name(site):
    data = write_fits(site.box.mosaics / "cut.fits", seed=2)
    (site.dest / "cut.fits").write_bytes(data[:5000])  # killed mid-copy
    site.row("cut", "publishing")
    site.box.cli("scan", check=True)
    row = site.box.row("cut")
    assert row["status"] == "published", row
    assert (site.dest / "cut.fits").read_bytes() == data
    assert sorted(p.name for p in site.dest.iterdir()) == ["cut.fits"]
    assert not (site.box.mosaics / "cut.fits").exists()
    assert [f["kind"] for f in row["failures"]] == ["interrupted"]
    assert row["publish_attempts"] == 0


def test_stuck_publishing_next_to_other_content_never_overwrites(site):
    data = write_fits(site.box.mosaics / "other.fits", seed=3)
    stranger = write_fits(site.dest / "other.fits", seed=99)  # not a prefix of ours
    site.row("other", "publishing")
    site.box.cli("scan", check=True)
    assert (site.dest / "other.fits").read_bytes() == stranger
    assert (site.dest / "other.v2.fits").read_bytes() == data
    assert site.box.row("other")["published_path"] == str(site.dest / "other.v2.fits")


def test_stuck_publishing_with_truncated_copy_and_no_source_is_not_published(site):
    data = write_fits(site.dest / "lost.fits", seed=4)
    (site.dest / "lost.fits").write_bytes(data[:5000])
    site.row("lost", "publishing")
    site.box.cli("scan", check=True)
    row = site.box.row("lost")
    assert row["status"] != "published", row
    assert row["status"] == "rejected" and "staging area" in row["publish_error"], row
    assert (site.dest / "lost.fits").read_bytes() == data[:5000], "left for an operator"


def test_attempts_past_the_limit_wait_for_an_operator(site):
    data = write_fits(site.box.mosaics / "tired.fits", seed=5)
    site.row("tired", "staging", attempts=5)
    site.box.cli("scan", check=True)
    row = site.box.row("tired")
    assert row["status"] == "failed" and row["publish_attempts"] == 5, row
    assert not (site.dest / "tired.fits").exists()
    site.box.cli("retry", "tired", check=True)
    site.box.cli("scan", check=True)
    assert site.box.row("tired")["status"] == "published"
    assert (site.dest / "tired.fits").read_bytes() == data


def test_published_rows_and_legacy_values_are_left_as_they_were(site):
    write_fits(site.dest / "old.fits", seed=6)
    site.row("old", "published", published_path=str(site.dest / "old.fits"))
    write_fits(site.box.mosaics / "new.fits", seed=7)
    site.row("new", "staging")
    site.db.execute("INSERT INTO data_tags (data_id, tag) VALUES ('old', 'survey')")
    site.db.execute("INSERT INTO data_relationships (parent_data_id, child_data_id,"
                    " relationship_type) VALUES ('old', 'new', 'derived_from')")
    site.db.commit()
    before = site.legacy_values()
    site.box.cli("scan", check=True)
    after = site.legacy_values()
    assert after["old"] == before["old"]
    changed = {c for c, a, b in zip(LEGACY_COLUMNS, before["new"], after["new"], strict=True)
               if a != b}
    # Publishing sets what publishing means in the legacy columns, and nothing else.
    assert changed == {"status", "published_path", "published_at", "publish_mode"}, changed
    assert after["new"][LEGACY_COLUMNS.index("status")] == "published"
    db = sqlite3.connect(site.box.registry)
    try:
        assert db.execute("SELECT data_id, tag FROM data_tags").fetchall() == [("old", "survey")]
        assert ("old", "new", "derived_from") in db.execute(
            "SELECT parent_data_id, child_data_id, relationship_type"
            " FROM data_relationships").fetchall()
    finally:
        db.close()
