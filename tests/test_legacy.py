"""Taking over from the older registry code, and sharing the file with it.

The registry is written the way the pipeline's own code writes it, from what its public
code is known to do (facts, not its code): Python sqlite3 on the legacy DDL; rows of other
types (`ms`, `calibrated_ms`, `image`); the full staged path as data_id
(register_pipeline_data); re-registration with INSERT OR REPLACE, which gives the row a new
id and resets every other column; QA and validation verdicts set by finalize_data
(qa_status passed/failed/warning/pending, validation_status validated/invalid/pending); a
publish claimed by setting `publishing` alone, copied straight to the final name, then
recorded as published with publish_error cleared; a failure put back to `staging` with
attempts + 1 and the error text. Then `scan` passes, or the daemon, run against it.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import sqlite3
import subprocess
import textwrap
import time
from pathlib import Path
from typing import Any

import pytest

from contimg_publisher.registry import LEGACY_DDL
from tests.helpers import (
    PYTHON,
    Sandbox,
    log_events,
    start_daemon,
    stop,
    wait_for,
    write_fits,
)

LEGACY_COLUMNS = ("id", "data_type", "data_id", "base_path", "status", "stage_path",
                  "published_path", "created_at", "staged_at", "published_at", "publish_mode",
                  "metadata_json", "qa_status", "validation_status", "finalization_status",
                  "auto_publish_enabled", "publish_attempts", "publish_error",
                  "photometry_status", "photometry_job_id")


class LegacySite:
    """A sandbox whose registry was written by the older code, which keeps writing it."""

    def __init__(self, root: Path, **overrides: Any) -> None:
        overrides.setdefault("publish", {})
        overrides["publish"] = {"max_attempts": 3, "legacy_quiet_seconds": 0,
                                **overrides["publish"]}
        self.box = Sandbox(root, **overrides)
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

    # --- what the legacy code does, as facts -------------------------------------------------

    def register(self, data_type: str, data_id: str, stage_path: Path | str,
                 metadata: dict[str, Any] | None = None, auto_publish: bool = True) -> None:
        """register_data: INSERT OR REPLACE of the legacy columns; a row that existed is
        deleted and inserted again (new id), every column not named back at its default."""
        now = time.time()
        self.db.execute(
            "INSERT OR REPLACE INTO data_registry (data_type, data_id, base_path, status,"
            " stage_path, created_at, staged_at, metadata_json, auto_publish_enabled,"
            " finalization_status) VALUES (?, ?, ?, 'staging', ?, ?, ?, ?, ?, 'pending')",
            (data_type, data_id, str(Path(stage_path).parent), str(stage_path), now, now,
             json.dumps(metadata) if metadata else None, 1 if auto_publish else 0))
        self.db.commit()

    def finalize(self, data_id: str, qa: str | None = None,
                 validation: str | None = None) -> None:
        """finalize_data: finalized, with the verdicts it was given."""
        sets, args = ["finalization_status = 'finalized'"], []
        if qa:
            sets.append("qa_status = ?")
            args.append(qa)
        if validation:
            sets.append("validation_status = ?")
            args.append(validation)
        self.db.execute(f"UPDATE data_registry SET {', '.join(sets)} WHERE data_id = ?",
                        (*args, data_id))
        self.db.commit()

    def claim(self, data_id: str) -> None:
        """trigger_auto_publish's claim: status alone, no lease, no heartbeat."""
        self.db.execute("UPDATE data_registry SET status = 'publishing' WHERE data_id = ?",
                        (data_id,))
        self.db.commit()

    def get(self, data_id: str) -> dict[str, Any] | None:
        """get_data: the legacy columns of the row of that id."""
        cur = self.db.execute(f"SELECT {', '.join(LEGACY_COLUMNS)} FROM data_registry"
                              " WHERE data_id = ?", (data_id,))
        row = cur.fetchone()
        return None if row is None else dict(zip(LEGACY_COLUMNS, row, strict=True))

    def full_rows(self) -> dict[int, tuple]:
        """Every column of every row (the daemon's too), by id, read apart from both."""
        db = sqlite3.connect(self.box.registry)
        try:
            return {r[0]: r for r in db.execute("SELECT * FROM data_registry ORDER BY id")}
        finally:
            db.close()

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


@pytest.fixture
def make_site(tmp_path):
    made: list[LegacySite] = []

    def make(**overrides: Any) -> LegacySite:
        made.append(LegacySite(tmp_path, **overrides))
        return made[-1]
    yield make
    for s in made:
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


@pytest.mark.parametrize("products_fs", ["same_fs", "across"])
def test_stuck_publishing_with_complete_copy_and_staged_file_is_adopted_not_copied_again(
        tmp_path, products_fs, tmpfs):
    """Across filesystems the staged file is registered with its digest pending (the copy
    reads it), so only the bytes on both sides can tell the copy is the product's."""
    if products_fs == "across":
        tmpfs(tmp_path / "products", "64m")
    site = LegacySite(tmp_path, products_root=tmp_path / "products")
    try:
        _adopted_not_copied_again(site)
    finally:
        site.db.close()


def _adopted_not_copied_again(site: LegacySite) -> None:
    data = write_fits(site.box.mosaics / "twice.fits", seed=6)
    # The older code copied it whole, then died before its unlink and its row update.
    (site.dest / "twice.fits").write_bytes(data)
    site.row("twice", "publishing")
    out = site.box.cli("scan", check=True)
    row = site.box.row("twice")
    assert row["status"] == "published", (row, out.stdout)
    assert row["published_path"] == str(site.dest / "twice.fits")
    assert row["checksum"] == sha(data) and row["size_bytes"] == len(data)
    assert sorted(p.name for p in site.dest.iterdir()) == ["twice.fits"]
    assert (site.dest / "twice.fits").read_bytes() == data
    assert not (site.box.mosaics / "twice.fits").exists()
    assert site.get("twice")["status"] == "published"
    adopted = [e for e in out.stdout.splitlines() if "twice" in e]
    assert not any(".v2" in line for line in adopted), out.stdout


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


@pytest.mark.slow
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


# --- sharing the file with the pipeline's own code -------------------------------------------

def _folder_product(folder: Path, seed: int) -> None:
    """A measurement set as the pipeline leaves it: a folder of CASA table files."""
    folder.mkdir(parents=True)
    (folder / "table.dat").write_bytes(b"casa table %d\n" % seed * 64)
    (folder / "table.f0").write_bytes(hashlib.sha256(b"%d" % seed).digest() * 128)


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file()}


def _rows_at(site: LegacySite, path: Path) -> int:
    db = sqlite3.connect(site.box.registry)
    try:
        return int(db.execute("SELECT COUNT(*) FROM data_registry WHERE stage_path = ?",
                              (str(path),)).fetchone()[0])
    finally:
        db.close()


@pytest.mark.slow
def test_rows_of_other_writers_stay_byte_identical_through_scans_and_the_daemon(make_site):
    site = make_site(detect={"rescan_seconds": 0.5}, publish={"reconcile_seconds": 0.5})
    stage = site.box.stage
    ms = stage / "ms" / "2026-11-28T01:02:03.ms"
    cal = stage / "calibrated_ms" / "2026-11-28T01:02:03_cal.ms"
    _folder_product(ms, 1)
    _folder_product(cal, 2)
    image = stage / "images" / "2026-11-28T01:02:03.img.fits"
    write_fits(image, seed=11)
    tile = site.box.mosaics / "tile_7.fits"  # an `image` the pipeline keeps in mosaics/
    write_fits(tile, seed=12)
    site.register("ms", str(ms), ms)  # path-style ids, as register_pipeline_data writes them
    site.register("calibrated_ms", str(cal), cal)
    site.register("image", str(image), image, metadata={"shape": [64, 64]})
    site.register("image", "tile_7", tile)
    site.register("image", "gone", stage / "images" / "gone.fits")  # moved on by its writer
    site.register("ms", "busy.ms", stage / "ms" / "busy.ms")
    site.claim("busy.ms")  # the pipeline is publishing it itself
    site.register("calibrated_ms", "tired_cal", stage / "calibrated_ms" / "tired_cal.ms")
    site.db.execute("UPDATE data_registry SET publish_attempts = 5, publish_error = 'no space'"
                    " WHERE data_id = 'tired_cal'")
    site.db.commit()
    mosaic = write_fits(site.box.mosaics / "nightly_20261128.fits", seed=13)
    site.box.cli("migrate", check=True)
    before = site.full_rows()
    staged = {k: v for k, v in _files(stage).items() if "nightly" not in k}

    for _ in range(3):
        site.box.cli("scan", check=True)
    proc = start_daemon(site.box)
    try:
        wait_for(lambda: sum(e.get("event") == "rescan" for e in log_events(site.box)) >= 5,
                 timeout=60, what="five rescans by the daemon")
    finally:
        assert stop(proc) == 0

    after = site.full_rows()
    assert {i: after.get(i) for i in before} == before
    new = [r for i, r in after.items() if i not in before]
    assert len(new) == 1, new  # the mosaic; nothing registered for the `image` in mosaics/
    assert _rows_at(site, tile) == 1
    assert _files(stage) == staged
    assert (site.dest / "nightly_20261128.fits").read_bytes() == mosaic
    listed = {r["data_id"]: r for r in site.box.registry_rows()}
    others = {str(ms), str(cal), str(image), "tile_7", "gone", "busy.ms", "tired_cal"}
    assert others <= set(listed)
    assert all(not listed[d]["owned"] for d in others)
    assert listed["nightly_20261128"]["owned"] and \
        listed["nightly_20261128"]["status"] == "published"
    counts = json.loads(site.box.cli("status", "--json").stdout)["counts"]
    assert (counts["staging"], counts["publishing"], counts["published"]) == (6, 1, 1), counts


def test_a_path_style_id_is_adopted_never_duplicated(site):
    path = site.box.mosaics / "mosaic_20261128_010203_n10.fits"
    data = write_fits(path, seed=21)
    site.register("mosaic", str(path), path)
    site.box.cli("scan", check=True)
    site.box.cli("scan", check=True)
    assert _rows_at(site, path) == 1
    legacy = site.get(str(path))
    assert legacy is not None and legacy["status"] == "published", legacy
    assert legacy["published_path"] == str(site.dest / path.name)
    assert (site.dest / path.name).read_bytes() == data
    assert [r["data_id"] for r in site.box.registry_rows()] == [str(path)]


@pytest.mark.slow
def test_qa_failed_or_invalid_is_held_by_default_and_no_verdict_publishes(site):
    cases = [("qa_failed", "failed", "validated"), ("invalid", "passed", "invalid"),
             ("no_verdict", None, None), ("warned", "warning", "pending"),
             ("passed", "passed", "validated")]
    data = {}
    for seed, (name, qa, validation) in enumerate(cases):
        path = site.box.mosaics / f"{name}.fits"
        data[name] = write_fits(path, seed=30 + seed)
        site.register("mosaic", name, path)
        if qa or validation:
            site.finalize(name, qa, validation)
    site.box.cli("scan", check=True)
    site.box.cli("scan", check=True)
    for name in ("no_verdict", "warned", "passed"):
        assert site.get(name)["status"] == "published", name
        assert (site.dest / f"{name}.fits").read_bytes() == data[name]
    reasons = {"qa_failed": "QA gate: qa_status is 'failed'",
               "invalid": "QA gate: validation_status is 'invalid'"}
    for name, reason in reasons.items():
        assert (site.box.mosaics / f"{name}.fits").read_bytes() == data[name]
        assert not (site.dest / f"{name}.fits").exists()
        row = site.box.row(name)
        assert (row["status"], row["held"], row["held_reason"]) == ("staging", True, reason)
        shown = site.box.cli("show", name, check=True).stdout
        assert "held" in shown.splitlines()[0] and f"held        {reason}" in shown, shown
    listed = site.box.cli("list", check=True).stdout
    assert all(f"held: {reason}" in listed for reason in reasons.values()), listed
    status = json.loads(site.box.cli("status", "--json").stdout)
    assert {h["data_id"]: h["reason"] for h in status["held"]} == reasons
    text = site.box.cli("status").stdout
    assert all(f"  {name}  {reason}" in text for name, reason in reasons.items()), text


@pytest.mark.slow
def test_a_rule_that_requires_qa_waits_for_the_pipelines_verdict(make_site):
    rule = {"type": "mosaic", "glob": "mosaics/**/*.fits", "destination": "mosaics",
            "require": {"qa_status": "passed", "validation_status": "validated"}}
    site = make_site(products=[rule])
    path = site.box.mosaics / "group_7.fits"
    data = write_fits(path, seed=40)
    site.register("mosaic", "group_7", path)
    site.box.cli("scan", check=True)
    assert site.box.row("group_7")["held_reason"] == \
        "QA gate: waits for qa_status 'passed' (now NULL)"
    site.finalize("group_7", qa="passed")
    site.box.cli("scan", check=True)
    assert site.box.row("group_7")["held_reason"] == \
        "QA gate: waits for validation_status 'validated' (now NULL)"
    assert path.read_bytes() == data and not (site.dest / "group_7.fits").exists()
    site.finalize("group_7", qa="passed", validation="validated")
    site.box.cli("scan", check=True)
    assert site.get("group_7")["status"] == "published"
    assert (site.dest / "group_7.fits").read_bytes() == data


@pytest.mark.slow
def test_a_rule_that_requires_photometry_waits_for_it_in_the_running_daemon(make_site):
    """The legacy check_auto_publish_criteria publishes a mosaic only once its photometry
    is `completed`: the same rule, kept by a running daemon against the pipeline's writes."""
    rule = {"type": "mosaic", "glob": "mosaics/**/*.fits", "destination": "mosaics",
            "require": {"photometry_status": "completed"}}
    site = make_site(products=[rule])
    path = site.box.mosaics / "nightly_20261201.fits"
    data = write_fits(path, seed=42)
    site.register("mosaic", "nightly_20261201", path)
    site.finalize("nightly_20261201", qa="passed", validation="validated")
    proc = start_daemon(site.box)
    try:
        waiting = "QA gate: waits for photometry_status 'completed' (now NULL)"
        wait_for(lambda: (site.box.row("nightly_20261201") or {}).get("held_reason")
                 == waiting, timeout=60, what="the daemon to register it, held")
        site.db.execute("UPDATE data_registry SET photometry_status = 'running'"
                        " WHERE data_id = 'nightly_20261201'")
        site.db.commit()
        row = site.box.row("nightly_20261201")
        assert (row["status"], row["held_reason"]) == (
            "staging", "QA gate: waits for photometry_status 'completed' (now 'running')")
        assert path.read_bytes() == data and not (site.dest / path.name).exists()
        site.db.execute("UPDATE data_registry SET photometry_status = 'completed'"
                        " WHERE data_id = 'nightly_20261201'")
        site.db.commit()
        wait_for(lambda: (site.get("nightly_20261201") or {}).get("status") == "published",
                 timeout=60, what="the publish once photometry completed")
    finally:
        assert stop(proc) == 0
    assert (site.dest / path.name).read_bytes() == data and not path.exists()
    assert site.get("nightly_20261201")["photometry_status"] == "completed"


def test_a_manual_publish_passes_the_qa_gate_only_with_a_logged_reason(site):
    path = site.box.mosaics / "flagged.fits"
    data = write_fits(path, seed=45)
    site.register("mosaic", "flagged", path)
    site.finalize("flagged", qa="failed", validation="validated")
    site.box.cli("scan", check=True)
    refused = site.box.cli("publish", "flagged")
    assert refused.returncode == 1
    assert "qa_status is 'failed'" in refused.stderr and "--override-qa" in refused.stderr
    assert path.read_bytes() == data
    why = "inspected by hand: the flag is a known sidelobe artefact"
    done = site.box.cli("publish", "flagged", "--override-qa", why)
    assert done.returncode == 0, done.stderr
    assert (site.dest / "flagged.fits").read_bytes() == data
    events = [json.loads(line) for line in done.stderr.splitlines() if line.startswith("{")]
    overrides = [e for e in events if e["event"] == "qa_overridden"]
    assert len(overrides) == 1 and overrides[0]["reason"] == why
    assert overrides[0]["qa_hold"] == "QA gate: qa_status is 'failed'"
    legacy = site.get("flagged")
    assert (legacy["status"], legacy["publish_mode"]) == ("published", "manual")


@pytest.mark.slow
def test_past_max_attempts_with_the_file_gone_is_failed_keeping_the_legacy_error(site):
    site.row("worn", "staging", attempts=5)  # its file left staging long ago
    site.box.cli("scan", check=True)
    site.box.cli("scan", check=True)
    legacy = site.get("worn")
    assert (legacy["status"], legacy["publish_attempts"], legacy["publish_error"]) == \
        ("failed", 5, "copy failed: disk full")
    history = site.box.row("worn")["failures"]
    assert [f["kind"] for f in history] == ["source_missing"], history
    assert "left the staging area" in history[0]["error"]
    status = site.box.cli("status")
    assert status.returncode == 1
    attention = status.stdout.split("NEEDS ATTENTION", 1)[1]
    assert "1 failed product waits for an operator: worn" in attention, status.stdout
    assert "  worn  copy failed: disk full" in status.stdout
    data = json.loads(site.box.cli("status", "--json").stdout)
    assert data["failed"] == [{"data_id": "worn", "data_type": "mosaic",
                               "publish_error": "copy failed: disk full"}]


# A publish by the pipeline's own code, as it does one: the final name opened and written
# in chunks (shutil.move across filesystems copies, then unlinks the source), then the row
# set to published with publish_error cleared. `pause_at` chunks in, it sleeps `pause` s.
LEGACY_COPY = textwrap.dedent("""
    import os, sqlite3, sys, time
    src, dst, db, data_id, chunk, pause_at, pause = sys.argv[1:8]
    n = 0
    with open(src, "rb") as fin, open(dst, "wb") as fout:
        while block := fin.read(int(chunk)):
            fout.write(block)
            fout.flush()
            os.fsync(fout.fileno())
            n += 1
            print("wrote", n, flush=True)
            time.sleep(float(pause) if n == int(pause_at) else 0.05)
    os.unlink(src)
    conn = sqlite3.connect(db, timeout=30)
    status = conn.execute("SELECT status FROM data_registry WHERE data_id = ?",
                          (data_id,)).fetchone()[0]
    conn.execute("UPDATE data_registry SET status = 'published', published_path = ?,"
                 " published_at = ?, publish_mode = 'auto', publish_error = NULL,"
                 " publish_attempts = 0 WHERE data_id = ?", (dst, time.time(), data_id))
    conn.commit()
    print("done, the row was", status, flush=True)
""")


def _legacy_copy(site: LegacySite, data_id: str, src: Path, pause_at: int, pause: float
                 ) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [PYTHON, "-c", LEGACY_COPY, str(src), str(site.dest / src.name), str(site.box.registry),
         data_id, "16384", str(pause_at), str(pause)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _event_time(event: dict[str, Any]) -> float:
    from datetime import datetime
    return datetime.fromisoformat(event["timestamp"]).timestamp()


@pytest.mark.slow
def test_a_legacy_publish_in_flight_is_left_to_finish(make_site):
    site = make_site(publish={"legacy_quiet_seconds": 3, "reconcile_seconds": 0.3},
                     detect={"rescan_seconds": 0.5})
    src = site.box.mosaics / "nightly_20261201.fits"
    data = write_fits(src, pixels=256, seed=61)  # 16 chunks of 16 KiB
    site.register("mosaic", "nightly_20261201", src)
    site.claim("nightly_20261201")
    copier = _legacy_copy(site, "nightly_20261201", src, pause_at=4, pause=2.0)
    assert copier.stdout is not None and copier.stdout.readline().startswith("wrote")
    proc = start_daemon(site.box)
    try:
        out, _ = copier.communicate(timeout=60)
        wait_for(lambda: sum(e.get("event") == "rescan" for e in log_events(site.box)) >= 3,
                 timeout=30, what="rescans after the legacy publish")
    finally:
        assert stop(proc) == 0
    assert copier.returncode == 0, out
    assert "done, the row was publishing" in out, out
    legacy = site.get("nightly_20261201")
    assert (legacy["status"], legacy["published_path"]) == ("published",
                                                            str(site.dest / src.name))
    assert sorted(os.listdir(site.dest)) == [src.name]
    assert (site.dest / src.name).read_bytes() == data
    events = log_events(site.box)
    assert any(e.get("event") == "legacy_publish_in_progress" for e in events)
    assert not [e for e in events if e.get("event") in ("legacy_partial_removed", "reconciled")]


@pytest.mark.slow
def test_a_crashed_legacy_copy_is_removed_once_quiet_and_published_whole(make_site):
    quiet = 2.0
    site = make_site(publish={"legacy_quiet_seconds": quiet, "reconcile_seconds": 0.3})
    src = site.box.mosaics / "nightly_20261202.fits"
    data = write_fits(src, pixels=256, seed=62)
    site.register("mosaic", "nightly_20261202", src)
    site.claim("nightly_20261202")
    copier = _legacy_copy(site, "nightly_20261202", src, pause_at=3, pause=600)
    assert copier.stdout is not None
    while not copier.stdout.readline().startswith("wrote 3"):
        pass
    last_write = time.time()
    partial = site.dest / src.name
    proc = start_daemon(site.box)
    try:
        time.sleep(quiet + 1.0)  # quiet, but its writer holds it open: never cut
        assert partial.stat().st_size == 3 * 16384
        assert site.get("nightly_20261202")["status"] == "publishing"
        copier.send_signal(signal.SIGKILL)
        copier.wait()
        killed = time.time()
        wait_for(lambda: site.get("nightly_20261202")["status"] == "published", timeout=30,
                 what="the product published after the crash")
    finally:
        assert stop(proc) == 0
        if copier.poll() is None:
            copier.kill()
    assert partial.read_bytes() == data
    assert sorted(os.listdir(site.dest)) == [src.name] and not src.exists()
    removed = [e for e in log_events(site.box) if e.get("event") == "legacy_partial_removed"]
    assert len(removed) == 1, removed
    assert _event_time(removed[0]) >= max(killed - 0.05, last_write + quiet)


@pytest.mark.slow
def test_a_reregistered_product_is_described_again_from_the_archive(site):
    path = site.box.mosaics / "group_3.fits"
    data = write_fits(path, seed=51)
    write_fits(site.box.mosaics / "group_3.weights.fits", seed=52)
    site.box.cli("scan", check=True)
    first = site.get("group_3")
    assert first["status"] == "published"
    site.register("mosaic", "group_3", path)  # INSERT OR REPLACE: a new row, columns reset
    wiped = site.get("group_3")
    assert (wiped["status"], wiped["published_path"]) == ("staging", None)
    assert wiped["id"] != first["id"]
    site.box.cli("scan", check=True)
    legacy = site.get("group_3")
    assert (legacy["status"], legacy["published_path"], legacy["id"]) == (
        "published", str(site.dest / "group_3.fits"), wiped["id"])
    row = site.box.row("group_3")
    assert row["checksum"] == sha(data) and row["sidecars"] == ["group_3.weights.fits"]
    assert (site.dest / "group_3.fits").read_bytes() == data

    # A copy that no longer holds the recorded bytes proves nothing.
    (site.dest / "group_3.fits").write_bytes(data[:-2880])
    site.register("mosaic", "group_3", path)
    site.box.cli("scan", check=True)
    legacy = site.get("group_3")
    assert legacy["status"] == "rejected" and "staging area" in legacy["publish_error"]


@pytest.mark.slow
def test_publish_error_is_cleared_on_success_and_kept_in_the_history(site):
    data = write_fits(site.box.mosaics / "retried.fits", seed=71)
    site.dest.rmdir()
    site.dest.write_bytes(b"")  # the destination folder is a file: the attempt fails
    site.box.cli("scan")
    failing = site.get("retried")
    assert failing["status"] == "staging" and failing["publish_error"], failing
    site.dest.unlink()
    site.dest.mkdir()
    time.sleep(1.2)  # the backoff (1 s +- 10 %)
    site.box.cli("scan", check=True)
    legacy = site.get("retried")
    assert (legacy["status"], legacy["publish_error"]) == ("published", None), legacy
    assert (site.dest / "retried.fits").read_bytes() == data
    history = site.box.row("retried")["failures"]
    assert [f["error"] for f in history] == [failing["publish_error"]]


def test_the_pipeline_thumbnail_travels_with_its_mosaic(site):
    name = "mosaic_20261128_010203_n10"
    data = write_fits(site.box.mosaics / f"{name}.fits", seed=81)
    weights = write_fits(site.box.mosaics / f"{name}.weights.fits", seed=82)
    thumb = b"\x89PNG\r\n\x1a\n" + hashlib.sha256(b"thumb").digest() * 8
    (site.box.mosaics / f"{name}.thumb.png").write_bytes(thumb)
    site.box.cli("scan", check=True)
    assert _files(site.dest) == {f"{name}.fits": data, f"{name}.thumb.png": thumb,
                                 f"{name}.weights.fits": weights}
    assert list(site.box.mosaics.iterdir()) == []
    assert sorted(site.box.row(name)["sidecars"]) == [f"{name}.thumb.png",
                                                       f"{name}.weights.fits"]
    assert json.loads(site.box.cli("status", "--json").stdout)["unclaimed"] == []
