"""Crash-safe publishing, proved with real processes, real filesystems and real signals.

A product published by the real CLI must end up in the products area exactly once,
byte-identical, with its row `published` and its staged copy gone, whatever happens on the
way: the process dying at any step of the protocol, a full disk, six publishers at once,
a source swapped under the publisher, or a name already taken.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import apsw
import pytest

from contimg_publisher import detect, publish
from contimg_publisher.publish import CRASH_ENV, CRASH_POINTS, CrashPoint
from contimg_publisher.registry import Registry
from tests.helpers import REPO, MakeSandbox, Sandbox, fits_bytes, mount_tmpfs, umount

TEMP_GLOB = ".contimg-tmp.*"


# --- helpers ----------------------------------------------------------------------------------

def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def stage(sandbox: Sandbox, rel: str, pixels: int = 64, seed: int = 0) -> bytes:
    """A finished mosaic in the staging area, its mtime in the past so it is settled."""
    data = fits_bytes(pixels, seed=seed)
    path = sandbox.mosaics / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    old = time.time() - 60
    os.utime(path, (old, old))
    return data


def register_only(sandbox: Sandbox) -> list[str]:
    """Detect and register what is staged, without publishing (the first half of a pass)."""
    cfg = sandbox.config()
    with Registry(cfg.registry) as registry:
        detector = detect.Detector(cfg, registry)
        detector.scan()
        outcomes = detector.settle()
    return sorted(o.data_id for o in outcomes if o.action == "registered")


def archive_files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file() or p.is_symlink()}


def temps(*roots: Path) -> list[Path]:
    return [p for root in roots for p in root.rglob(TEMP_GLOB)]


def relationships(sandbox: Sandbox) -> list[tuple[str, str, str]]:
    conn = apsw.Connection(str(sandbox.registry), flags=apsw.SQLITE_OPEN_READONLY)
    try:
        return list(conn.execute("SELECT parent_data_id, child_data_id, relationship_type "
                                 "FROM data_relationships"))
    finally:
        conn.close()


def history_kinds(sandbox: Sandbox, data_id: str) -> list[str]:
    with Registry(sandbox.registry, migrate=False) as registry:
        return [f.kind for f in registry.history(data_id)]


def assert_published_once(sandbox: Sandbox, expected: dict[str, bytes]) -> None:
    """Every product once in the archive, byte-identical, row published, source gone,
    no temporary file anywhere."""
    found = archive_files(sandbox.products / "mosaics")
    assert {k: sha256(v) for k, v in found.items()} == {k: sha256(v)
                                                        for k, v in expected.items()}
    assert temps(sandbox.products, sandbox.stage) == []
    assert [p for p in sandbox.mosaics.rglob("*") if not p.is_dir()] == []
    rows = sandbox.registry_rows()
    assert {r["data_id"]: r["status"] for r in rows} == {
        k.removesuffix(".fits"): "published" for k in expected if k.endswith(".fits")}
    for r in rows:
        assert r["published_path"] == str(sandbox.products / "mosaics" / f"{r['data_id']}.fits")
        assert r["lease_owner"] is None
        name = r["data_id"].rsplit("/", 1)[-1]
        assert r["sidecars"] == [f"{name}.png" for k in expected if k == f"{r['data_id']}.png"]


# --- deterministic crash points ---------------------------------------------------------------

# On one filesystem there is no temporary file to kill the process after.
SAME_FS_POINTS = [p for p in CRASH_POINTS if p is not CrashPoint.AFTER_TEMP_WRITE]


def _crash_and_recover(sandbox: Sandbox, point: CrashPoint, same_fs: bool) -> None:
    expected = {f"n1/m{i}.fits": stage(sandbox, f"n1/m{i}.fits", seed=i) for i in range(3)}
    for i in range(3):  # each with a preview sidecar, which must travel with it
        expected[f"n1/m{i}.png"] = b"\x89PNG preview %d" % i
        (sandbox.mosaics / f"n1/m{i}.png").write_bytes(expected[f"n1/m{i}.png"])
    crashed = sandbox.cli("scan", env={CRASH_ENV: point})
    assert crashed.returncode == -9, (crashed.stdout, crashed.stderr)
    # What the kill left behind is what each step promises, and no more. `scan` takes the
    # three in one batch, whose steps are shared: all three were claimed together.
    listed = sandbox.registry_rows()
    rows = {r["data_id"]: r["status"] for r in listed}
    names = [f"n1/m{i}" for i in range(3)]
    assert sorted(rows) == names
    # The step each row records is the one the kill interrupted.
    assert {r["publish_step"] for r in listed} == (
        {None} if point in (CrashPoint.AFTER_COMMIT, CrashPoint.BEFORE_SOURCE_REMOVAL)
        else {"planned"})
    finals = {name: sandbox.products / "mosaics" / f"{name}.fits" for name in names}
    previews = {name: finals[name].parent / f"{finals[name].stem}.png" for name in names}
    left = temps(sandbox.products)
    # Every file is whole at exactly one of its two names (a rename moves, a copy leaves
    # the staged one until after the commit).
    for rel, data in expected.items():
        staged, final = sandbox.mosaics / rel, sandbox.products / "mosaics" / rel
        there = [p for p in (staged, final) if p.exists()]
        assert there and all(p.read_bytes() == data for p in there), (rel, there)
        assert len(there) == 1 or not same_fs, f"{rel} at both names after a rename"
    if point in (CrashPoint.AFTER_SIDECARS, CrashPoint.AFTER_TEMP_WRITE):
        # Killed during the first product: only its sidecar (and across filesystems its
        # temporary copy) reached the products area. Across filesystems the copy comes
        # first: its one read checks the file and computes the checksum, which is recorded
        # before the sidecar takes its final name; on one filesystem the sidecar is renamed
        # first and the checksum was known since registration.
        assert set(rows.values()) == {"publishing"}
        assert not any(f.exists() for f in finals.values())
        if same_fs:
            [victim] = [n for n in names if previews[n].exists()]
            assert left == []
        else:
            [copy] = [p.read_bytes() for p in left]
            [victim] = [n for n in names if expected[f"{n}.fits"] == copy]
            assert [n for n in names if previews[n].exists()] == (
                [victim] if point is CrashPoint.AFTER_SIDECARS else [])
            recorded = {r["data_id"]: r["checksum"] for r in listed}
            assert recorded == {n: f"sha256:{sha256(expected[f'{n}.fits'])}"
                                if n == victim and point is CrashPoint.AFTER_SIDECARS else None
                                for n in names}, recorded
        for name in names:
            assert (sandbox.mosaics / f"{name}.fits").exists()
            assert (sandbox.mosaics / f"{name}.png").exists() == (
                not same_fs or name != victim)
    else:
        assert left == []
        assert set(rows.values()) == {
            "publishing" if point is CrashPoint.AFTER_RENAME else "published"}
        for name in names:
            assert finals[name].read_bytes() == expected[f"{name}.fits"]
            assert previews[name].read_bytes() == expected[f"{name}.png"]
            assert (sandbox.mosaics / f"{name}.fits").exists() != same_fs
    recovered = sandbox.cli("scan")
    assert recovered.returncode == 0, (recovered.stdout, recovered.stderr)
    assert_published_once(sandbox, expected)
    kinds = {k for i in range(3) for k in history_kinds(sandbox, f"n1/m{i}")}
    assert kinds <= {"interrupted"}, kinds
    assert all(r["publish_attempts"] == 0 for r in sandbox.registry_rows())
    if same_fs:  # the archive holds the staged inodes themselves, each with one name
        assert all(p.stat().st_nlink == 1 for p in (sandbox.products / "mosaics").rglob("*")
                   if p.is_file())


@pytest.mark.slow
@pytest.mark.parametrize("point", CRASH_POINTS)
def test_crash_point_across_filesystems_recovers(make_sandbox: MakeSandbox, tmpfs_products: Path,
                                                 point: CrashPoint) -> None:
    """The process dies at each step of a copy onto another filesystem; the next pass
    reaches the same end state as an uninterrupted publish."""
    _crash_and_recover(make_sandbox(products_root=tmpfs_products), point, same_fs=False)


@pytest.mark.slow
@pytest.mark.parametrize("point", SAME_FS_POINTS)
def test_crash_point_same_filesystem_recovers(make_sandbox: MakeSandbox, point: CrashPoint) -> None:
    """The same on one filesystem, where the publish is a rename of the staged inode."""
    _crash_and_recover(make_sandbox(), point, same_fs=True)


# --- full disk --------------------------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.root("mounting a tiny tmpfs for the products area needs root")
def test_full_disk_publishes_what_fits_then_the_rest_after_retry(
        tmp_path: Path, make_sandbox: MakeSandbox) -> None:
    """A products filesystem with room for a few mosaics: those are published, the others
    fail as no_space with a backoff, leaving no partial file and their sources intact;
    once there is room, `retry` makes them due and the next pass publishes them."""
    products = tmp_path / "products"
    mount_tmpfs(products, "1m")
    try:
        sandbox = make_sandbox(products_root=products,
                               publish={"backoff_initial_seconds": 300, "backoff_max_seconds": 600})
        # 256 x 256 float32: about 260 KiB each; 8 of them need twice the space there is.
        expected = {f"n1/m{i}.fits": stage(sandbox, f"n1/m{i}.fits", pixels=256, seed=i)
                    for i in range(8)}
        before = time.time()
        first = sandbox.cli("scan")
        assert first.returncode == 1, first.stdout  # some products failed
        rows = {r["data_id"]: r for r in sandbox.registry_rows()}
        published = {d for d, r in rows.items() if r["status"] == "published"}
        waiting = {d for d, r in rows.items() if r["status"] == "staging"}
        assert published and waiting and published | waiting == set(rows), rows
        on_disk = archive_files(products / "mosaics")
        assert set(on_disk) == {f"{d}.fits" for d in published}
        assert all(on_disk[k] == expected[k] for k in on_disk)  # nothing partial
        assert temps(products) == []
        for d in waiting:
            assert history_kinds(sandbox, d) == ["no_space"]
            assert rows[d]["publish_attempts"] == 1
            assert rows[d]["next_attempt_at"] > before + 200
            assert (sandbox.mosaics / f"{d}.fits").read_bytes() == expected[f"{d}.fits"]
        # Still backing off: another pass leaves them alone.
        again = sandbox.cli("scan", check=True)
        assert "published" not in again.stdout.split("scan:")[0]

        subprocess.run(["mount", "-o", "remount,size=16m", str(products)], check=True)
        retried = sandbox.cli("retry", *sorted(waiting), check=True)
        assert sorted(retried.stdout.split()) == sorted(
            [f"{d}:" for d in waiting] + ["due", "again"] * len(waiting))
        sandbox.cli("scan", check=True)
        assert_published_once(sandbox, expected)
    finally:
        umount(products)


# --- concurrent publishers --------------------------------------------------------------------

PUBLISH_ALL = """
import random, sys
from contimg_publisher import config, logs, service
cfg = config.load(sys.argv[1])
logs.configure("warning", "json", cfg.error_max_chars)
ids = sys.argv[3:]
random.Random(int(sys.argv[2])).shuffle(ids)
for data_id in ids:
    result = service.publish_now(cfg, data_id, logs.get_logger())
    print(data_id, result if isinstance(result, str) else result.status, flush=True)
"""


@pytest.mark.slow
def test_six_publishers_at_once_publish_each_product_once(make_sandbox: MakeSandbox) -> None:
    """Three `scan` passes and three processes publishing every product by id, all started
    together on the same 100 products: the lock and the claims let each product through
    exactly once, with no version suffix and no supersedes relationship."""
    sandbox = make_sandbox(publish={"lock_wait_seconds": 120})
    expected = {f"n{i % 5}/m{i:03d}.fits": stage(sandbox, f"n{i % 5}/m{i:03d}.fits", seed=i)
                for i in range(100)}
    ids = register_only(sandbox)
    assert len(ids) == 100
    env = {k: v for k, v in os.environ.items() if k not in ("NOTIFY_SOCKET", "WATCHDOG_USEC")}
    procs = []
    for n in range(6):
        if n < 3:
            args = ["-m", "contimg_publisher", "--config", str(sandbox.config_path), "scan"]
        else:
            args = ["-c", PUBLISH_ALL, str(sandbox.config_path), str(n), *ids]
        procs.append(subprocess.Popen([sys.executable, *args], cwd=REPO, env=env, text=True,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE))
    outputs = [p.communicate(timeout=300) for p in procs]
    for p, (out, err) in zip(procs, outputs, strict=True):
        assert p.returncode == 0, (out, err[-2000:])
    assert_published_once(sandbox, expected)
    assert relationships(sandbox) == []
    assert not list((sandbox.products / "mosaics").rglob("*.v2.fits"))
    # Contention is not a failure: no product has a failure in its history.
    assert all(history_kinds(sandbox, d) == [] for d in ids)
    by_scan = [out.split("scan:")[0].count("\npublished ") + out.startswith("published ")
               for p, (out, _e) in zip(procs, outputs, strict=True) if p.args[1] == "-m"]
    print(f"published by each scan: {by_scan}; the rest by the publish-by-id processes")


# --- the source swapped under the publisher ---------------------------------------------------

def test_source_replaced_by_symlink_to_etc_passwd_is_never_published(
        make_sandbox: MakeSandbox) -> None:
    """Between registration and publish the staged mosaic becomes a link to /etc/passwd:
    the publish fails as source_changed and no byte of /etc/passwd reaches the archive."""
    sandbox = make_sandbox()
    stage(sandbox, "n1/a.fits", seed=1)
    assert register_only(sandbox) == ["n1/a"]
    source = sandbox.mosaics / "n1/a.fits"
    source.unlink()
    source.symlink_to("/etc/passwd")
    out = sandbox.cli("publish", "n1/a")
    assert out.returncode == 1
    assert "source_changed" in out.stderr
    assert history_kinds(sandbox, "n1/a") == ["source_changed"]
    sandbox.cli("scan")  # the detector looks at it again, and must not take it either
    passwd = Path("/etc/passwd").read_bytes()
    found = archive_files(sandbox.products)
    assert all(passwd not in data for data in found.values()), list(found)
    assert found == {}
    assert sandbox.row("n1/a")["status"] != "published"
    assert source.is_symlink()


@pytest.mark.slow
def test_source_replaced_by_another_file_is_not_published_as_the_registered_one(
        make_sandbox: MakeSandbox) -> None:
    """The staged mosaic is replaced by a different file after registration: the publish
    refuses it (source_changed) rather than publish bytes nobody verified; the product goes
    back to detection, which describes the new file before it is published."""
    sandbox = make_sandbox()
    stage(sandbox, "n1/a.fits", seed=1)
    assert register_only(sandbox) == ["n1/a"]
    registered = sandbox.row("n1/a")["checksum"]
    replacement = fits_bytes(64, seed=2)
    swap = sandbox.mosaics / "n1/a.fits.new"
    swap.write_bytes(replacement)
    os.replace(swap, sandbox.mosaics / "n1/a.fits")
    out = sandbox.cli("publish", "n1/a")
    assert out.returncode == 1
    assert "source_changed" in out.stderr
    assert archive_files(sandbox.products) == {}
    assert history_kinds(sandbox, "n1/a") == ["source_changed"]
    row = sandbox.row("n1/a")
    assert row["status"] == "staging" and row["checksum"] is None
    assert (sandbox.mosaics / "n1/a.fits").read_bytes() == replacement
    # Examined again, the new file is described and published under its own checksum.
    sandbox.cli("scan", check=True)
    row = sandbox.row("n1/a")
    assert row["status"] == "published"
    assert row["checksum"] == f"sha256:{sha256(replacement)}" != registered
    assert archive_files(sandbox.products / "mosaics") == {"n1/a.fits": replacement}


# --- name collisions --------------------------------------------------------------------------

def test_name_taken_by_identical_bytes_is_idempotent(make_sandbox: MakeSandbox) -> None:
    """The final name already holds exactly the product's bytes (a copy that got there
    another way): the publish adopts it, with no second copy and no version suffix."""
    sandbox = make_sandbox()
    data = stage(sandbox, "n1/a.fits", seed=1)
    existing = sandbox.products / "mosaics/n1/a.fits"
    existing.parent.mkdir(parents=True)
    existing.write_bytes(data)
    inode = existing.stat().st_ino
    sandbox.cli("migrate", check=True)  # an archive without a registry: made on purpose
    sandbox.cli("scan", check=True)
    assert_published_once(sandbox, {"n1/a.fits": data})
    assert existing.stat().st_ino == inode  # left as it was, not replaced
    assert relationships(sandbox) == []


def test_name_taken_by_other_bytes_publishes_a_new_version(make_sandbox: MakeSandbox) -> None:
    """A second, different mosaic under a published product's name: the first is never
    overwritten; the second becomes `.v2`, supersedes the first, and a warning says so."""
    sandbox = make_sandbox()
    first = stage(sandbox, "n1/a.fits", seed=1)
    sandbox.cli("scan", check=True)
    second = stage(sandbox, "n1/a.fits", seed=2)
    out = sandbox.cli("scan", check=True)
    assert archive_files(sandbox.products / "mosaics") == {"n1/a.fits": first,
                                                           "n1/a.v2.fits": second}
    rows = {r["data_id"]: r for r in sandbox.registry_rows()}
    assert {d: r["status"] for d, r in rows.items()} == {"n1/a": "published",
                                                        "n1/a.v2": "published"}
    assert rows["n1/a.v2"]["published_path"].endswith("mosaics/n1/a.v2.fits")
    assert relationships(sandbox) == [("n1/a.v2", "n1/a", "supersedes")]
    warnings = [json.loads(line) for line in out.stderr.splitlines()
                if '"name_taken"' in line]
    assert len(warnings) == 1 and warnings[0]["level"] == "warning"
    assert warnings[0]["existing"].endswith("mosaics/n1/a.fits")
    assert list(sandbox.mosaics.rglob("*.fits")) == []
    assert temps(sandbox.products) == []


# --- batches ----------------------------------------------------------------------------------

def test_one_batch_publishes_the_good_products_and_records_each_bad_one(
        make_sandbox: MakeSandbox) -> None:
    """`scan` publishes a batch with shared commits and fsyncs; a product that fails inside
    the batch (replaced by a link, gone, changed) is recorded on its own, and the others
    are published whole, each once."""
    sandbox = make_sandbox()
    data = {f"n{i % 2}/m{i}": stage(sandbox, f"n{i % 2}/m{i}.fits", seed=i) for i in range(8)}
    assert register_only(sandbox) == sorted(data)
    (sandbox.mosaics / "n0/m0.fits").unlink()
    (sandbox.mosaics / "n0/m0.fits").symlink_to("/etc/passwd")
    (sandbox.mosaics / "n1/m1.fits").unlink()
    with open(sandbox.mosaics / "n0/m2.fits", "ab") as grown:
        grown.write(b"\0" * 2880)
    with Registry(sandbox.registry, migrate=False) as registry:
        claimed = registry.claim("tester", 60, limit=100)
        assert len(claimed) == 8
        cfg = sandbox.config()
        results = {r.data_id: r for r in
                   publish.Publisher(cfg, registry, "tester").publish_many(claimed)}
        kinds = {d: [f.kind for f in registry.history(d)] for d in data}
    assert {d: r.status for d, r in results.items()} == {
        d: "retry_due" if d in ("n0/m0", "n1/m1", "n0/m2") else "published" for d in data}
    assert kinds["n0/m0"] == ["source_changed"] and kinds["n0/m2"] == ["source_changed"]
    assert kinds["n1/m1"] == ["source_missing"]
    good = {f"{d}.fits": data[d] for d in data if d not in ("n0/m0", "n1/m1", "n0/m2")}
    assert archive_files(sandbox.products / "mosaics") == good
    for d in good:
        assert not (sandbox.mosaics / d).exists()
    assert (sandbox.mosaics / "n0/m0.fits").is_symlink()
    assert temps(sandbox.products) == []


def test_two_products_of_one_batch_wanting_one_name_both_publish(make_sandbox: MakeSandbox) -> None:
    """n1/a must become a.v2 (a.fits holds other bytes) and the staged n1/a.v2 wants that
    same name: in one batch neither fails and neither overwrites the other."""
    sandbox = make_sandbox()
    first = stage(sandbox, "n1/a.fits", seed=1)
    sandbox.cli("scan", check=True)
    second = stage(sandbox, "n1/a.fits", seed=2)
    third = stage(sandbox, "n1/a.v2.fits", seed=3)
    out = sandbox.cli("scan", check=True)
    assert "2 published, 0 failed" in out.stdout, out.stdout
    found = archive_files(sandbox.products / "mosaics")
    assert found.pop("n1/a.fits") == first
    assert sorted(found.values()) == sorted([second, third]) and len(found) == 2
    assert all(r["status"] == "published" for r in sandbox.registry_rows())
    assert list(sandbox.mosaics.rglob("*.fits")) == []


# --- kill -9 torture --------------------------------------------------------------------------

TORTURE_PRODUCTS = 200
TORTURE_KILLS = 30
TORTURE_PIXELS = 720  # 720 x 720 float32: about 2 MiB per mosaic


def _start(sandbox: Sandbox, command: str, delay: float) -> subprocess.Popen[bytes]:
    env = {k: v for k, v in os.environ.items() if k not in ("NOTIFY_SOCKET", "WATCHDOG_USEC")}
    env["CONTIMG_PUBLISHER_TEST_COPY_DELAY"] = str(delay)
    return subprocess.Popen([sys.executable, "-m", "contimg_publisher", "--config",
                             str(sandbox.config_path), command], cwd=REPO, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def _check_nothing_wrong_on_disk(sandbox: Sandbox, expected: dict[str, str]) -> int:
    """Between kills: whatever sits under a final name is a complete, byte-identical
    product (never a truncated one), and every row marked published has its file."""
    archive = sandbox.products / "mosaics"
    for path in archive.rglob("*.fits"):
        if not path.name.startswith(".contimg-tmp."):
            rel = str(path.relative_to(archive))
            assert sha256(path.read_bytes()) == expected[rel], f"{rel} is not the product"
    with Registry(sandbox.registry, migrate=False) as registry:
        published = [p for p in registry.products(status="published", limit=None)]
    for row in published:
        assert sha256(Path(row.published_path).read_bytes()) == expected[
            f"{row.data_id}.fits"]
    return len(published)


@pytest.mark.slow
def test_sigkill_at_random_moments_never_loses_truncates_or_duplicates(
        make_sandbox: MakeSandbox, tmpfs_products: Path) -> None:
    """Publishers (`run`, sometimes `scan`) SIGKILLed at random moments, again and again,
    each time restarted; the archive is checked after every kill, not only at the end.
    Copies onto a tmpfs are slowed by a test-only per-chunk delay so that kills land in
    the copy and in the steps after it, not only between products."""
    seed = int(os.environ.get("TORTURE_SEED", "110"))
    rng = random.Random(seed)
    sandbox = make_sandbox(products_root=tmpfs_products,
                           detect={"settle_seconds": 0.0, "rescan_seconds": 300},
                           publish={"lease_seconds": 5})
    expected: dict[str, str] = {}
    for i in range(TORTURE_PRODUCTS):
        rel = f"night{i % 4}/mosaic_{i:03d}.fits"
        expected[rel] = sha256(stage(sandbox, rel, pixels=TORTURE_PIXELS, seed=i))
    assert register_only(sandbox)  # hashing 400 MiB is not what this test kills

    kills, progress, started = 0, [], time.monotonic()
    while kills < TORTURE_KILLS:
        command = "scan" if rng.random() < 0.25 else "run"
        proc = _start(sandbox, command, delay=rng.choice([0.2, 0.3, 0.45]))
        time.sleep(rng.uniform(0.5, 1.5))
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            kills += 1
        proc.wait()
        progress.append(_check_nothing_wrong_on_disk(sandbox, expected))
    print(f"seed {seed}: {kills} SIGKILLs in {time.monotonic() - started:.0f} s; "
          f"published after each: {progress}")
    assert 0 < progress[-1] < TORTURE_PRODUCTS, "the kills did not land during publishing"
    assert len(temps(tmpfs_products)) <= 1  # at most the copy the last kill cut short

    for _ in range(3):  # the first pass may end with backoffs of failures a kill caused
        last = sandbox.cli("scan", timeout=300)
        if all(r["status"] == "published" for r in sandbox.registry_rows()):
            break
    rows = sandbox.registry_rows()
    unpublished = {r["data_id"]: (r["status"], r["publish_error"]) for r in rows
                   if r["status"] != "published"}
    assert unpublished == {}, (list(unpublished.items())[:5], last.stdout[-3000:])
    found = archive_files(tmpfs_products / "mosaics")
    assert {k: sha256(v) for k, v in found.items()} == expected  # once each, identical
    assert temps(tmpfs_products, sandbox.stage) == []
    assert list(sandbox.mosaics.rglob("*.fits")) == []
    rows = sandbox.registry_rows()
    assert len(rows) == TORTURE_PRODUCTS
    assert {r["status"] for r in rows} == {"published"}
    assert all(r["publish_attempts"] == 0 for r in rows), "an interruption counted as a failure"
    assert relationships(sandbox) == []
    kinds = [k for r in rows for k in history_kinds(sandbox, r["data_id"])]
    print(f"interruptions recorded: {kinds.count('interrupted')}; other: "
          f"{[k for k in kinds if k != 'interrupted']}")
    assert set(kinds) <= {"interrupted"}


def test_sidecar_name_taken_by_other_bytes_moves_the_product_to_a_new_version(
        make_sandbox: MakeSandbox) -> None:
    """Only the product's own earlier sidecar may be reused under its name; a sidecar name
    holding something else is never overwritten, so the product and its sidecar take the
    next version together."""
    sandbox = make_sandbox()
    data = stage(sandbox, "n1/a.fits", seed=1)
    (sandbox.mosaics / "n1/a.png").write_bytes(b"\x89PNG ours")
    foreign = sandbox.products / "mosaics/n1/a.png"
    foreign.parent.mkdir(parents=True)
    foreign.write_bytes(b"\x89PNG someone else's")
    sandbox.cli("migrate", check=True)  # an archive without a registry: made on purpose
    sandbox.cli("scan", check=True)
    assert archive_files(sandbox.products / "mosaics") == {
        "n1/a.png": b"\x89PNG someone else's", "n1/a.v2.fits": data,
        "n1/a.v2.png": b"\x89PNG ours"}
    row = sandbox.row("n1/a")
    assert row["status"] == "published" and row["sidecars"] == ["a.v2.png"]
    assert [p for p in sandbox.mosaics.rglob("*") if not p.is_dir()] == []


# --- the protocol as code ---------------------------------------------------------------------

def test_the_protocol_takes_its_steps_in_the_enum_order() -> None:
    """The order the batch runs is the order ProtocolStep names, and every crash point
    belongs to one step, where the row records what the kill tests find."""
    from contimg_publisher.publish import protocol
    from contimg_publisher.publish.steps import CRASH_POINTS_BY_STEP, ProtocolStep
    assert [step for step, _ in protocol.PROTOCOL] == list(ProtocolStep)
    assert sorted(p for points in CRASH_POINTS_BY_STEP.values() for p in points) == \
        sorted(CRASH_POINTS)
    assert {p: p.step.recorded for p in CRASH_POINTS} == {
        p: None if p in (CrashPoint.AFTER_COMMIT, CrashPoint.BEFORE_SOURCE_REMOVAL)
        else "planned" for p in CRASH_POINTS}
    assert [str(p) for p in CRASH_POINTS] == ["after_sidecars", "after_temp_write",
                                              "after_rename", "after_commit",
                                              "before_source_removal"]


def test_an_unknown_crash_point_is_refused(tmp_path: Path,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """A misspelt crash point would make a kill test test nothing: it is refused before
    anything is published."""
    from contimg_publisher.publish import UnknownCrashPoint
    sandbox = Sandbox(tmp_path)
    monkeypatch.setenv(CRASH_ENV, "after_lunch")
    with Registry(sandbox.registry) as registry, \
            pytest.raises(UnknownCrashPoint, match="after_lunch"):
        publish.Publisher(sandbox.config(), registry, "tester")
    monkeypatch.setenv(CRASH_ENV, CrashPoint.AFTER_COMMIT)
    with Registry(sandbox.registry) as registry:
        publish.Publisher(sandbox.config(), registry, "tester")


def test_reconciliation_uses_only_the_protocols_public_names() -> None:
    """reconcile.py imports from the publish package itself, and nothing private."""
    import ast
    source = (REPO / "daemon/contimg_publisher/reconcile.py").read_text()
    imported = [(node.module, alias.name) for node in ast.walk(ast.parse(source))
                if isinstance(node, ast.ImportFrom) and node.module is not None
                and node.module.startswith("contimg_publisher.publish")
                for alias in node.names]
    assert imported and all(module == "contimg_publisher.publish" for module, _ in imported)
    assert all(not name.startswith("_") and name in publish.__all__
               for _, name in imported), imported
