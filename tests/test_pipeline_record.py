"""The pipeline as it runs today: its own `mosaics` table decides when a mosaic may leave
staging, and learns where it went (`[products.record]`).

The pipeline is played from what its public code is known to do (facts, not its code; the
DDL and SQL here are this test's own): one SQLite file, `pipeline.sqlite3`, holds the
registry and the `mosaics` table (`path TEXT UNIQUE NOT NULL`, `qa_status` PASS, WARN or
FAIL, NULL until the QA job has run). The build job writes `<mosaic_dir>/<name>.fits` in
place, then inserts its row with qa_status NULL; the QA job later opens the file at
`mosaics.path` and records its verdict; the pipeline's API answers with `mosaics.path`.
"""

from __future__ import annotations

import json
import signal
import sqlite3
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from astropy.io import fits

from contimg_publisher.publish import CRASH_ENV, CRASH_POINTS, CrashPoint
from tests.helpers import (
    MountTmpfs,
    Sandbox,
    log_events,
    skip_with,
    start_daemon,
    stop,
    wait_for,
    write_fits,
)

PIPELINE_DDL = """
CREATE TABLE IF NOT EXISTS mosaic_plans (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    name TEXT UNIQUE NOT NULL,
    created_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS mosaics (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    plan_id INTEGER REFERENCES mosaic_plans(id),
    name TEXT UNIQUE NOT NULL,
    path TEXT UNIQUE NOT NULL,
    n_images INTEGER,
    created_at REAL NOT NULL,
    qa_status TEXT CHECK(qa_status IN ('PASS', 'WARN', 'FAIL'))
);
"""

RECORD = {"table": "mosaics", "path_column": "path",
          "require": {"qa_status": ["PASS", "WARN"]}, "hold": {"qa_status": ["FAIL"]}}
WAITS = "record: waits for mosaics.qa_status one of 'PASS', 'WARN' (now NULL)"
FAILED = "record: mosaics.qa_status is 'FAIL'"


class Pipeline:
    """The pipeline's jobs, writing the registry file the daemon uses."""

    def __init__(self, box: Sandbox, tables: bool = True) -> None:
        self.box = box
        box.registry.parent.mkdir(parents=True, exist_ok=True)
        self.db = sqlite3.connect(box.registry, timeout=30)
        if tables:
            self.create_tables()

    def create_tables(self) -> None:
        self.db.executescript(PIPELINE_DDL)
        self.db.commit()

    def build(self, name: str, seed: int, record: bool = True) -> bytes:
        """The build job: the mosaic written in place, then its row, qa_status NULL."""
        path = self.box.mosaics / f"{name}.fits"
        data = write_fits(path, seed=seed)
        if record:
            self.insert(name, path)
        return data

    def insert(self, name: str, path: Path, qa_status: str | None = None) -> None:
        self.db.execute("INSERT INTO mosaics (name, path, n_images, created_at, qa_status)"
                        " VALUES (?, ?, 10, ?, ?)", (name, str(path), time.time(), qa_status))
        self.db.commit()

    def path(self, name: str) -> str:
        row = self.db.execute("SELECT path FROM mosaics WHERE name = ?", (name,)).fetchone()
        assert row is not None, name
        return str(row[0])

    def qa(self, name: str, verdict: str) -> bytes:
        """The QA job: opens the file at mosaics.path, reads it, records the verdict.
        Returns the bytes it opened (an error if the file is not there)."""
        path = self.path(name)
        with fits.open(path) as hdul:
            assert hdul[0].data.shape == (64, 64)
        data = Path(path).read_bytes()
        self.db.execute("UPDATE mosaics SET qa_status = ? WHERE name = ?", (verdict, name))
        self.db.commit()
        return data

    def close(self) -> None:
        self.db.close()


def _box(root: Path, products_root: Path | None = None, **record: Any) -> Sandbox:
    """A sandbox whose registry is the pipeline's unified pipeline.sqlite3."""
    box = Sandbox(root, products_root=products_root)
    box.registry = root / "state" / "db" / "pipeline.sqlite3"
    box.update(paths={"registry": str(box.registry)},
               products=[{"type": "mosaic", "glob": "mosaics/**/*.fits",
                          "destination": "mosaics", "record": {**RECORD, **record}}])
    return box


@pytest.fixture
def site(tmp_path: Path) -> Iterator[tuple[Sandbox, Pipeline]]:
    box = _box(tmp_path)
    pipeline = Pipeline(box)
    yield box, pipeline
    pipeline.close()


def _held(box: Sandbox, data_id: str) -> str | None:
    row = box.row(data_id)
    return None if row is None else row.get("held_reason")


@pytest.mark.slow
def test_nothing_leaves_staging_before_the_verdict_and_the_row_follows_the_publish(site):
    box, pipeline = site
    data = {name: pipeline.build(name, seed) for seed, name in
            enumerate(("nightly_20261201", "nightly_20261202", "nightly_20261203"), start=1)}
    staged = {name: str(box.mosaics / f"{name}.fits") for name in data}
    proc = start_daemon(box)
    try:
        for name in data:
            wait_for(lambda n=name: _held(box, n) == WAITS, timeout=60,
                     what=f"{name} registered and waiting for its verdict")
        # Nothing left staging: the QA job finds every file where its row says.
        assert not (box.products / "mosaics").exists() or \
            list((box.products / "mosaics").iterdir()) == []
        verdicts = {"nightly_20261201": "PASS", "nightly_20261202": "WARN",
                    "nightly_20261203": "FAIL"}
        for name, verdict in verdicts.items():
            assert pipeline.path(name) == staged[name]
            assert pipeline.qa(name, verdict) == data[name]
        for name in ("nightly_20261201", "nightly_20261202"):
            wait_for(lambda n=name: (box.row(n) or {}).get("status") == "published",
                     timeout=60, what=f"{name} published after its verdict")
        wait_for(lambda: _held(box, "nightly_20261203") == FAILED, timeout=30,
                 what="the FAIL verdict shown as the reason")

        for name in ("nightly_20261201", "nightly_20261202"):
            archived = box.products / "mosaics" / f"{name}.fits"
            assert pipeline.path(name) == str(archived) == box.row(name)["published_path"]
            assert Path(pipeline.path(name)).read_bytes() == data[name]
            assert not Path(staged[name]).exists()

        # FAIL holds: the file stays in staging, where its row still names it.
        held = box.row("nightly_20261203")
        assert (held["status"], held["held"], held["held_reason"]) == ("staging", True, FAILED)
        assert pipeline.path("nightly_20261203") == staged["nightly_20261203"]
        assert Path(staged["nightly_20261203"]).read_bytes() == data["nightly_20261203"]
        shown = box.cli("show", "nightly_20261203", check=True).stdout
        assert f"held        {FAILED}" in shown, shown
        assert f"held: {FAILED}" in box.cli("list", check=True).stdout
        status = json.loads(box.cli("status", "--json").stdout)
        assert {h["data_id"]: h["reason"] for h in status["held"]} == {
            "nightly_20261203": FAILED}
        assert f"nightly_20261203  {FAILED}" in box.cli("status").stdout

        # Without a reason the operator's publish is refused; with one it passes the
        # record's verdict, is logged, and the row follows it.
        refused = box.cli("publish", "nightly_20261203")
        assert refused.returncode == 1 and FAILED in refused.stderr
        why = "looked at by hand: the FAIL is a known RFI artefact"
        done = box.cli("publish", "nightly_20261203", "--override-qa", why)
        assert done.returncode == 0, done.stderr
    finally:
        assert stop(proc) == 0
    archived = box.products / "mosaics" / "nightly_20261203.fits"
    assert pipeline.path("nightly_20261203") == str(archived)
    assert archived.read_bytes() == data["nightly_20261203"]
    assert not Path(staged["nightly_20261203"]).exists()
    events = [json.loads(line) for line in done.stderr.splitlines() if line.startswith("{")]
    overrides = [e for e in events if e["event"] == "qa_overridden"]
    assert [(e["reason"], e["qa_hold"]) for e in overrides] == [(why, FAILED)]
    assert box.row("nightly_20261203")["publish_mode"] == "manual"
    # The pipeline's own verdicts are left as it wrote them.
    verdicts_now = dict(pipeline.db.execute("SELECT name, qa_status FROM mosaics"))
    assert verdicts_now == verdicts


@pytest.mark.slow
def test_a_mosaic_waits_for_the_pipelines_tables_then_its_row_then_its_verdict(tmp_path):
    """The daemon starts before the pipeline has ever run: its mosaic waits, with the reason,
    for the table, then for its row, then for the verdict, and goes once it is PASS."""
    box = _box(tmp_path)
    pipeline = Pipeline(box, tables=False)
    try:
        data = pipeline.build("group_7", seed=7, record=False)
        staged = box.mosaics / "group_7.fits"
        proc = start_daemon(box)
        try:
            wait_for(lambda: (_held(box, "group_7") or "").startswith(
                "record: waits for table mosaics"), timeout=60, what="waiting for the table")
            pipeline.create_tables()
            no_row = f"record: waits for a row of mosaics with path = '{staged}'"
            wait_for(lambda: _held(box, "group_7") == no_row, timeout=30,
                     what="waiting for its row")
            assert staged.read_bytes() == data
            pipeline.insert("group_7", staged)
            wait_for(lambda: _held(box, "group_7") == WAITS, timeout=30,
                     what="waiting for its verdict")
            assert pipeline.qa("group_7", "PASS") == data
            wait_for(lambda: (box.row("group_7") or {}).get("status") == "published",
                     timeout=60, what="the publish after the verdict")
        finally:
            assert stop(proc) == 0
        archived = box.products / "mosaics" / "group_7.fits"
        assert pipeline.path("group_7") == str(archived)
        assert archived.read_bytes() == data and not staged.exists()
    finally:
        pipeline.close()


def test_missing_publish_lets_a_mosaic_without_a_row_go(tmp_path):
    box = _box(tmp_path, missing="publish")
    pipeline = Pipeline(box)
    try:
        orphan = pipeline.build("orphan", seed=3, record=False)
        recorded = pipeline.build("recorded", seed=4)
        box.cli("scan", check=True)
        assert (box.products / "mosaics" / "orphan.fits").read_bytes() == orphan
        # A row it has still waits for its verdict.
        assert _held(box, "recorded") == WAITS
        assert pipeline.qa("recorded", "WARN") == recorded
        box.cli("scan", check=True)
        assert pipeline.path("recorded") == str(box.products / "mosaics" / "recorded.fits")
    finally:
        pipeline.close()


def test_a_record_table_without_a_named_column_is_a_clear_error_at_start(tmp_path):
    box = _box(tmp_path, require={"verdict": "PASS"}, hold={})
    pipeline = Pipeline(box)
    try:
        pipeline.build("m", seed=5)
        out = box.cli("scan")
        assert out.returncode == 1
        assert "table 'mosaics' has no column 'verdict'" in out.stderr, out.stderr
        proc = start_daemon(box)
        assert proc.wait(timeout=60) == 1
        errors = [e for e in log_events(box) if e.get("event") == "registry_unusable"]
        assert errors and "table 'mosaics' has no column 'verdict'" in errors[0]["error"]
        assert (box.mosaics / "m.fits").exists()
        assert pipeline.path("m") == str(box.mosaics / "m.fits")
    finally:
        pipeline.close()


# --- a SIGKILL of the daemon at each step of the publish --------------------------------------


@pytest.fixture(params=["same_fs", "across"])
def crash_site(request: pytest.FixtureRequest, tmp_path: Path, tmpfs: MountTmpfs
               ) -> Iterator[tuple[Sandbox, Pipeline, bool]]:
    products = None
    if request.param == "across":
        products = tmpfs(tmp_path / "products", "256m")
    box = _box(tmp_path, products_root=products)
    pipeline = Pipeline(box)
    try:
        yield box, pipeline, request.param == "same_fs"
    finally:
        pipeline.close()


@pytest.mark.slow
@pytest.mark.parametrize("point", CRASH_POINTS)
def test_a_kill_at_each_step_leaves_the_row_naming_a_whole_file(crash_site, point):
    box, pipeline, same_fs = crash_site
    if same_fs and point is CrashPoint.AFTER_TEMP_WRITE:
        skip_with("a publish on one filesystem is a rename: it writes no temporary file")
    names = [f"mosaic_20261201_0{i}0000_n10" for i in range(3)]
    data = {name: pipeline.build(name, seed=20 + i) for i, name in enumerate(names)}
    for name in names:
        pipeline.qa(name, "PASS")
    proc = start_daemon(box, extra_env={CRASH_ENV: point})
    assert proc.wait(timeout=120) == -signal.SIGKILL
    if not same_fs:
        # A copy leaves the staged file until after the commit that points the row at the
        # archive: at every step the row names a whole file.
        for name in names:
            assert Path(pipeline.path(name)).read_bytes() == data[name], (point, name)
    proc = start_daemon(box)
    try:
        for name in names:
            wait_for(lambda n=name: (box.row(n) or {}).get("status") == "published",
                     timeout=60, what=f"{name} published after the restart")
    finally:
        assert stop(proc) == 0
    for name in names:
        archived = box.products / "mosaics" / f"{name}.fits"
        assert pipeline.path(name) == str(archived) == box.row(name)["published_path"]
        assert archived.read_bytes() == data[name]
        assert not (box.mosaics / f"{name}.fits").exists()
