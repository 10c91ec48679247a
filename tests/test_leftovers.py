"""What is left in staging beside published products gets a voice: a late sidecar is
published beside its product, a product written again with the same bytes loses its staged
copy, and files no product owns are listed (by `status`, the status page and a metric),
never deleted. Real files, the real CLI, a real daemon scraped over loopback."""

from __future__ import annotations

import json
import os
import time
import urllib.request

import pytest

from tests.helpers import (
    MakeSandbox,
    Sandbox,
    log_events,
    start_daemon,
    stop,
    wait_for,
    write_fits,
)
from tests.test_observability import free_port
from tests.test_publish import archive_files, stage, temps


def events(out: str, name: str) -> list[dict]:
    found = []
    for line in out.splitlines():
        try:
            event = json.loads(line)
        except ValueError:
            continue
        if event.get("event") == name:
            found.append(event)
    return found


@pytest.mark.slow
def test_late_sidecar_is_published_beside_its_product(sandbox_fs: Sandbox) -> None:
    sandbox = sandbox_fs
    data = stage(sandbox, "n/a.fits", seed=1)
    sandbox.cli("scan", check=True)
    assert sandbox.row("n/a")["sidecars"] == []
    weights = write_fits(sandbox.mosaics / "n/a.weights.fits", seed=2)
    out = sandbox.cli("scan", check=True)
    [event] = events(out.stderr, "late_sidecar_published")
    assert event["data_id"] == "n/a" and event["sidecar"].endswith("n/a.weights.fits")
    assert archive_files(sandbox.products / "mosaics") == {"n/a.fits": data,
                                                           "n/a.weights.fits": weights}
    assert not (sandbox.mosaics / "n/a.weights.fits").exists()
    assert temps(sandbox.products, sandbox.stage) == []
    row = sandbox.row("n/a")
    assert row["status"] == "published" and row["sidecars"] == ["a.weights.fits"]
    assert json.loads(sandbox.cli("status", "--json").stdout)["unclaimed"] == []


def test_late_sidecar_follows_the_version_its_product_was_published_as(
        make_sandbox: MakeSandbox) -> None:
    sandbox = make_sandbox()
    first = stage(sandbox, "a.fits", seed=1)
    sandbox.cli("scan", check=True)
    second = stage(sandbox, "a.fits", seed=2)
    sandbox.cli("scan", check=True)
    (sandbox.mosaics / "a.png").write_bytes(b"\x89PNG of the second")
    sandbox.cli("scan", check=True)
    assert archive_files(sandbox.products / "mosaics") == {
        "a.fits": first, "a.v2.fits": second, "a.v2.png": b"\x89PNG of the second"}
    assert sandbox.row("a.v2")["sidecars"] == ["a.v2.png"]


def test_late_sidecar_with_other_bytes_than_the_archived_one_is_kept_and_listed(
        sandbox_fs: Sandbox) -> None:
    sandbox = sandbox_fs
    sandbox.update(detect={"unclaimed_after_seconds": 0})
    stage(sandbox, "a.fits", seed=1)
    (sandbox.mosaics / "a.png").write_bytes(b"\x89PNG first")
    sandbox.cli("scan", check=True)
    (sandbox.mosaics / "a.png").write_bytes(b"\x89PNG redrawn")
    out = sandbox.cli("scan", check=True)
    [kept] = events(out.stderr, "late_sidecar_kept")
    assert "a different a.png is already archived" in kept["reason"]
    assert (sandbox.products / "mosaics" / "a.png").read_bytes() == b"\x89PNG first"
    assert (sandbox.mosaics / "a.png").read_bytes() == b"\x89PNG redrawn"
    status = json.loads(sandbox.cli("status", "--json").stdout)
    [listed] = status["unclaimed"]
    assert listed["path"] == str(sandbox.mosaics / "a.png")
    assert "published before it arrived" in listed["reason"]


def test_identical_rerun_loses_only_its_staged_copy(sandbox_fs: Sandbox) -> None:
    """The pipeline writes a published mosaic again, byte for byte: recognised, its staged
    copy removed with an event of its own; no second row, no version, the archive as it was."""
    sandbox = sandbox_fs
    data = stage(sandbox, "n/a.fits", seed=1)
    sandbox.cli("scan", check=True)
    archived = sandbox.products / "mosaics" / "n/a.fits"
    inode = archived.stat().st_ino
    again = sandbox.mosaics / "n/a.fits"  # a new file, the same bytes
    again.write_bytes(data)
    os.utime(again, (time.time() - 60, time.time() - 60))
    out = sandbox.cli("scan", check=True)
    [event] = events(out.stderr, "identical_rerun_removed")
    assert event["data_id"] == "n/a"
    assert not (sandbox.mosaics / "n/a.fits").exists()
    assert archived.read_bytes() == data and archived.stat().st_ino == inode
    assert [r["data_id"] for r in sandbox.registry_rows()] == ["n/a"]


def test_rerun_with_other_bytes_is_a_new_version_not_a_leftover(make_sandbox: MakeSandbox) -> None:
    sandbox = make_sandbox()
    first = stage(sandbox, "a.fits", seed=1)
    sandbox.cli("scan", check=True)
    second = stage(sandbox, "a.fits", seed=3)
    out = sandbox.cli("scan", check=True)
    assert events(out.stderr, "identical_rerun_removed") == []
    assert archive_files(sandbox.products / "mosaics") == {"a.fits": first, "a.v2.fits": second}


@pytest.mark.slow
def test_orphan_sidecar_and_stray_files_are_listed_never_deleted(make_sandbox: MakeSandbox) -> None:
    port = free_port()
    sandbox = make_sandbox(metrics={"listen": f"127.0.0.1:{port}"},
                           detect={"unclaimed_after_seconds": 3600})
    orphan = sandbox.mosaics / "lost.weights.fits"
    orphan_data = write_fits(orphan, seed=4)
    stray = sandbox.mosaics / "night" / "notes.txt"
    stray.parent.mkdir()
    stray.write_text("observer's notes\n")
    hidden = sandbox.mosaics / ".partial.fits"  # ignored names are nobody's business
    hidden.write_bytes(b"x")
    sandbox.cli("scan", check=True)
    # Young files are not listed yet.
    assert json.loads(sandbox.cli("status", "--json").stdout)["unclaimed"] == []
    sandbox.update(detect={"unclaimed_after_seconds": 0})
    status = json.loads(sandbox.cli("status", "--json").stdout)
    listed = {u["path"]: u for u in status["unclaimed"]}
    assert set(listed) == {str(orphan), str(stray)}
    assert listed[str(orphan)]["reason"] == ("sidecar of lost.fits, which is not in the "
                                             "staging area")
    assert listed[str(stray)]["reason"] == "matches no product rule"
    assert listed[str(stray)]["size_bytes"] == len("observer's notes\n")
    assert all(u["age_seconds"] >= 0 for u in listed.values())
    text = sandbox.cli("status").stdout
    assert "unclaimed in staging  2 files" in text and str(stray) in text
    # The daemon's page and metrics say the same; nothing is deleted.
    proc = start_daemon(sandbox)
    try:
        def scrape(path: str) -> str:
            try:
                return urllib.request.urlopen(f"http://127.0.0.1:{port}{path}",
                                              timeout=5).read().decode()
            except OSError:
                return ""
        body = wait_for(lambda: scrape("/metrics"), what="the metrics server")
        assert "contimg_publisher_unclaimed_files 2.0" in body
        page = scrape("/")
        assert "Unclaimed in staging" in page and "notes.txt" in page
    finally:
        assert stop(proc) == 0
    assert orphan.read_bytes() == orphan_data and stray.exists() and hidden.exists()
    # Once the product arrives, its sidecar is no longer unclaimed.
    stage(sandbox, "lost.fits", seed=5)
    sandbox.cli("scan", check=True)
    status = json.loads(sandbox.cli("status", "--json").stdout)
    assert [u["path"] for u in status["unclaimed"]] == [str(stray)]
    assert (sandbox.products / "mosaics" / "lost.weights.fits").read_bytes() == orphan_data
    assert not any(e.get("event") == "leftover_removed" for e in log_events(sandbox))


def test_the_sweep_removes_this_nodes_stray_temporary_names_and_no_other_nodes(
        make_sandbox: MakeSandbox) -> None:
    """One products area, several nodes: a temporary name another node wrote is its copy
    in flight (or that node's to clean up), never this node's stray."""
    sandbox = make_sandbox(node={"name": "node-a"})
    folder = sandbox.products / "mosaics"
    folder.mkdir(parents=True)
    other = folder / ".contimg-tmp.x.fits.node-b-5-abcdef12"
    own = folder / ".contimg-tmp.y.fits.node-a-6-abcdef12"
    older = folder / ".contimg-tmp.z.fits.7-abcdef12"
    other_dir = folder / ".contimg-tmp.w.image.node-b-8-abcdef12"
    for path in (other, own, older):
        path.write_bytes(b"partial copy")
    other_dir.mkdir()
    (other_dir / "table.dat").write_bytes(b"x")
    sandbox.cli("migrate", check=True)  # the registry exists: this is not a lost one
    out = sandbox.cli("scan")
    assert out.returncode == 0, out.stderr
    assert other.read_bytes() == b"partial copy"
    assert (other_dir / "table.dat").exists()
    assert not own.exists() and not older.exists()
    removed = sorted(e["path"] for e in events(out.stdout + out.stderr, "temp_removed"))
    assert removed == sorted([str(own), str(older)])


def test_the_sweep_keeps_the_temporary_names_of_another_live_daemon_of_this_node(
        make_sandbox: MakeSandbox) -> None:
    """Two daemons on one node share its node tag: one's sweep must keep what the other's
    publishes in flight wrote (the product's temporary name, recorded in its row, the
    sidecars' beside it, which carry the same token, and a rename publish's sidecar copy,
    which carries its row id) and still remove a dead attempt's names."""
    from contimg_publisher import lock, reconcile
    from contimg_publisher.registry import Candidate, Identity, Registry

    sandbox = make_sandbox(node={"name": "node-a"})
    folder = sandbox.products / "mosaics"
    folder.mkdir(parents=True)
    cfg = sandbox.config()
    other_daemon = lock.owner_id()  # a live process of this host: this test's
    with Registry(cfg.registry) as reg:
        rows = []
        for n in (1, 2):
            path = f"{cfg.stage_root}/mosaics/m{n}.fits"
            reg.register(Candidate(
                data_id=f"m{n}", data_type="mosaic", base_path=str(cfg.stage_root),
                stage_path=path, stage_path_bytes=path.encode(),
                identity=Identity(1, n, 10, n, n), checksum=f"sha256:{n:064x}", metadata={}))
            rows.append(reg.claim(other_daemon, 600, data_id=f"m{n}")[0])
        copy, rename = rows
        token = f"node-a-{copy.id}-0123abcd"
        product_temp = folder / f".contimg-tmp.m1.fits.{token}"
        assert reg.set_publish_plan(other_daemon, "m1", str(folder / "m1.fits"),
                                    str(product_temp), ["m1.png"], token=copy.claim_token)
        assert reg.set_publish_plan(other_daemon, "m2", str(folder / "m2.fits"), None,
                                    token=rename.claim_token)
        kept = [product_temp, folder / f".contimg-tmp.m1.png.{token}",
                folder / f".contimg-tmp.m2.png.node-a-{rename.id}-99990000"]
        stray = [folder / f".contimg-tmp.m1.png.node-a-{copy.id}-deadbeef",  # an old attempt
                 folder / ".contimg-tmp.m9.fits.node-a-999-deadbeef"]
        for path in kept + stray:
            path.write_bytes(b"partial copy")
        removed = reconcile.remove_stray_temps(cfg, reg, "this-daemon")
    assert removed == len(stray)
    assert sorted(p.name for p in folder.iterdir()) == sorted(p.name for p in kept)
