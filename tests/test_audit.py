"""The fixity audit, rebuild from the archive and staging hygiene, on real files, through
the real command and real daemon processes."""

from __future__ import annotations

import json
import os
import re
import shutil
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from tests.helpers import (
    Sandbox,
    log_events,
    mount_tmpfs,
    start_daemon,
    stop,
    umount,
    wait_for,
    write_fits,
)

RULES = [
    {"type": "mosaic", "glob": "mosaics/**/*.fits", "destination": "mosaics",
     "sidecars": ["{stem}.weights.fits"]},
    {"type": "casa_image", "glob": "images/**/*.image", "destination": "images",
     "kind": "directory", "required": ["table.dat"]},
]


def _site(tmp_path: Path, **tables: dict[str, Any]) -> Sandbox:
    return Sandbox(tmp_path, products=RULES, metrics={"listen": "127.0.0.1:0"}, **tables)


def _stage(box: Sandbox) -> None:
    """Four mosaics (one with its weight map, one a folder deeper) and a CASA image."""
    for i, name in enumerate(["a", "b", "c", "d"]):
        write_fits(box.mosaics / f"{name}.fits", seed=i)
    write_fits(box.mosaics / "a.weights.fits", seed=10)
    write_fits(box.mosaics / "2026" / "e.fits", seed=5)
    image = box.stage / "images" / "x.image"
    image.mkdir(parents=True)
    (image / "table.dat").write_bytes(b"casa table" * 100)
    (image / "data.bin").write_bytes(os.urandom(5000))


def _published(box: Sandbox, count: int) -> list[dict[str, Any]]:
    def done() -> list[dict[str, Any]] | None:
        rows = [r for r in box.registry_rows() if r["status"] == "published"]
        return rows if len(rows) == count else None
    return wait_for(done, timeout=60, interval=0.3, what=f"{count} published")


def _audit(box: Sandbox, *args: str) -> tuple[int, dict[str, Any]]:
    out = box.cli("audit", "--json", *args)
    assert out.returncode in (0, 1), out.stderr
    return out.returncode, json.loads(out.stdout)


def _flip_byte(path: Path, offset: int = -100) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))


@pytest.mark.slow
def test_audit_finds_each_kind_of_damage_and_nothing_else(tmp_path: Path) -> None:
    box = _site(tmp_path)
    _stage(box)
    box.cli("scan", check=True)
    rows = _published(box, 6)
    assert {r["data_id"] for r in rows} == {"a", "b", "c", "d", "2026/e", "x"}
    assert next(r for r in rows if r["data_id"] == "a")["sidecars"] == ["a.weights.fits"]

    code, clean = _audit(box)
    assert code == 0 and clean["ok"] and clean["findings"] == []
    assert clean["checked"] == 6 and clean["bytes_read"] > 0

    m = box.products / "mosaics"
    _flip_byte(m / "b.fits")
    with open(m / "c.fits", "r+b") as fh:
        fh.truncate(2880)
    (m / "d.fits").unlink()
    (m / "stray.fits").write_bytes(b"unrecorded")
    (box.products / "by-hand").mkdir()
    (box.products / "by-hand" / "notes.txt").write_text("copied here by hand")
    (m / "link.fits").symlink_to(m / "a.fits")
    # A publish in flight is neither dark data nor a finding.
    (m / ".contimg-tmp.f.fits.123").write_bytes(b"partial")

    code, report = _audit(box)
    assert code == 1 and not report["ok"]
    found = {(f["kind"], f["path"]) for f in report["findings"]}
    assert found == {
        ("checksum_changed", str(m / "b.fits")),
        ("size_changed", str(m / "c.fits")),
        ("missing", str(m / "d.fits")),
        ("dark_file", str(m / "stray.fits")),
        ("dark_folder", str(box.products / "by-hand")),
        ("symlink", str(m / "link.fits")),
    }, report["findings"]
    by_path = {f["path"]: f for f in report["findings"]}
    assert by_path[str(m / "b.fits")]["data_id"] == "b"
    assert "recorded" in by_path[str(m / "c.fits")]["detail"]

    text = box.cli("audit")
    assert text.returncode == 1
    assert re.search(r"^checksum_changed +\S+/mosaics/b\.fits", text.stdout, re.M)
    assert "6 findings" in text.stdout

    # A path filter audits that folder only.
    code, images = _audit(box, "--path", "images")
    assert code == 0 and images["checked"] == 1 and images["findings"] == []
    # A deleted sidecar and a changed file inside a folder product are found too.
    (m / "a.weights.fits").unlink()
    _flip_byte(box.products / "images" / "x.image" / "data.bin", 10)
    found = {(f["kind"], f["path"]) for f in _audit(box)[1]["findings"]}
    assert ("sidecar_missing", str(m / "a.weights.fits")) in found
    assert ("checksum_changed", str(box.products / "images" / "x.image")) in found


def _metrics(box: Sandbox) -> str:
    listen = next(e["listen"] for e in log_events(box) if e.get("event") == "metrics_listening")
    with urllib.request.urlopen(f"http://{listen}/metrics", timeout=10) as resp:
        return resp.read().decode()


def _events(box: Sandbox, name: str) -> list[dict[str, Any]]:
    return [e for e in log_events(box) if e.get("event") == name]


@pytest.mark.slow
def test_background_audit_finds_a_flipped_byte_once_and_resolves_it(tmp_path: Path) -> None:
    box = _site(tmp_path, audit={"interval_seconds": 1.0, "bytes_per_second": 0})
    write_fits(box.mosaics / "a.fits", seed=1)
    write_fits(box.mosaics / "b.fits", seed=2)
    proc = start_daemon(box)
    try:
        _published(box, 2)
        wait_for(lambda: any(e.get("products") == 2 for e in _events(box, "audit_pass_finished")),
                 timeout=60, what="a clean pass over both products")
        target = box.products / "mosaics" / "b.fits"
        original = target.read_bytes()
        _flip_byte(target)
        found = wait_for(lambda: _events(box, "audit_finding"), timeout=30,
                         what="the flipped byte found")
        assert [(e["finding_kind"], e["path"]) for e in found] == [
            ("checksum_changed", str(target))]
        assert found[0]["data_id"] == "b" and found[0]["level"] == "warning"
        passes = len(_events(box, "audit_pass_finished"))
        wait_for(lambda: len(_events(box, "audit_pass_finished")) >= passes + 2, timeout=30,
                 what="two more passes")
        assert len(_events(box, "audit_finding")) == 1  # logged once, not once per pass
        metrics = _metrics(box)
        assert 'contimg_publisher_audit_findings{kind="checksum_changed"} 1.0' in metrics
        assert 'contimg_publisher_audit_findings{kind="missing"} 0.0' in metrics
        assert re.search(r"^contimg_publisher_audit_bytes_total [1-9]", metrics, re.M)
        assert "contimg_publisher_audit_last_pass_timestamp_seconds " in metrics
        status = box.cli("status", "--json")
        assert status.returncode == 1
        data = json.loads(status.stdout)
        assert [f["path"] for f in data["audit"]["findings"]] == [str(target)]
        assert any("archive audit" in p for p in data["problems"])

        target.write_bytes(original)
        resolved = wait_for(lambda: _events(box, "audit_finding_resolved"), timeout=30,
                            what="the finding resolved")
        assert resolved[0]["path"] == str(target)
        wait_for(lambda: 'contimg_publisher_audit_findings{kind="checksum_changed"} 0.0'
                 in _metrics(box), timeout=10, what="the gauge back at 0")
    finally:
        assert stop(proc) == 0


@pytest.mark.slow
def test_background_audit_keeps_to_its_rate(tmp_path: Path) -> None:
    rate = 2 << 20
    box = _site(tmp_path, audit={"interval_seconds": 1.0, "bytes_per_second": rate})
    size = len(write_fits(box.mosaics / "big.fits", pixels=1300, seed=3))  # ~6.8 MB
    proc = start_daemon(box)
    try:
        _published(box, 1)
        finished = wait_for(lambda: [e for e in _events(box, "audit_pass_finished")
                                     if e.get("products") == 1], timeout=60,
                            what="a pass over the big product")[0]
        assert finished["bytes_read"] == size
        # The pass took as long as the rate requires (the bucket starts empty), not less.
        assert finished["seconds"] >= size / rate * 0.9, finished
        assert finished["bytes_read"] / finished["seconds"] <= rate * 1.1, finished
        # Measured from outside too: the counter grows at about the rate.
        first = _counter(_metrics(box))
        t0 = time.monotonic()
        time.sleep(2.0)
        grown = _counter(_metrics(box)) - first
        assert grown <= rate * (time.monotonic() - t0) * 1.1 + (1 << 20), grown
    finally:
        assert stop(proc) == 0


def _counter(text: str) -> float:
    m = re.search(r"^contimg_publisher_audit_bytes_total (\S+)$", text, re.M)
    assert m is not None, text
    return float(m.group(1))


def _comparable(row: dict[str, Any]) -> dict[str, Any]:
    return {k: row[k] for k in ("data_id", "data_type", "status", "published_path",
                                "size_bytes", "checksum", "sidecars")} | {
        "object": row["metadata"].get("OBJECT")}


@pytest.mark.slow
def test_rebuild_after_the_registry_was_deleted_restores_every_row(tmp_path: Path) -> None:
    box = _site(tmp_path)
    _stage(box)
    box.cli("scan", check=True)
    _published(box, 6)
    # Another file under a published name is published as a second version.
    write_fits(box.mosaics / "a.fits", seed=42)
    box.cli("scan", check=True)
    before = sorted((_comparable(r) for r in _published(box, 7)), key=lambda r: r["data_id"])
    assert str(box.products / "mosaics" / "a.v2.fits") in {r["published_path"] for r in before}
    stage_paths = {r["data_id"]: r["stage_path"] for r in box.registry_rows()}

    for suffix in ("", "-wal", "-shm"):
        Path(f"{box.registry}{suffix}").unlink(missing_ok=True)
    refused = box.cli("status")
    assert refused.returncode == 1
    assert "rebuild --from-archive" in refused.stderr and "migrate" in refused.stderr

    out = box.cli("rebuild", "--from-archive", "--json")
    assert out.returncode == 0, out.stdout + out.stderr
    report = json.loads(out.stdout)
    assert len(report["created"]) == 7 and report["skipped"] == []
    rows = box.registry_rows()
    after = sorted((_comparable(r) for r in rows), key=lambda r: r["data_id"])
    assert after == before
    assert {r["publish_mode"] for r in rows} == {"rebuilt"}
    assert {r["data_id"]: r["stage_path"] for r in rows} == stage_paths
    code, clean = _audit(box)
    assert code == 0 and clean["checked"] == 7, clean

    again = json.loads(box.cli("rebuild", "--from-archive", "--json", check=True).stdout)
    assert again["created"] == [] and again["already_recorded"] == 7

    proc = start_daemon(box)
    try:
        wait_for(lambda: _events(box, "started"), timeout=60, what="the daemon started")
        held = box.cli("rebuild", "--from-archive")
        assert held.returncode == 1 and "held by" in held.stderr and "daemon" in held.stderr
        # A staged file identical to an archived product is taken for a leftover of it,
        # not a new product (a rebuilt row records no staged inode, so it is left in place).
        (box.mosaics / "b.fits").write_bytes((box.products / "mosaics" / "b.fits").read_bytes())
        wait_for(lambda: [e for e in _events(box, "leftover") if e["data_id"] == "b"],
                 timeout=30, what="the staged copy recognised as a leftover")
        assert len(box.registry_rows()) == 7
    finally:
        assert stop(proc) == 0


@pytest.mark.slow
def test_rebuild_skips_and_lists_names_detection_rejects(tmp_path: Path) -> None:
    box = _site(tmp_path)
    write_fits(box.mosaics / "a.fits", seed=1)
    write_fits(box.mosaics / "b.fits", seed=2)
    box.cli("scan", check=True)
    _published(box, 2)
    m = box.products / "mosaics"
    # Valid mosaics put in the archive by hand under names detection never takes.
    hostile = [b"line\nbreak.fits", b"esc\x1b[31mred.fits", b"bell\x07.fits"]
    for i, name in enumerate(hostile):
        write_fits(Path(os.fsdecode(os.path.join(os.fsencode(m), name))), seed=20 + i)
    for suffix in ("", "-wal", "-shm"):
        Path(f"{box.registry}{suffix}").unlink(missing_ok=True)

    out = box.cli("rebuild", "--from-archive", "--json")
    assert out.returncode == 1, out.stdout + out.stderr
    report = json.loads(out.stdout)
    assert sorted(r["data_id"] for r in report["created"]) == ["a", "b"]
    skipped = {s["path"]: s["reason"] for s in report["skipped"]}
    assert len(skipped) == 3, skipped
    for path, why in skipped.items():
        assert path.startswith(str(m) + "/"), path
        assert "not a product detection would take" in why and "control" in why, why
    rows = box.registry_rows()
    assert sorted(r["data_id"] for r in rows) == ["a", "b"]
    assert {r["status"] for r in rows} == {"published"}
    assert sorted(os.listdir(os.fsencode(m))) == sorted([b"a.fits", b"b.fits", *hostile])


@pytest.mark.slow
def test_audit_reports_old_unowned_temporaries_and_names_detection_rejects(
        tmp_path: Path) -> None:
    from contimg_publisher import lock
    from contimg_publisher.registry import Candidate, Identity, Rebuilt, open_registry

    box = _site(tmp_path, publish={"lease_seconds": 1.0})
    write_fits(box.mosaics / "a.fits", seed=1)
    box.cli("scan", check=True)
    _published(box, 1)
    m = box.products / "mosaics"
    # Named like in-flight temporaries, 1 MiB each: an untagged one and another node's.
    planted = [m / ".contimg-tmp.x.fits.123", m / ".contimg-tmp.y.fits.elsewhere-7-0badcafe"]
    for path in planted:
        path.write_bytes(os.urandom(1 << 20))
    # A copy in flight of a live claim (this test's own process holds it), as old.
    owned = m / ".contimg-tmp.c.fits.live-1-0123abcd"
    owned.write_bytes(b"copy in flight")
    cfg = box.config()
    with open_registry(cfg) as reg:
        staged = str(box.mosaics / "c.fits")
        reg.register(Candidate(data_id="c", data_type="mosaic", base_path=str(box.stage),
                               stage_path=staged, stage_path_bytes=os.fsencode(staged),
                               identity=Identity(1, 9, 14, 1, 1),
                               checksum="sha256:" + "1" * 64, metadata={}))
        me = lock.owner_id()
        assert [p.data_id for p in reg.claim(me, 3600, data_id="c")] == ["c"]
        assert reg.set_publish_plan(me, "c", str(m / "c.fits"), str(owned))
        # What an older rebuild recorded: a published row under a name with an escape in it.
        bad = os.path.join(os.fsencode(m), b"esc\x1bname.fits")
        Path(os.fsdecode(bad)).write_bytes(write_fits(box.root / "x.fits", seed=3))
        shown = str(m / "esc\\x1bname.fits")  # paths.display's form
        size = os.stat(bad).st_size
        from contimg_publisher import fits as fits_mod
        fd = os.open(bad, os.O_RDONLY)
        try:
            checksum = fits_mod.hash_fd(fd)[1]
        finally:
            os.close(fd)
        assert reg.insert_rebuilt(Rebuilt(
            data_id="escname", data_type="mosaic", base_path=str(box.stage),
            stage_path=str(box.mosaics / "esc\\x1bname.fits"),
            stage_path_bytes=os.path.join(os.fsencode(box.mosaics), b"esc\x1bname.fits"),
            published_path=shown, published_at=time.time(), size_bytes=size,
            checksum=checksum, metadata={}, sidecars=())) == "created"
    time.sleep(1.5)  # older than a lease

    code, report = _audit(box)
    assert code == 1, report
    found = {(f["kind"], f["path"]) for f in report["findings"]}
    assert found == {("stray_temporary", str(planted[0])),
                     ("stray_temporary", str(planted[1])),
                     ("name_rejected", shown)}, report["findings"]
    by_path = {f["path"]: f["detail"] for f in report["findings"]}
    assert "1048576 bytes" in by_path[str(planted[0])]
    assert "this node's daemon removes it" in by_path[str(planted[0])]
    assert "node elsewhere's daemon" in by_path[str(planted[1])]
    assert "control" in by_path[shown]
    assert all(p.exists() for p in [*planted, owned])  # the audit changes nothing


@pytest.mark.slow
def test_stale_staged_files_are_listed_and_quarantined_with_a_record(tmp_path: Path) -> None:
    quarantine = tmp_path / "quarantine"
    box = _site(tmp_path, hygiene={"report_after_seconds": 1.0})
    (box.mosaics / "bad.fits").write_bytes(b"this is not FITS" * 10)
    write_fits(box.mosaics / "orphan.weights.fits", seed=7)
    box.cli("scan", check=True)
    rows = box.registry_rows()
    assert [r["status"] for r in rows] == ["rejected"]
    time.sleep(1.5)

    status = box.cli("status", "--json")
    stale = {(s["kind"], s["path"]) for s in json.loads(status.stdout)["stale"]}
    assert stale == {("rejected", str(box.mosaics / "bad.fits")),
                     ("unclaimed", str(box.mosaics / "orphan.weights.fits"))}
    text = box.cli("status").stdout
    assert "stale in staging  2 rejected or unclaimed files" in text
    assert "nothing is deleted" in text

    refused = box.cli("quarantine")
    assert refused.returncode == 2 and "quarantine_dir" in refused.stderr
    box.update(hygiene={"quarantine_dir": str(quarantine)})
    dry = box.cli("quarantine", "--dry-run", check=True)
    assert dry.stdout.count("would move") == 2
    assert (box.mosaics / "bad.fits").exists() and not quarantine.exists()

    bad, orphan = (box.mosaics / "bad.fits").read_bytes(), \
        (box.mosaics / "orphan.weights.fits").read_bytes()
    out = box.cli("quarantine", "--json", check=True)
    moved = json.loads(out.stdout)["moved"]
    assert {(m["kind"], m["original_path"], m["quarantine_path"], m["how"]) for m in moved} == {
        ("rejected", str(box.mosaics / "bad.fits"), str(quarantine / "mosaics" / "bad.fits"),
         "rename"),
        ("unclaimed", str(box.mosaics / "orphan.weights.fits"),
         str(quarantine / "mosaics" / "orphan.weights.fits"), "rename")}
    assert all(m["moved_at"] > 0 and m["reason"] for m in moved)
    assert not (box.mosaics / "bad.fits").exists()
    assert (quarantine / "mosaics" / "bad.fits").read_bytes() == bad
    assert (quarantine / "mosaics" / "orphan.weights.fits").read_bytes() == orphan
    assert json.loads(box.cli("status", "--json").stdout)["stale"] == []
    again = json.loads(box.cli("quarantine", "--json", check=True).stdout)
    assert again == {"moved": [], "kept": []}


@pytest.mark.slow
def test_quarantine_across_filesystems_copies_verifies_then_removes(tmp_path: Path,
                                                                    dev_shm: Path) -> None:
    quarantine = dev_shm / f"contimg-quarantine-{os.getpid()}"
    try:
        box = _site(tmp_path, hygiene={"report_after_seconds": 1.0,
                                       "quarantine_dir": str(quarantine)})
        (box.mosaics / "bad.fits").write_bytes(b"garbage" * 100)
        box.cli("scan", check=True)
        time.sleep(1.5)
        moved = json.loads(box.cli("quarantine", "--json", check=True).stdout)["moved"]
        assert [(m["how"], m["quarantine_path"]) for m in moved] == [
            ("copy", str(quarantine / "mosaics" / "bad.fits"))]
        assert (quarantine / "mosaics" / "bad.fits").read_bytes() == b"garbage" * 100
        assert not (box.mosaics / "bad.fits").exists()
        assert not [p for p in (quarantine / "mosaics").iterdir() if p.name.startswith(".")]
    finally:
        shutil.rmtree(quarantine, ignore_errors=True)


@pytest.mark.slow
@pytest.mark.root("mounting a small tmpfs for the quarantine folder needs root")
def test_quarantine_on_a_full_disk_leaves_no_temporary_and_succeeds_once_space_is_freed(
        tmp_path: Path) -> None:
    quarantine = tmp_path / "quarantine"
    mount_tmpfs(quarantine, "1m")
    try:
        box = _site(tmp_path, hygiene={"report_after_seconds": 1.0,
                                       "quarantine_dir": str(quarantine)})
        staged = os.urandom(512 << 10)
        (box.mosaics / "bad.fits").write_bytes(staged)
        box.cli("scan", check=True)
        time.sleep(1.5)
        filler = quarantine / "filler"
        filler.write_bytes(b"\0" * (768 << 10))

        full = box.cli("quarantine", "--json")
        assert full.returncode == 1, full.stdout + full.stderr
        result = json.loads(full.stdout)
        assert result["moved"] == []
        assert [k["path"] for k in result["kept"]] == [str(box.mosaics / "bad.fits")]
        assert "No space left on device" in result["kept"][0]["reason"]
        assert (box.mosaics / "bad.fits").read_bytes() == staged
        left = [p.name for p in quarantine.rglob("*") if p.name.startswith(".contimg-tmp.")]
        assert left == []

        filler.unlink()
        # What the version before left after such a failure, under its fixed token.
        (quarantine / "mosaics" / ".contimg-tmp.bad.fits.quarantine").write_bytes(b"partial")
        out = box.cli("quarantine", "--json")
        assert out.returncode == 0, out.stdout + out.stderr
        moved = json.loads(out.stdout)["moved"]
        assert [(m["how"], m["quarantine_path"]) for m in moved] == [
            ("copy", str(quarantine / "mosaics" / "bad.fits"))]
        assert (quarantine / "mosaics" / "bad.fits").read_bytes() == staged
        assert not (box.mosaics / "bad.fits").exists()
        assert [p.name for p in (quarantine / "mosaics").iterdir()] == ["bad.fits"]
    finally:
        umount(quarantine)


def test_audit_config_is_validated(tmp_path: Path) -> None:
    box = _site(tmp_path, audit={"bytes_per_second": -1})
    out = box.cli("check-config")
    assert out.returncode == 2 and "audit.bytes_per_second" in out.stderr
    box.update(audit={"bytes_per_second": 10}, hygiene={"quarantine_dir": str(box.stage / "q")})
    out = box.cli("check-config")
    assert out.returncode == 2 and "hygiene.quarantine_dir" in out.stderr
