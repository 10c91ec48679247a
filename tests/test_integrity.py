"""An archived product never changes and never shares an inode with a name outside the
archive: hard-linked staged files, folder products, and a staged name written again after
a crash, with real files on one filesystem and across two (a tmpfs products area).

In every case the archived bytes equal the recorded checksum at the end, and a file
outside the two roots keeps its mode, owner and bytes.
"""

from __future__ import annotations

import hashlib
import os
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
from astropy.io import fits

from contimg_publisher import detect
from contimg_publisher.publish import CRASH_ENV, CrashPoint
from contimg_publisher.registry import Registry
from tests.helpers import (
    MakeSandbox,
    Sandbox,
    log_events,
    mount_tmpfs,
    start_daemon,
    stop,
    umount,
    wait_for,
    write_fits,
)
from tests.test_publish import (
    archive_files,
    history_kinds,
    register_only,
    sha256,
    stage,
    temps,
)

NO_CAP_LEASE = ("setpriv", "--inh-caps=-all", "--bounding-set=-lease", "--")

IMAGE_RULES = [
    {"type": "mosaic", "glob": "mosaics/**/*.fits", "destination": "mosaics"},
    {"type": "image", "glob": "images/*.image", "destination": "images",
     "kind": "directory", "required": ["table.dat"]},
]


def fingerprint(path: Path) -> tuple[int, int, int, str]:
    st = path.stat()
    return (stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid,
            hashlib.sha256(path.read_bytes()).hexdigest())


def assert_archive_matches_registry(sandbox_fs: Sandbox) -> None:
    """Every published row's file holds exactly the recorded bytes, with a name of its own."""
    sandbox = sandbox_fs
    for row in sandbox.registry_rows():
        if row["status"] != "published" or row["data_type"] != "mosaic":
            continue
        path = Path(row["published_path"])
        assert f"sha256:{sha256(path.read_bytes())}" == row["checksum"], row["data_id"]
        assert path.stat().st_nlink == 1, f"{path} shares its inode with another name"


def test_hard_linked_staged_file_is_copied_and_the_other_name_left_alone(
        sandbox_fs: Sandbox) -> None:
    """A staged mosaic that is a second name of a private file elsewhere (mode 0600): the
    archive gets its own inode; the outside file keeps its mode and bytes, and a later write
    through the outside name does not reach the archive."""
    sandbox = sandbox_fs
    outside = sandbox.root / "private" / "original.fits"
    outside.parent.mkdir()
    data = write_fits(outside, seed=7)
    outside.chmod(0o600)
    staged = sandbox.mosaics / "linked.fits"
    os.link(outside, staged)
    old = os.stat(staged).st_mtime - 60
    os.utime(staged, (old, old))
    before = fingerprint(outside)
    out = sandbox.cli("scan", check=True)
    same_fs = os.stat(sandbox.products).st_dev == os.stat(sandbox.stage).st_dev
    assert ('"hard_linked_source"' in out.stderr) == same_fs, out.stderr
    archived = sandbox.products / "mosaics" / "linked.fits"
    assert archived.read_bytes() == data
    assert archived.stat().st_ino != outside.stat().st_ino
    assert archived.stat().st_nlink == 1
    assert fingerprint(outside) == before
    assert outside.stat().st_nlink == 1  # the staged name went, after the commit
    assert not staged.exists()
    with open(outside, "r+b") as fh:
        fh.seek(2880)
        fh.write(b"\xff" * 16)
    assert archived.read_bytes() == data
    row = sandbox.row("linked")
    assert row["status"] == "published"
    assert row["checksum"] == f"sha256:{sha256(data)}"
    assert_archive_matches_registry(sandbox)


def test_hard_linked_sidecar_is_copied_and_the_other_name_left_alone(sandbox_fs: Sandbox) -> None:
    sandbox = sandbox_fs
    outside = sandbox.root / "private" / "weights.fits"
    outside.parent.mkdir()
    weights = write_fits(outside, seed=8)
    outside.chmod(0o600)
    os.link(outside, sandbox.mosaics / "m.weights.fits")
    data = stage(sandbox, "m.fits", seed=9)
    before = fingerprint(outside)
    sandbox.cli("scan", check=True)
    archived = sandbox.products / "mosaics"
    assert archive_files(archived) == {"m.fits": data, "m.weights.fits": weights}
    assert (archived / "m.weights.fits").stat().st_ino != outside.stat().st_ino
    assert fingerprint(outside) == before and outside.stat().st_nlink == 1
    assert sandbox.row("m")["sidecars"] == ["m.weights.fits"]
    assert_archive_matches_registry(sandbox)


@pytest.mark.slow
def test_same_filesystem_publish_moves_the_inode_so_the_staged_name_is_free(
        make_sandbox: MakeSandbox) -> None:
    """On one filesystem the staged inode is renamed into the archive; the pipeline writing
    the same staged name again (in place, astropy's update mode, after a crash before the
    source removal step) writes a new file, and the archived bytes stay as recorded."""
    sandbox = make_sandbox()
    data = stage(sandbox, "n/a.fits", seed=1)
    staged = sandbox.mosaics / "n/a.fits"
    inode = staged.stat().st_ino
    crashed = sandbox.cli("scan", env={CRASH_ENV: CrashPoint.BEFORE_SOURCE_REMOVAL})
    assert crashed.returncode == -9
    archived = sandbox.products / "mosaics" / "n/a.fits"
    assert archived.stat().st_ino == inode and archived.stat().st_nlink == 1
    assert not staged.exists()
    # The pipeline writes the staged name again, then updates a header in place.
    write_fits(staged, seed=1)
    with fits.open(staged, mode="update") as hdul:
        hdul[0].header["MEDRMS"] = 5e-4
    rewritten = staged.read_bytes()
    old = staged.stat().st_mtime - 60
    os.utime(staged, (old, old))
    sandbox.cli("scan", check=True)
    assert archived.read_bytes() == data
    assert (sandbox.products / "mosaics" / "n/a.v2.fits").read_bytes() == rewritten
    rows = {r["data_id"]: r for r in sandbox.registry_rows()}
    assert {k: r["status"] for k, r in rows.items()} == {"n/a": "published",
                                                       "n/a.v2": "published"}
    assert_archive_matches_registry(sandbox)


def _image(sandbox: Sandbox, name: str) -> dict[str, bytes]:
    image = sandbox.stage / "images" / name
    (image / "logtable").mkdir(parents=True)
    files = {"table.dat": b"image table", "table.f0": os.urandom(5000),
             "logtable/table.dat": b"log"}
    for rel, content in files.items():
        (image / rel).write_bytes(content)
    old = os.stat(image / "table.dat").st_mtime - 60
    for p in [image, *image.rglob("*")]:
        os.utime(p, (old, old))
    return files


def tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file()}


def test_folder_product_is_published_and_its_staged_folder_removed(sandbox_fs: Sandbox) -> None:
    sandbox = sandbox_fs
    sandbox.update(products=IMAGE_RULES)
    files = _image(sandbox, "field.image")
    out = sandbox.cli("scan", check=True)
    archived = sandbox.products / "images" / "field.image"
    assert tree(archived) == files
    assert not (sandbox.stage / "images" / "field.image").exists(), out.stdout
    assert list((sandbox.stage / "images").iterdir()) == []
    assert temps(sandbox.products, sandbox.stage) == []
    row = sandbox.row("field")
    assert row["status"] == "published" and row["published_path"] == str(archived)
    # A rescan finds nothing left to hash or call a leftover.
    again = sandbox.cli("scan", check=True)
    assert "leftover" not in again.stdout and "registered" not in again.stdout.split("scan:")[0]
    assert tree(archived) == files


def test_folder_product_with_a_hard_linked_file_is_copied(sandbox_fs: Sandbox) -> None:
    sandbox = sandbox_fs
    sandbox.update(products=IMAGE_RULES)
    files = _image(sandbox, "linked.image")
    outside = sandbox.root / "outside.dat"
    outside.write_bytes(b"shared table")
    outside.chmod(0o600)
    os.link(outside, sandbox.stage / "images" / "linked.image" / "table.f1")
    files["table.f1"] = b"shared table"
    img = sandbox.stage / "images" / "linked.image"
    old = os.stat(img / "table.dat").st_mtime
    os.utime(img, (old, old))
    before = fingerprint(outside)
    sandbox.cli("scan", check=True)
    archived = sandbox.products / "images" / "linked.image"
    assert tree(archived) == files
    assert (archived / "table.f1").stat().st_ino != outside.stat().st_ino
    assert fingerprint(outside) == before and outside.stat().st_nlink == 1
    assert not img.exists()


@pytest.mark.root("mounting a tmpfs for the products area needs root")
def test_folder_product_changed_after_its_copy_is_not_removed(
        tmp_path: Path, make_sandbox: MakeSandbox) -> None:
    """Across filesystems the staged folder is removed only when its bytes, hashed again,
    are still the archived ones: one changed after a crash that came right after the commit
    is a new version, published before its staged folder goes."""
    products = tmp_path / "products"
    mount_tmpfs(products, "64m")
    try:
        sandbox = make_sandbox(products_root=products, products=IMAGE_RULES)
        files = _image(sandbox, "late.image")
        crashed = sandbox.cli("scan", env={CRASH_ENV: CrashPoint.AFTER_COMMIT})
        assert crashed.returncode == -9
        img = sandbox.stage / "images" / "late.image"
        (img / "table.f0").write_bytes(b"rewritten after the publish")
        sandbox.cli("scan", check=True)
        # The first copy stays as published; the changed folder is not taken for a leftover
        # of it (and removed) but published as a version of its own.
        assert tree(products / "images" / "late.image") == files
        assert tree(products / "images" / "late.v2.image") == {
            **files, "table.f0": b"rewritten after the publish"}
        assert sandbox.row("late")["status"] == "published"
        assert sandbox.row("late.v2")["status"] == "published"
        assert not img.exists()
    finally:
        umount(products)


@pytest.mark.root("mounting a tmpfs for the products area needs root")
def test_file_written_to_in_place_after_its_copy_is_not_removed(
        tmp_path: Path, make_sandbox: MakeSandbox) -> None:
    """Across filesystems the staged name goes only while it is the file that was copied,
    unchanged: a header updated in place after the commit (same inode) is kept, and
    published as a version of its own."""
    products = tmp_path / "products"
    mount_tmpfs(products, "64m")
    try:
        sandbox = make_sandbox(products_root=products)
        data = stage(sandbox, "a.fits", seed=1)
        staged = sandbox.mosaics / "a.fits"
        inode = staged.stat().st_ino
        crashed = sandbox.cli("scan", env={CRASH_ENV: CrashPoint.AFTER_COMMIT})
        assert crashed.returncode == -9
        with fits.open(staged, mode="update") as hdul:
            hdul[0].header["MEDRMS"] = 7e-4
        assert staged.stat().st_ino == inode
        updated = staged.read_bytes()
        sandbox.cli("scan", check=True)
        assert archive_files(products / "mosaics") == {"a.fits": data, "a.v2.fits": updated}
        assert_archive_matches_registry(sandbox)
    finally:
        umount(products)


# --- no writer, no publish ---------------------------------------------------------------------

WRITER = r"""
import sys, time
path, first, rest, pause = sys.argv[1], sys.argv[2], sys.argv[3], float(sys.argv[4])
with open(first, "rb") as f:
    head = f.read()
with open(rest, "rb") as f:
    tail = f.read()
with open(path, "ab") as out:
    out.write(head)
    out.flush()
    print("paused", flush=True)
    time.sleep(pause)      # the descriptor stays open, at an HDU boundary
    out.write(tail)
print("closed", flush=True)
"""


def two_hdus(seed: int) -> tuple[bytes, bytes]:
    """A mosaic with a table extension, split at the HDU boundary: the first part alone is
    a complete, valid FITS file."""
    import io

    import numpy as np

    from tests.helpers import mosaic_hdu
    table = fits.BinTableHDU.from_columns(
        [fits.Column(name="flux", format="E", array=np.arange(100, dtype=np.float32) + seed)])
    buf = io.BytesIO()
    fits.HDUList([mosaic_hdu(32, seed), table]).writeto(buf, checksum=True)
    whole = buf.getvalue()
    primary = io.BytesIO()
    fits.HDUList([mosaic_hdu(32, seed)]).writeto(primary, checksum=True)
    cut = len(primary.getvalue())
    assert whole[cut:cut + 8] == b"XTENSION"
    return whole[:cut], whole[cut:]


def _writer(tmp: Path, path: Path, head: bytes, tail: bytes, pause: float,
            prefix: tuple[str, ...] = ()) -> subprocess.Popen[str]:
    (tmp / "head.bin").write_bytes(head)
    (tmp / "tail.bin").write_bytes(tail)
    proc = subprocess.Popen([*prefix, sys.executable, "-c", WRITER, str(path),
                             str(tmp / "head.bin"), str(tmp / "tail.bin"), str(pause)],
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None and proc.stdout.readline().strip() == "paused"
    return proc


def _published(sandbox: Sandbox, data_id: str) -> dict | None:
    row = sandbox.row(data_id)
    return row if row is not None and row["status"] == "published" else None


@pytest.mark.slow
def test_writer_pausing_at_an_hdu_boundary_is_waited_for(sandbox_fs: Sandbox) -> None:
    """The pipeline writes the primary HDU, flushes, and pauses far longer than the settle
    time with its file open, then writes the table: only the whole file is published."""
    sandbox = sandbox_fs
    head, tail = two_hdus(seed=3)
    proc = start_daemon(sandbox)
    try:
        writer = _writer(sandbox.root, sandbox.mosaics / "paused.fits", head, tail, pause=3.0)
        time.sleep(2.0)  # more than six settle times with a valid FITS file on disk
        assert sandbox.row("paused") is None, "registered while its writer still had it open"
        assert writer.wait(timeout=30) == 0
        row = wait_for(lambda: _published(sandbox, "paused"), what="paused published")
    finally:
        assert stop(proc) == 0
    archived = Path(row["published_path"])
    assert archived.read_bytes() == head + tail
    assert row["checksum"] == f"sha256:{sha256(head + tail)}"
    assert_archive_matches_registry(sandbox)
    checks = [e for e in log_events(sandbox) if e.get("event") == "writer_check"]
    assert [e["method"] for e in checks] == ["lease"], checks


@pytest.mark.slow
def test_writer_that_appears_after_registration_stops_the_publish(sandbox_fs: Sandbox) -> None:
    """A writer opens the registered file before it is published (an append, an in-place
    update): the publish is source_changed, nothing reaches the archive, and the file is
    published whole once the writer is done."""
    sandbox = sandbox_fs
    head, tail = two_hdus(seed=4)
    staged = sandbox.mosaics / "late.fits"
    staged.write_bytes(head)
    old = time.time() - 60
    os.utime(staged, (old, old))
    assert register_only(sandbox) == ["late"]
    writer = _writer(sandbox.root, staged, b"", tail, pause=2.0)
    out = sandbox.cli("publish", "late")
    assert out.returncode == 1 and "open for writing by another process" in out.stderr
    assert archive_files(sandbox.products) == {}
    assert staged.exists()
    assert writer.wait(timeout=30) == 0
    time.sleep(0.5)
    sandbox.cli("scan", check=True)
    row = sandbox.row("late")
    assert row["status"] == "published"
    assert Path(row["published_path"]).read_bytes() == head + tail
    assert_archive_matches_registry(sandbox)


@pytest.mark.slow
@pytest.mark.root("dropping CAP_LEASE (setpriv), on a folder owned by another user")
def test_without_leases_close_write_events_stand_in(
        make_sandbox: MakeSandbox, setpriv: str) -> None:
    """A daemon without CAP_LEASE, on a staging folder owned by another user: it says it
    falls back to close-write events, and still waits for the paused writer."""
    sandbox = make_sandbox()
    os.chown(sandbox.stage, 65534, 65534)
    os.chown(sandbox.mosaics, 65534, 65534)
    head, tail = two_hdus(seed=5)
    proc = start_daemon(sandbox, prefix=NO_CAP_LEASE)
    try:
        wait_for(lambda: any(e.get("event") == "started" for e in log_events(sandbox)),
                 what="the daemon to start")
        writer = _writer(sandbox.root, sandbox.mosaics / "nocap.fits", head, tail, pause=3.0)
        time.sleep(2.0)
        assert sandbox.row("nocap") is None, "registered while its writer still had it open"
        assert writer.wait(timeout=30) == 0
        row = wait_for(lambda: _published(sandbox, "nocap"), what="nocap published")
    finally:
        assert stop(proc) == 0
    assert Path(row["published_path"]).read_bytes() == head + tail
    [check] = [e for e in log_events(sandbox) if e.get("event") == "writer_check"]
    assert check["method"] == "close-write" and "CAP_LEASE" in check["reason"], check


# --- one read across filesystems -----------------------------------------------------------------

def _stage_bytes(sandbox: Sandbox, name: str, data: bytes) -> Path:
    """A finished file in the staging area, settled long ago."""
    path = sandbox.mosaics / name
    path.write_bytes(data)
    old = time.time() - 60
    os.utime(path, (old, old))
    return path


def _corrupt_data(data: bytes, hdu: int) -> bytes:
    """The same file with one data byte of HDU `hdu` changed; its headers, and the
    CHECKSUM/DATASUM they state, are left as they were."""
    import io
    with fits.open(io.BytesIO(data)) as hdul:
        at = hdul.fileinfo(hdu)["datLoc"] + 10
    return data[:at] + bytes([data[at] ^ 0x01]) + data[at + 1:]


def _across(sandbox: Sandbox) -> bool:
    return os.stat(sandbox.products).st_dev != os.stat(sandbox.stage).st_dev


def _rchar() -> int:
    """Bytes this process has read so far, by any read(2)/pread(2) (the kernel's count)."""
    for line in Path("/proc/self/io").read_text().splitlines():
        if line.startswith("rchar:"):
            return int(line.split()[1])
    raise AssertionError("no rchar in /proc/self/io")


@pytest.mark.slow
def test_fits_failing_its_checksum_is_rejected_and_nothing_is_archived(
        sandbox_fs: Sandbox) -> None:
    """A mosaic with one data byte changed behind intact headers (its DATASUM no longer
    matches), with a preview: on one filesystem registration finds it; across filesystems
    registration reads only the headers and the copy finds it. Either way the product is
    rejected with the reason naming the HDU, no temporary file remains, nothing (not even
    the preview) reaches the archive, and an unchanged file looked at again stays rejected
    without being copied again."""
    sandbox = sandbox_fs
    head, tail = two_hdus(seed=11)
    data = _corrupt_data(head + tail, 1)
    staged = _stage_bytes(sandbox, "bad.fits", data)
    preview = _stage_bytes(sandbox, "bad.png", b"\x89PNG preview of bad")
    out = sandbox.cli("scan", check=True)
    row = sandbox.row("bad")
    assert row is not None and row["status"] == "rejected", out.stdout
    reason = row["publish_error"]
    assert reason.startswith("invalid FITS: HDU 1 DATASUM mismatch: header says "), reason
    assert f"{staged}: {reason}" in out.stdout if _across(sandbox) else reason in out.stdout
    assert "1 rejected" in out.stdout and "0 published" in out.stdout
    assert archive_files(sandbox.products) == {}
    assert temps(sandbox.products, sandbox.stage) == []
    assert staged.read_bytes() == data and preview.read_bytes() == b"\x89PNG preview of bad"
    # Across filesystems the rejection is the copy's: one attempt, in the history.
    assert history_kinds(sandbox, "bad") == (["verify_mismatch"] if _across(sandbox) else [])
    assert row["checksum"] is None and not row["checksum_pending"]
    # Looked at again (as an event would make it), unchanged: the same reason, no copy.
    cfg = sandbox.config()
    with Registry(cfg.registry) as registry:
        detector = detect.Detector(cfg, registry)
        detector.note(staged)
        [again] = detector.settle()
    assert again.action == "rejected_unchanged" and again.reason == reason
    sandbox.cli("scan", check=True)
    assert sandbox.row("bad") == row
    assert archive_files(sandbox.products) == {}


@pytest.mark.slow
def test_fits_across_filesystems_gets_its_checksum_from_the_copy(sandbox_fs: Sandbox) -> None:
    """Registration across filesystems records the identity and what the headers declare
    (size, metadata), the checksum pending; the publish's copy computes it, checks the FITS
    checksums, and both are recorded with the product. On one filesystem registration
    reads the file and records its checksum, as before."""
    sandbox = sandbox_fs
    head, tail = two_hdus(seed=12)
    data = head + tail
    _stage_bytes(sandbox, "good.fits", data)
    assert register_only(sandbox) == ["good"]
    row = sandbox.row("good")
    assert row["size_bytes"] == len(data) and row["metadata"]["hdus"] == 2
    assert row["metadata"]["OBJECT"] == "MOSAIC12"
    if _across(sandbox):
        assert row["checksum"] is None and row["checksum_pending"]
        assert row["metadata"]["fits_checksums"] == "pending"
        assert "computed by the copy" in sandbox.cli("show", "good", check=True).stdout
    else:
        assert row["checksum"] == f"sha256:{sha256(data)}" and not row["checksum_pending"]
    out = sandbox.cli("publish", "good", check=True)
    assert "published to" in out.stdout
    row = sandbox.row("good")
    assert row["status"] == "published" and not row["checksum_pending"]
    assert row["checksum"] == f"sha256:{sha256(data)}"
    assert row["metadata"]["fits_checksums"] == "verified"
    assert archive_files(sandbox.products / "mosaics") == {"good.fits": data}
    assert history_kinds(sandbox, "good") == []
    assert_archive_matches_registry(sandbox)


def test_truncated_fits_is_rejected_from_its_headers(sandbox_fs: Sandbox) -> None:
    """Shorter than its headers declare: rejected at registration both ways, across
    filesystems from the headers alone."""
    sandbox = sandbox_fs
    head, tail = two_hdus(seed=13)
    _stage_bytes(sandbox, "short.fits", head + tail[:-2880])
    sandbox.cli("scan", check=True)
    row = sandbox.row("short")
    assert row["status"] == "rejected"
    assert row["publish_error"].startswith("invalid FITS: truncated: HDU 1 data needs ")
    assert history_kinds(sandbox, "short") == []
    assert archive_files(sandbox.products) == {}


@pytest.mark.slow
@pytest.mark.root("mounting a tmpfs for the products area needs root")
def test_registration_across_filesystems_reads_the_headers_not_the_data(
        tmp_path: Path, make_sandbox: MakeSandbox) -> None:
    """The kernel's count of bytes this process read (rchar): registering a 48 MB mosaic
    that will be copied to another filesystem reads a few blocks; the same registration
    with the products area on the staging filesystem reads all of it (so the count would
    show a read, were there one)."""
    data = write_fits(tmp_path / "big.fits", pixels=3500, seed=14)
    assert len(data) > 48_000_000
    products = tmp_path / "products-tmpfs"
    mount_tmpfs(products, "64m")
    try:
        read = {}
        for name, box in (("across", make_sandbox("across", products_root=products)),
                          ("same_fs", make_sandbox("same"))):
            staged = _stage_bytes(box, "big.fits", data)
            cfg = box.config()
            with Registry(cfg.registry) as registry:
                detector = detect.Detector(cfg, registry)
                detector.scan()
                before = _rchar()
                [outcome] = detector.settle()
                read[name] = _rchar() - before
            assert outcome.action == "registered", outcome
            assert outcome.product is not None and outcome.product.size_bytes == len(data)
            assert staged.read_bytes() == data
        assert read["across"] < 256 * 1024, read
        assert read["same_fs"] >= len(data), read
    finally:
        umount(products)


@pytest.mark.slow
@pytest.mark.root("mounting a tmpfs for the products area needs root")
def test_pending_checksum_is_computed_before_a_rename_too(
        tmp_path: Path, make_sandbox: MakeSandbox) -> None:
    """Registered for a copy to another filesystem, then the products area moves onto the
    staging filesystem (a reload): the rename path reads and checks the file first, as the
    copy would have; a good file is published with its checksum, a corrupt one rejected
    and left where it was staged."""
    products = tmp_path / "products-tmpfs"
    mount_tmpfs(products, "64m")
    try:
        sandbox = make_sandbox(products_root=products)
        good = fits_bytes_pair(15)
        bad = _corrupt_data(fits_bytes_pair(16), 0)
        _stage_bytes(sandbox, "good.fits", good)
        staged_bad = _stage_bytes(sandbox, "bad.fits", bad)
        assert register_only(sandbox) == ["bad", "good"]
        assert sandbox.row("good")["checksum_pending"] and sandbox.row("bad")["checksum_pending"]
    finally:
        umount(products)
    local = tmp_path / "products-local"
    local.mkdir()
    sandbox.update(paths={"products_root": str(local)})
    assert sandbox.cli("publish", "good").returncode == 0
    row = sandbox.row("good")
    assert row["status"] == "published" and row["checksum"] == f"sha256:{sha256(good)}"
    assert row["metadata"]["fits_checksums"] == "verified"
    out = sandbox.cli("publish", "bad")
    assert out.returncode == 1 and "HDU 0 DATASUM mismatch" in out.stderr, out.stderr
    assert sandbox.row("bad")["status"] == "rejected"
    assert staged_bad.read_bytes() == bad
    assert archive_files(local) == {"mosaics/good.fits": good}


def fits_bytes_pair(seed: int) -> bytes:
    head, tail = two_hdus(seed)
    return head + tail
