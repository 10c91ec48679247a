"""Publishing throughput, measured side by side with the baseline it must match or beat.

(a) Cross-filesystem publish of a 1 GiB FITS mosaic (staging on the disk, products on
    another filesystem: a tmpfs and/or a loop-mounted ext4 image) through `publish DATA_ID`
    (open, fstat check, copy with the checksum in the same pass, fsync, verify, no-replace
    rename, durable commit, source removal) against `cp` followed by `sync` of the copy.
    Target: at least 0.8 of cp's throughput.
(b) Same-filesystem end-to-end publishing of 2,000 small mosaics with one `scan` process
    (start-up included: detect, validate and hash each FITS, register, claim, rename,
    fsync the folders, commit durably, remove the sources, in batches that share their
    commits and fsyncs) against the older pattern: Python sqlite3, one autocommit per row,
    then shutil.move per file, with no validation and no fsync of the folders. Target: at
    least 3x the older pattern's products/s.
(c) Publishing onto a products disk at HDD speed: 1 GiB and 4 GiB mosaics (--sizes) onto
    ext4 on a loop device whose writes are limited to 150 MB/s (--hdd-mbps) by cgroup v1
    blkio throttling (see Hdd), each measured against `cp` + `sync` of the same file onto
    the same disk just before it, all from a cold page cache: a fresh `scan` process from
    the settled file to the durable product (registration reads the headers, the publish's
    copy is the one read of the data: hash and FITS checks), and `publish DATA_ID` alone
    after registration.
    Target: settled-to-published at least 0.9 of cp + sync. Reported as ratios.

Mounting needs root; without it (a) and (c) are skipped with the reason printed. Run from
the repository root: `.venv/bin/python bench/bench_publish.py [--only a|b|c] [--workdir DIR]`.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import io
import json
import os
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
from astropy.io import fits

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "daemon"))

from tests.helpers import Sandbox  # noqa: E402

from contimg_publisher import config as config_mod  # noqa: E402
from contimg_publisher import detect  # noqa: E402
from contimg_publisher.registry import LEGACY_DDL, Registry  # noqa: E402

GIB = 1 << 30
PIXELS_1GIB = 16384  # 16384 x 16384 float32 = exactly 1 GiB of data


def child_env() -> dict[str, str]:
    """The environment for a command run from this checkout, outside any systemd unit."""
    env = {k: v for k, v in os.environ.items() if k not in ("NOTIFY_SOCKET", "WATCHDOG_USEC")}
    env["PYTHONPATH"] = str(REPO / "daemon")
    return env


def cli(config_path: Path, *args: str, preexec_fn: Callable[[], None] | None = None
        ) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "contimg_publisher", "--config",
                           str(config_path), *args], capture_output=True, text=True,
                          env=child_env(), cwd=REPO, check=False, preexec_fn=preexec_fn)


def register(config_path: Path) -> list[str]:
    """Detect and register what is staged, without publishing (across filesystems a FITS
    file's headers are read, the data are left to the publish's copy)."""
    cfg = config_mod.load(config_path)
    with Registry(cfg.registry) as registry:
        detector = detect.Detector(cfg, registry)
        detector.scan()
        out = detector.settle()
    return [o.data_id for o in out if o.action == "registered"]


def write_big_fits(path: Path, gib: int = 1) -> str:
    """A valid FITS image of `gib` GiB of noise, written chunk by chunk; returns its sha256."""
    height = PIXELS_1GIB * gib
    header = fits.Header([("SIMPLE", True), ("BITPIX", -32), ("NAXIS", 2),
                          ("NAXIS1", PIXELS_1GIB), ("NAXIS2", height),
                          ("OBJECT", f"BENCH_{gib}GIB"), ("BUNIT", "Jy/beam")])
    digest = hashlib.sha256()
    rng = np.random.default_rng(1)
    rows = 1024
    with open(path, "wb") as fh:
        head = header.tostring().encode("ascii")
        fh.write(head)
        digest.update(head)
        for _ in range(height // rows):
            block = rng.normal(0, 1e-4, size=(rows, PIXELS_1GIB)).astype(">f4").tobytes()
            fh.write(block)
            digest.update(block)
        pad = b"\0" * (-(PIXELS_1GIB * height * 4) % 2880)
        fh.write(pad)
        digest.update(pad)
        fh.flush()
        os.fsync(fh.fileno())
    return digest.hexdigest()


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(8 << 20):
            digest.update(chunk)
    return digest.hexdigest()


@contextlib.contextmanager
def mounted(kind: str, where: Path, scratch: Path) -> Iterator[Path]:
    where.mkdir(parents=True, exist_ok=True)
    image = scratch / "products.ext4"
    if kind == "tmpfs":
        subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2g,mode=0755", "tmpfs", str(where)],
                       check=True)
    else:
        subprocess.run(["truncate", "-s", "3G", str(image)], check=True)
        subprocess.run(["mkfs.ext4", "-q", "-F", str(image)], check=True)
        subprocess.run(["mount", "-o", "loop", str(image), str(where)], check=True)
    try:
        yield where
    finally:
        subprocess.run(["umount", str(where)], check=False)
        image.unlink(missing_ok=True)


def bench_big(workdir: Path, targets: list[str], repeat: int) -> list[tuple[str, str, str]]:
    """(a): rows of (what, figure, ratio) for the table."""
    if os.geteuid() != 0:
        print("(a) skipped: mounting the products filesystem needs root")
        return []
    rows: list[tuple[str, str, str]] = []
    scratch = Path(tempfile.mkdtemp(prefix="bench-big-", dir=workdir))
    try:
        pristine = scratch / "pristine.fits"
        t0 = time.monotonic()
        want = write_big_fits(pristine)
        size = pristine.stat().st_size
        print(f"(a) wrote {size / GIB:.3f} GiB test mosaic in {time.monotonic() - t0:.1f} s "
              f"on {fs_of(scratch)}")
        for target in targets:
            products = scratch / f"products-{target}"
            with mounted(target, products, scratch):
                cp_rates, pub_rates, in_rates = [], [], []
                for n in range(repeat):
                    # cp + sync of the same file, from the same (cached) source.
                    dest = products / "cp-copy.fits"
                    t0 = time.monotonic()
                    subprocess.run(["cp", str(pristine), str(dest)], check=True)
                    subprocess.run(["sync", str(dest)], check=True)
                    cp_s = time.monotonic() - t0
                    assert sha256_file(dest) == want
                    dest.unlink()
                    cp_rates.append(size / cp_s)

                    box = Sandbox(scratch / f"box-{target}-{n}", products_root=products,
                                  detect={"settle_seconds": 0}, log={"level": "warning"})
                    staged = box.mosaics / "big.fits"
                    os.link(pristine, staged)
                    t0 = time.monotonic()
                    (data_id,) = register(box.config_path)
                    reg_s = time.monotonic() - t0
                    t0 = time.monotonic()
                    out = cli(box.config_path, "publish", data_id)
                    pub_s = time.monotonic() - t0
                    assert out.returncode == 0, out.stderr[-2000:]
                    published = products / "mosaics" / "big.fits"
                    assert sha256_file(published) == want and not staged.exists()
                    published.unlink()
                    pub_rates.append(size / pub_s)
                    # What the daemon does: the same publish inside a running process.
                    box = Sandbox(scratch / f"box-{target}-{n}-in-process",
                                  products_root=products, detect={"settle_seconds": 0},
                                  log={"level": "warning"})
                    staged = box.mosaics / "big.fits"
                    os.link(pristine, staged)
                    (data_id,) = register(box.config_path)
                    in_s = publish_in_process(box.config_path, data_id)
                    assert sha256_file(published) == want and not staged.exists()
                    published.unlink()
                    in_rates.append(size / in_s)
                    print(f"(a) {target} run {n + 1}: cp+sync {cp_s:.2f} s, "
                          f"publish {pub_s:.2f} s as a command, {in_s:.2f} s in the daemon's "
                          f"process (registration: {reg_s:.2f} s)")
                paired = median([p / c for p, c in zip(pub_rates, cp_rates, strict=True)])
                rows.append((f"1 GiB across filesystems -> {target_label(target)}: "
                             "`cp` + `sync`", f"{median(cp_rates) / 2**20:,.0f} MiB/s", "1.00"))
                rows.append((f"1 GiB across filesystems -> {target_label(target)}: "
                             "`publish DATA_ID`", f"{median(pub_rates) / 2**20:,.0f} MiB/s",
                             f"{paired:.2f}"))
                paired_in = median([p / c for p, c in zip(in_rates, cp_rates, strict=True)])
                rows.append((f"1 GiB across filesystems -> {target_label(target)}: "
                             "publish inside the running daemon",
                             f"{median(in_rates) / 2**20:,.0f} MiB/s", f"{paired_in:.2f}"))
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return rows


def publish_in_process(config_path: Path, data_id: str) -> float:
    """Seconds for one Publisher.publish under the lock, as the daemon's worker runs it
    (no interpreter start, no imports)."""
    from contimg_publisher import config as config_mod
    from contimg_publisher import lock, publish
    from contimg_publisher.registry import Registry
    cfg = config_mod.load(config_path)
    owner = lock.owner_id()
    with lock.acquire(str(cfg.lock_path), "bench", wait_seconds=0), \
            Registry(cfg.registry, cfg.busy_timeout_seconds) as registry:
        [product] = registry.claim(owner, cfg.lease_seconds, data_id=data_id)
        t0 = time.monotonic()
        result = publish.Publisher(cfg, registry, owner, None).publish(product)
        seconds = time.monotonic() - t0
    assert result.status == "published", result
    return seconds


MB = 10**6
BLKIO = Path("/sys/fs/cgroup/blkio")
DIRTY_BYTES = 64 << 20  # the most the products disk may have dirty in the page cache


class Hdd:
    """The products filesystem at HDD speed: ext4 in a 10 GiB image on a loop device (by
    default with direct I/O to its backing file), writes to it limited to `mbps` MB/s with
    cgroup v1 blkio.throttle.write_bps_device, and a child cgroup that the measured commands
    run in (`enter` is their preexec_fn).

    cgroup v1 has no writeback attribution: pages that the kernel's flusher writes back are
    charged to the root cgroup, whatever process dirtied them; only what a process writes
    back itself (fsync, sync) is charged to its own cgroup. And v1 throttling is flat: a
    child's limit and the root's do not add up to one. So the same limit is set on the root
    cgroup for this device, and the device's dirty pages are capped (strict_limit, max_bytes
    of its bdi) so that writers are paced to its write-back and nearly all of it goes through
    the root's limit, as on a disk that takes `mbps` MB/s whoever writes."""

    def __init__(self, where: Path, scratch: Path, mbps: int, direct_io: str,
                 stack: contextlib.ExitStack) -> None:
        image = scratch / "products-hdd.ext4"
        run = subprocess.run
        run(["truncate", "-s", "10G", str(image)], check=True)
        stack.callback(image.unlink, missing_ok=True)
        run(["mkfs.ext4", "-q", "-F", "-E", "lazy_itable_init=0,lazy_journal_init=0",
             str(image)], check=True)
        loop = run(["losetup", "--find", "--show", f"--direct-io={direct_io}", str(image)],
                   check=True, capture_output=True, text=True).stdout.strip()
        stack.callback(run, ["losetup", "-d", loop], check=False)
        self.dev = Path(f"/sys/block/{Path(loop).name}/dev").read_text().strip()
        where.mkdir(parents=True, exist_ok=True)
        run(["mount", loop, str(where)], check=True)
        stack.callback(run, ["umount", str(where)], check=False)
        self.mount, self.mbps = where, mbps
        self.cgroup = BLKIO / f"contimg-bench-{os.getpid()}"
        self.cgroup.mkdir()
        stack.callback(self.cgroup.rmdir)
        for group in (self.cgroup, BLKIO):
            (group / "blkio.throttle.write_bps_device").write_text(f"{self.dev} {mbps * MB}")
        stack.callback((BLKIO / "blkio.throttle.write_bps_device").write_text,
                       f"{self.dev} 0")
        bdi = Path("/sys/class/bdi") / self.dev
        for knob in ("max_ratio_fine", "strict_limit"):
            stack.callback((bdi / knob).write_text, (bdi / knob).read_text())
        (bdi / "strict_limit").write_text("1")
        (bdi / "max_bytes").write_text(str(DIRTY_BYTES))

    def enter(self) -> None:
        """In a child, before exec: join the benchmark's cgroup."""
        (self.cgroup / "cgroup.procs").write_text(str(os.getpid()))

    def written(self) -> tuple[int, int]:
        """Bytes written to the device so far: charged to the benchmark's cgroup, to root."""
        return (blkio_written(self.cgroup, self.dev), blkio_written(BLKIO, self.dev))


def blkio_written(group: Path, dev: str) -> int:
    for line in (group / "blkio.throttle.io_service_bytes").read_text().splitlines():
        if line.startswith(f"{dev} Write "):
            return int(line.split()[2])
    return 0


def drop_caches() -> None:
    os.sync()
    Path("/proc/sys/vm/drop_caches").write_text("3")


def cp_sync(hdd: Hdd, source: Path) -> float:
    """Seconds for `cp` then `sync` of the copy, both in the throttled cgroup, from cold."""
    dest = hdd.mount / "cp-copy.fits"
    drop_caches()
    t0 = time.monotonic()
    subprocess.run(["cp", str(source), str(dest)], check=True, preexec_fn=hdd.enter)
    subprocess.run(["sync", str(dest)], check=True, preexec_fn=hdd.enter)
    seconds = time.monotonic() - t0
    assert dest.stat().st_size == source.stat().st_size
    dest.unlink()
    return seconds


def bench_hdd(workdir: Path, sizes: list[int], repeat: int, mbps: int, direct_io: str
              ) -> list[tuple[str, str, str]]:
    """(c): rows of (what, figure, ratio) for the table."""
    if os.geteuid() != 0:
        print("(c) skipped: the loop device, the mount and the cgroup need root")
        return []
    rows: list[tuple[str, str, str]] = []
    scratch = Path(tempfile.mkdtemp(prefix="bench-hdd-", dir=workdir))
    try:
        with contextlib.ExitStack() as stack:
            hdd = Hdd(scratch / "products", scratch, mbps, direct_io, stack)
            print(f"(c) products: ext4 on a loop device {hdd.dev} (direct I/O {direct_io}), "
                  f"writes limited to {mbps} MB/s; staging on {fs_of(scratch)}; page cache "
                  "dropped before every timed command")
            for gib in sizes:
                rows += bench_hdd_size(hdd, scratch, gib, repeat)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return rows


def bench_hdd_size(hdd: Hdd, scratch: Path, gib: int, repeat: int
                   ) -> list[tuple[str, str, str]]:
    pristine = scratch / f"pristine-{gib}.fits"
    want = write_big_fits(pristine, gib)
    size = pristine.stat().st_size
    published = hdd.mount / "mosaics" / "big.fits"
    cp_rates, scan_ratios, pub_ratios, scan_rates, pub_rates = [], [], [], [], []
    for n in range(repeat):
        before = hdd.written()
        # Settled to published: a fresh `scan` (registration reads the headers, then the
        # publish reads the file once as it copies), against cp + sync just before.
        cp1_s = cp_sync(hdd, pristine)
        box = Sandbox(scratch / f"scan-{gib}-{n}", products_root=hdd.mount,
                      detect={"settle_seconds": 0}, log={"level": "warning"})
        staged = box.mosaics / "big.fits"
        os.link(pristine, staged)
        drop_caches()
        t0 = time.monotonic()
        out = cli(box.config_path, "scan", preexec_fn=hdd.enter)
        scan_s = time.monotonic() - t0
        assert out.returncode == 0 and " 1 published" in out.stdout, out.stdout + out.stderr
        assert sha256_file(published) == want and not staged.exists()
        published.unlink()
        # The publish alone, after registration, against cp + sync just before.
        box = Sandbox(scratch / f"publish-{gib}-{n}", products_root=hdd.mount,
                      detect={"settle_seconds": 0}, log={"level": "warning"})
        staged = box.mosaics / "big.fits"
        os.link(pristine, staged)
        (data_id,) = register(box.config_path)
        cp2_s = cp_sync(hdd, pristine)
        drop_caches()
        t0 = time.monotonic()
        out = cli(box.config_path, "publish", data_id, preexec_fn=hdd.enter)
        pub_s = time.monotonic() - t0
        assert out.returncode == 0, out.stderr[-2000:]
        assert sha256_file(published) == want and not staged.exists()
        published.unlink()
        mine, root = (after - b for after, b in zip(hdd.written(), before, strict=True))
        cp_rates += [size / cp1_s, size / cp2_s]
        scan_rates.append(size / scan_s)
        pub_rates.append(size / pub_s)
        scan_ratios.append(cp1_s / scan_s)
        pub_ratios.append(cp2_s / pub_s)
        print(f"(c) {gib} GiB run {n + 1}: cp+sync {cp1_s:.2f} s, scan {scan_s:.2f} s "
              f"(ratio {cp1_s / scan_s:.2f}); cp+sync {cp2_s:.2f} s, publish {pub_s:.2f} s "
              f"(ratio {cp2_s / pub_s:.2f}); the four copies wrote {(mine + root) / MB:,.0f} MB "
              f"to the device, {mine / MB:,.0f} MB of it charged to the commands' cgroup, the "
              f"rest to the root cgroup (the kernel's flusher); load {os.getloadavg()[0]:.1f}")
    pristine.unlink()
    cp_median = median(cp_rates) / MB
    print(f"(c) {gib} GiB: cp+sync median {cp_median:.0f} MB/s, "
          f"{cp_median / hdd.mbps:.0%} of the {hdd.mbps} MB/s limit")
    what = f"{gib} GiB -> ext4 at {hdd.mbps} MB/s:"
    return [(f"{what} `cp` + `sync`", f"{cp_median:,.0f} MB/s", "1.00"),
            (f"{what} `scan`, settled -> published (registration + publish)",
             f"{median(scan_rates) / MB:,.0f} MB/s", f"{median(scan_ratios):.2f}"),
            (f"{what} `publish DATA_ID` after registration",
             f"{median(pub_rates) / MB:,.0f} MB/s", f"{median(pub_ratios):.2f}")]


def print_table(rows: list[tuple[str, str, str]], ratio_heading: str) -> None:
    """The benchmark's rows as a Markdown table (docs/benchmarks.md takes them as printed)."""
    print(f"| Benchmark | Throughput | {ratio_heading} |")
    print("|---|---:|---:|")
    for what, figure, ratio in rows:
        print(f"| {what} | {figure} | {ratio} |")


def median(values: list[float]) -> float:
    ordered = sorted(values)
    middle = len(ordered) // 2
    return ordered[middle] if len(ordered) % 2 else (ordered[middle - 1] + ordered[middle]) / 2


def target_label(kind: str) -> str:
    return "tmpfs" if kind == "tmpfs" else "ext4 on a loop device"


def fs_of(path: Path) -> str:
    out = subprocess.run(["df", "--output=source,fstype", str(path)], capture_output=True,
                         text=True, check=False).stdout.split("\n")[1].split()
    return " ".join(out)


def small_mosaic(seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    hdu = fits.PrimaryHDU(rng.normal(0, 1e-4, size=(128, 128)).astype(np.float32))
    hdu.header["OBJECT"] = f"MOSAIC{seed}"
    hdu.header["NIMAGES"] = 10
    buf = io.BytesIO()
    hdu.writeto(buf, checksum=True)
    return buf.getvalue()


def stage_small(folder: Path, count: int) -> list[Path]:
    old = time.time() - 60
    out = []
    for i in range(count):
        path = folder / f"night{i % 10}" / f"mosaic_{i:04d}.fits"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(small_mosaic(i))
        os.utime(path, (old, old))
        out.append(path)
    os.sync()
    return out


def legacy_publish(files: list[Path], stage_base: Path, dest_base: Path, db_path: Path) -> None:
    """The older pattern: Python sqlite3 in autocommit, one commit per row, shutil.move."""
    db = sqlite3.connect(db_path, isolation_level=None)
    db.executescript(LEGACY_DDL)
    for path in files:
        rel = path.relative_to(stage_base)
        target = dest_base / rel
        now = time.time()
        db.execute("INSERT INTO data_registry (data_type, data_id, base_path, status,"
                   " stage_path, published_path, created_at, staged_at, published_at,"
                   " publish_mode) VALUES ('mosaic', ?, ?, 'published', ?, ?, ?, ?, ?, 'auto')",
                   (str(rel.with_suffix("")), str(stage_base), str(path), str(target), now, now,
                    now))
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(path, target)
    db.close()


PHASES_CHILD = """
import json, sys, time
t0 = time.monotonic()
from contimg_publisher import cli, content, service  # noqa: F401 (service: its imports)
imports = time.monotonic() - t0
describe = 0.0
plain = content.describe_file
def timed(*args, **kwargs):
    global describe
    t = time.monotonic()
    try:
        return plain(*args, **kwargs)
    finally:
        describe += time.monotonic() - t
content.describe_file = timed
t1 = time.monotonic()
code = cli.main(["--config", sys.argv[1], "scan"])
scan = time.monotonic() - t1
print(json.dumps({"imports": imports, "scan": scan, "describe": describe}), file=sys.stderr)
sys.exit(code)
"""


def scan_with_phases(config_path: Path) -> subprocess.CompletedProcess[str]:
    """What `scan` does, in a fresh interpreter that times its imports, the pass, and the time
    spent in content.describe_file (reading, validating and hashing each file: the one part
    that could run in other processes). Its last line of stderr is the times, as JSON."""
    return subprocess.run([sys.executable, "-c", PHASES_CHILD, str(config_path)],
                          capture_output=True, text=True, env=child_env(), cwd=REPO,
                          check=False)


def bench_small(workdir: Path, count: int, repeat: int, phases: bool = False
                ) -> list[tuple[str, str, str]]:
    """(b): rows of (what, figure, ratio) for the table. With `phases`, `scan` also reports
    where its time went (see scan_with_phases)."""
    scratch = Path(tempfile.mkdtemp(prefix="bench-small-", dir=workdir))
    legacy_rates, scan_rates = [], []
    try:
        print(f"(b) {count} mosaics of {len(small_mosaic(0)):,} bytes, staging and products "
              f"on {fs_of(scratch)}")
        for n in range(repeat):
            legacy = scratch / f"legacy-{n}"
            files = stage_small(legacy / "stage" / "mosaics", count)
            t0 = time.monotonic()
            legacy_publish(files, legacy / "stage" / "mosaics", legacy / "products" / "mosaics",
                           legacy / "registry.sqlite3")
            legacy_s = time.monotonic() - t0
            assert len(list((legacy / "products").rglob("*.fits"))) == count

            box = Sandbox(scratch / f"scan-{n}", detect={"settle_seconds": 0},
                          log={"level": "info"})
            stage_small(box.mosaics, count)
            t0 = time.monotonic()
            out = (scan_with_phases(box.config_path) if phases
                   else cli(box.config_path, "scan"))
            scan_s = time.monotonic() - t0
            assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
            assert f"{count} published" in out.stdout, out.stdout[-500:]
            assert len(list((box.products / "mosaics").rglob("*.fits"))) == count
            assert not list(box.mosaics.rglob("*.fits"))
            legacy_rates.append(count / legacy_s)
            scan_rates.append(count / scan_s)
            print(f"(b) run {n + 1}: legacy {legacy_s:.2f} s ({count / legacy_s:,.0f}/s), "
                  f"scan {scan_s:.2f} s ({count / scan_s:,.0f}/s)")
            if phases:
                times = json.loads(out.stderr.strip().splitlines()[-1])
                serial = scan_s - times["describe"]
                print(f"    phases: imports {times['imports']:.2f} s, scan command "
                      f"{times['scan']:.2f} s, of which reading, validating and hashing "
                      f"{times['describe']:.2f} s; everything else {serial:.2f} s against "
                      f"{legacy_s / 3:.2f} s for 3x the legacy pattern")
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    paired = median([s / legacy for s, legacy in zip(scan_rates, legacy_rates, strict=True)])
    return [(f"{count:,} small mosaics, same filesystem: legacy sqlite3 autocommit + "
             "shutil.move", f"{median(legacy_rates):,.0f} products/s", "1.00"),
            (f"{count:,} small mosaics, same filesystem: `scan` (validated, hashed, durable)",
             f"{median(scan_rates):,.0f} products/s", f"{paired:.2f}")]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--only", choices=("a", "b", "c"))
    parser.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()),
                        help="where staging lives (a disk, not a tmpfs); default: the temp dir")
    parser.add_argument("--targets", default="tmpfs,ext4",
                        help="products filesystems for (a): tmpfs, ext4 (loop image)")
    parser.add_argument("--count", type=int, default=2000)
    parser.add_argument("--sizes", default="1,4", help="(c): mosaic sizes in GiB")
    parser.add_argument("--hdd-mbps", type=int, default=150,
                        help="(c): write limit of the products disk, MB/s")
    parser.add_argument("--loop-direct-io", choices=("on", "off"), default="on",
                        help="(c): the loop device's I/O to its backing file")
    parser.add_argument("--phases", action="store_true",
                        help="(b): also say where scan's time went, timed inside its process")
    parser.add_argument("--repeat", type=int, default=3,
                        help="paired runs of each (baseline, then ours); medians are shown, "
                             "the ratio is the median of the per-run ratios")
    args = parser.parse_args()
    rows = []
    if args.only in (None, "a"):
        rows += bench_big(args.workdir, args.targets.split(","), args.repeat)
    if args.only in (None, "b"):
        rows += bench_small(args.workdir, args.count, args.repeat, args.phases)
    if args.only in (None, "c"):
        rows += bench_hdd(args.workdir, [int(g) for g in args.sizes.split(",")], args.repeat,
                          args.hdd_mbps, args.loop_direct_io)
    print()
    print(f"Medians of {args.repeat} paired runs; ratio: median of the per-run ratios.\n")
    print_table(rows, "Ratio to baseline")
    return 0


if __name__ == "__main__":
    sys.exit(main())
