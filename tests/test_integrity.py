"""An archived product never changes and never shares an inode with a name outside the
archive: hard-linked staged files, folder products, and a staged name written again after
a crash, with real files on one filesystem and across two (a tmpfs products area).

In every case the archived bytes equal the recorded checksum at the end, and a file
outside the two roots keeps its mode, owner and bytes.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
from astropy.io import fits

from contimg_publisher.publish import CRASH_ENV
from tests.helpers import (
    Sandbox,
    is_root,
    log_events,
    mount_tmpfs,
    start_daemon,
    stop,
    umount,
    wait_for,
    write_fits,
)
from tests.test_publish import archive_files, register_only, sha256, stage, temps

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


def test_same_filesystem_publish_moves_the_inode_so_the_staged_name_is_free(
        tmp_path: Path) -> None:
    """On one filesystem the staged inode is renamed into the archive; the pipeline writing
    the same staged name again (in place, astropy's update mode, after a crash before the
    source removal step) writes a new file, and the archived bytes stay as recorded."""
    sandbox = Sandbox(tmp_path)
    data = stage(sandbox, "n/a.fits", seed=1)
    staged = sandbox.mosaics / "n/a.fits"
    inode = staged.stat().st_ino
    crashed = sandbox.cli("scan", env={CRASH_ENV: "before_source_removal"})
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


def test_folder_product_changed_after_its_copy_is_not_removed(tmp_path: Path) -> None:
    """Across filesystems the staged folder is removed only when its bytes, hashed again,
    are still the archived ones: one changed after a crash that came right after the commit
    is a new version, published before its staged folder goes."""
    if not is_root():
        pytest.skip("mounting a tmpfs for the products area needs root")
    products = tmp_path / "products"
    mount_tmpfs(products, "64m")
    try:
        sandbox = Sandbox(tmp_path, products_root=products, products=IMAGE_RULES)
        files = _image(sandbox, "late.image")
        crashed = sandbox.cli("scan", env={CRASH_ENV: "after_commit"})
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


def test_file_written_to_in_place_after_its_copy_is_not_removed(tmp_path: Path) -> None:
    """Across filesystems the staged name goes only while it is the file that was copied,
    unchanged: a header updated in place after the commit (same inode) is kept, and
    published as a version of its own."""
    if not is_root():
        pytest.skip("mounting a tmpfs for the products area needs root")
    products = tmp_path / "products"
    mount_tmpfs(products, "64m")
    try:
        sandbox = Sandbox(tmp_path, products_root=products)
        data = stage(sandbox, "a.fits", seed=1)
        staged = sandbox.mosaics / "a.fits"
        inode = staged.stat().st_ino
        crashed = sandbox.cli("scan", env={CRASH_ENV: "after_commit"})
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


def test_without_leases_close_write_events_stand_in(tmp_path: Path) -> None:
    """A daemon without CAP_LEASE, on a staging folder owned by another user: it says it
    falls back to close-write events, and still waits for the paused writer."""
    if not is_root() or shutil.which("setpriv") is None:
        pytest.skip("needs root and setpriv (util-linux) to drop CAP_LEASE")
    sandbox = Sandbox(tmp_path)
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
