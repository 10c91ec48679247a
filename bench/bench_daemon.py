"""The running daemon against the work it must match, side by side in one run.

(a) 1 GiB across filesystems onto an HDD-speed disk: `cp` + `sync` of the file onto ext4 on
    a loop device whose writes are limited to --hdd-mbps MB/s (bench_publish.Hdd: cgroup v1
    blkio throttling, dirty pages capped), against a running daemon (in the same cgroup)
    publishing the same file onto the same disk: the file is renamed into the staging area
    and timed from the rename + settle_seconds to the daemon's `published` event. Page
    cache dropped before each. Target: the median of the pairs' ratios >= 0.9.
    Where the time went comes from the daemon's own events: settle -> `registered`
    (detection), `registered` -> the publish's start, and the publish itself.
(b) Bursts (--bursts, default 5,000 and 20,000 small mosaics): drained by a running daemon
    against one `scan` of the same files (bench_backlog.bench_burst, pairs in alternating
    order). Target: the median of the pairs' ratios >= 0.8.

With CONTIMG_BENCH_PROFILE=DIR every daemon runs under cProfile, one profile per thread
(bench/profiled.py), written to DIR when it stops.

    .venv/bin/python bench/bench_daemon.py [--only a,b] [--repeat 3] [--rounds 3]
        [--bursts 5000,20000] [--hdd-mbps 150] [--settle 1.0] [--workdir DIR]
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "daemon"))

from bench.bench_backlog import bench_burst, daemon_command  # noqa: E402
from bench.bench_publish import (  # noqa: E402
    MB,
    Hdd,
    cp_sync,
    drop_caches,
    fs_of,
    median,
    print_table,
    sha256_file,
    write_big_fits,
)
from tests.helpers import Sandbox  # noqa: E402
from tests.test_service import NotifySocket  # noqa: E402


def events(box: Sandbox) -> list[dict[str, Any]]:
    out = []
    with contextlib.suppress(FileNotFoundError):
        for line in (box.root / "daemon.log").read_text().splitlines():
            with contextlib.suppress(ValueError):
                out.append(json.loads(line))
    return out


def wall(event: dict[str, Any]) -> float:
    return datetime.datetime.fromisoformat(event["timestamp"]).timestamp()


def wait_event(box: Sandbox, name: str, staged: Path, timeout: float) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for event in events(box):
            if event.get("event") == name and event.get("stage_path") == str(staged):
                return event
        time.sleep(0.05)
    raise AssertionError(f"no {name} event for {staged} in {timeout} s")


def start(box: Sandbox, notify: Path, hdd: Hdd) -> subprocess.Popen[str]:
    env = {k: v for k, v in os.environ.items() if k not in ("NOTIFY_SOCKET", "WATCHDOG_USEC")}
    env["NOTIFY_SOCKET"] = str(notify)
    log = open(box.root / "daemon.log", "a")  # noqa: SIM115 - closed with the process
    return subprocess.Popen(daemon_command(box), cwd=REPO, env=env, stdout=log,
                            stderr=subprocess.STDOUT, text=True, preexec_fn=hdd.enter)


def bench_hdd_daemon(workdir: Path, repeat: int, mbps: int, settle: float
                     ) -> list[tuple[str, str, str]]:
    if os.geteuid() != 0:
        print("(a) skipped: the loop device, the mount and the cgroup need root")
        return []
    scratch = Path(tempfile.mkdtemp(prefix="bench-daemon-hdd-", dir=workdir))
    try:
        with contextlib.ExitStack() as stack:
            hdd = Hdd(scratch / "products", scratch, mbps, "on", stack)
            print(f"(a) products: ext4 on {hdd.dev}, writes limited to {mbps} MB/s; staging "
                  f"on {fs_of(scratch)}; settle {settle:g} s; page cache dropped before each")
            pristine = scratch / "pristine.fits"
            want = write_big_fits(pristine)
            size = pristine.stat().st_size
            box = Sandbox(scratch / "daemon", products_root=hdd.mount,
                          detect={"settle_seconds": settle, "rescan_seconds": 3600},
                          log={"format": "json", "level": "info"}, metrics={"enabled": False})
            incoming = box.stage / "incoming"
            incoming.mkdir()
            notify = NotifySocket(scratch / "notify.sock")
            stack.callback(notify.close)
            proc = start(box, notify.path, hdd)
            try:
                notify.wait("READY", "1", timeout=120)
                ratios, cp_rates, d_rates = [], [], []
                for n in range(repeat):
                    cp_s = cp_sync(hdd, pristine)
                    name = f"big{n}.fits"
                    os.link(pristine, incoming / name)
                    drop_caches()
                    t0 = time.time()
                    os.rename(incoming / name, box.mosaics / name)
                    done = wait_event(box, "published", box.mosaics / name, timeout=600)
                    reg = wait_event(box, "registered", box.mosaics / name, timeout=1)
                    d_s = wall(done) - t0 - settle
                    start_publish = wall(done) - float(done["seconds"])
                    published = hdd.mount / "mosaics" / name
                    assert sha256_file(published) == want
                    published.unlink()
                    ratios.append(cp_s / d_s)
                    cp_rates.append(size / cp_s)
                    d_rates.append(size / d_s)
                    print(f"(a) run {n + 1}: cp+sync {cp_s:.2f} s; daemon {d_s:.2f} s from "
                          f"rename + settle to published (ratio {cp_s / d_s:.2f}): detection "
                          f"{wall(reg) - t0 - settle:.3f} s, registered -> publish start "
                          f"{start_publish - wall(reg):.3f} s, publish {done['seconds']:.2f} s; "
                          f"load {os.getloadavg()[0]:.1f}", flush=True)
            finally:
                proc.terminate()
                proc.wait(timeout=60)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    what = f"1 GiB across filesystems -> ext4 at {mbps} MB/s:"
    return [(f"{what} `cp` + `sync`", f"{median(cp_rates) / MB:,.0f} MB/s", "1.00"),
            (f"{what} running daemon, rename + settle -> `published`",
             f"{median(d_rates) / MB:,.0f} MB/s", f"{median(ratios):.2f} "
             f"({', '.join(f'{r:.2f}' for r in ratios)})")]


def bench_bursts(workdir: Path, counts: list[int], rounds: int, settle: float
                 ) -> list[tuple[str, str, str]]:
    rows = []
    for count in counts:
        with tempfile.TemporaryDirectory(dir=workdir, prefix="bench-daemon-burst-") as tmp:
            print(f"(b) burst of {count:,} mosaics, {rounds} pairs ...", flush=True)
            b = bench_burst(Path(tmp), count, settle, rounds)
        each = ", ".join(f"{p['ratio']:.2f}" for p in b["pairs"])
        rows.append((f"burst of {count:,} small mosaics: one `scan`",
                     f"{b['scan_rate']:,.0f} products/s", "1.00"))
        rows.append((f"burst of {count:,} small mosaics: running daemon",
                     f"{b['daemon_rate']:,.0f} products/s", f"{b['ratio']:.2f} ({each})"))
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", default="a,b")
    parser.add_argument("--repeat", type=int, default=3, help="(a): cp/daemon pairs")
    parser.add_argument("--rounds", type=int, default=3, help="(b): scan/daemon pairs")
    parser.add_argument("--bursts", default="5000,20000")
    parser.add_argument("--hdd-mbps", type=int, default=150)
    parser.add_argument("--settle", type=float, default=1.0)
    parser.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()),
                        help="where staging lives (a disk, not a tmpfs)")
    args = parser.parse_args()
    only = set(args.only.split(","))
    rows = []
    if "a" in only:
        rows += bench_hdd_daemon(args.workdir, args.repeat, args.hdd_mbps, args.settle)
    if "b" in only:
        rows += bench_bursts(args.workdir, [int(c) for c in args.bursts.split(",")],
                             args.rounds, args.settle)
    print()
    print_table(rows, "Ratio to baseline (median; each pair)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
