"""Detection benchmark: the daemon as a real process on real files.

1. Latency from the last write closed to the row registered, for mosaics written at a steady
   rate (targets: p50 <= settle + 0.25 s, p99 <= settle + 1 s).
2. Start-up scan of staged files that are already registered (target < 10 s), beside
   `find | wc -l` over the same tree as the baseline.
3. CPU of the idle daemon watching staged files (target < 1 % of a core), from /proc/PID/stat.
4. Peak resident memory (VmHWM) of the daemon in each run (target < 200 MB).

Prints a Markdown table for the README. Usage:

    .venv/bin/python bench/bench_detect.py [--mosaics 1000] [--rate 20] [--settle 1.0]
        [--scan-files 100000] [--idle-files 10000] [--idle-seconds 60] [--workdir DIR]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "daemon"))

from tests.helpers import Sandbox, fits_bytes  # noqa: E402
from tests.test_service import NotifySocket, start_daemon, stop  # noqa: E402

from contimg_publisher.registry import Candidate, Identity, Registry  # noqa: E402

TICKS = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """utime + stime of every thread of the process, from /proc/PID/stat."""
    with open(f"/proc/{pid}/stat") as fh:
        fields = fh.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS


def vm_hwm_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as fh:
        for line in fh:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * len(ordered) + 0.5) - 1))]


def new_sandbox(root: Path, settle: float) -> Sandbox:
    return Sandbox(root, detect={"settle_seconds": settle, "rescan_seconds": 3600},
                   log={"format": "json", "level": "info"}, metrics={"enabled": False})


def wait_ready(notify: NotifySocket, timeout: float) -> float:
    t, _msg = notify.wait("READY", "1", timeout=timeout)
    return t


# --- 1. latency ------------------------------------------------------------------------------

def bench_latency(root: Path, count: int, rate: float, settle: float) -> dict[str, float]:
    sandbox = new_sandbox(root, settle)
    notify = NotifySocket(root / "notify.sock")
    data = fits_bytes(pixels=128, seed=1)
    closed: dict[bytes, float] = {}
    proc = start_daemon(sandbox, notify.path)
    try:
        wait_ready(notify, 60)
        folder = sandbox.mosaics / "latency"
        folder.mkdir()
        start = time.time()
        half = len(data) // 2
        for i in range(count):
            at = start + i / rate
            time.sleep(max(0.0, at - time.time()))
            path = folder / f"m{i:05}.fits"
            # Two writes with a pause, as the pipeline writes in place.
            with open(path, "wb") as fh:
                fh.write(data[:half])
                fh.flush()
            with open(path, "ab") as fh:
                fh.write(data[half:])
            closed[os.fsencode(path)] = time.time()
        deadline = time.time() + settle + 120
        with Registry(sandbox.registry) as reg:
            while time.time() < deadline:
                done = {r.stage_bytes: r.created_at for r in reg.products()}
                if all(p in done for p in closed):
                    break
                time.sleep(0.5)
        hwm = vm_hwm_mb(proc.pid)
    finally:
        stop(proc)
        notify.close()
    missing = [p for p in closed if p not in done]
    latencies = [done[p] - t for p, t in closed.items() if p in done]
    return {"n": len(latencies), "missing": len(missing),
            "p50": statistics.median(latencies), "p99": percentile(latencies, 99),
            "min": min(latencies), "max": max(latencies), "hwm": hwm}


# --- staged, registered trees ----------------------------------------------------------------

def stage_registered(sandbox: Sandbox, count: int, hold: bool) -> None:
    """`count` small FITS files in staging, registered as they are (status staging)."""
    data = fits_bytes(pixels=4, seed=2)
    cands = []
    for i in range(count):
        folder = sandbox.mosaics / f"d{i // 1000:03}"
        if i % 1000 == 0:
            folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"m{i:06}.fits"
        path.write_bytes(data)
        st = path.stat()
        cands.append(Candidate(f"d{i // 1000:03}/m{i:06}", "mosaic", str(sandbox.stage),
                               str(path), os.fsencode(path),
                               Identity(st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns,
                                        st.st_ctime_ns), "sha256:" + "0" * 64, {}))
    with Registry(sandbox.registry) as reg:
        reg.migrate()
        for at in range(0, len(cands), 5000):
            with reg.write():
                for c in cands[at:at + 5000]:
                    reg.register(c)
        if hold:
            for cand in cands:
                reg.set_hold(cand.data_id, True)


def rescan_seconds(sandbox: Sandbox) -> float | None:
    import json
    for line in (sandbox.root / "daemon.log").read_text().splitlines():
        try:
            event = json.loads(line)
        except ValueError:
            continue
        if event.get("event") == "rescan":
            return float(event["seconds"])
    return None


def find_seconds(folder: Path, expected: int) -> float:
    """The baseline walk: `find -type f | wc -l` over a synced folder, checked to see all."""
    subprocess.run(["sync"], check=False)
    t0 = time.monotonic()
    out = subprocess.run(f"find {folder} -type f | wc -l", shell=True, check=True,
                         capture_output=True, text=True)
    took = time.monotonic() - t0
    assert int(out.stdout) == expected, out.stdout
    return took


# --- 2. start-up scan ------------------------------------------------------------------------

def bench_startup(root: Path, count: int) -> dict[str, float]:
    sandbox = new_sandbox(root, 2.0)
    stage_registered(sandbox, count, hold=False)
    find_s = find_seconds(sandbox.stage, count)
    notify = NotifySocket(root / "notify.sock")
    t0 = time.monotonic()
    proc = start_daemon(sandbox, notify.path)
    try:
        ready = wait_ready(notify, 300) - t0
        hwm = vm_hwm_mb(proc.pid)
    finally:
        stop(proc)
        notify.close()
    return {"files": count, "find": find_s, "ready": ready, "scan": rescan_seconds(sandbox) or
            float("nan"), "hwm": hwm}


# --- 3. idle CPU -----------------------------------------------------------------------------

def bench_idle(root: Path, count: int, seconds: float) -> dict[str, float]:
    sandbox = new_sandbox(root, 2.0)
    stage_registered(sandbox, count, hold=True)
    notify = NotifySocket(root / "notify.sock")
    proc = start_daemon(sandbox, notify.path)
    try:
        wait_ready(notify, 300)
        time.sleep(2.0)   # let start-up work finish
        c0, t0 = cpu_seconds(proc.pid), time.monotonic()
        time.sleep(seconds)
        c1, t1 = cpu_seconds(proc.pid), time.monotonic()
        hwm = vm_hwm_mb(proc.pid)
    finally:
        stop(proc)
        notify.close()
    return {"files": count, "seconds": t1 - t0, "cpu": 100 * (c1 - c0) / (t1 - t0), "hwm": hwm}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mosaics", type=int, default=1000)
    parser.add_argument("--rate", type=float, default=20.0, help="mosaics per second")
    parser.add_argument("--settle", type=float, default=1.0)
    parser.add_argument("--scan-files", type=int, default=100_000)
    parser.add_argument("--idle-files", type=int, default=10_000)
    parser.add_argument("--idle-seconds", type=float, default=60.0)
    parser.add_argument("--workdir", type=Path, default=None)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(dir=args.workdir, prefix="bench-detect-") as tmp:
        base = Path(tmp)
        for name in ("latency", "startup", "idle"):
            (base / name).mkdir()
        print(f"latency: {args.mosaics} mosaics at {args.rate:g}/s, settle "
              f"{args.settle:g} s ...", flush=True)
        lat = bench_latency(base / "latency", args.mosaics, args.rate, args.settle)
        print(f"  {lat}", flush=True)
        print(f"start-up scan: {args.scan_files} registered staged files ...", flush=True)
        scan = bench_startup(base / "startup", args.scan_files)
        print(f"  {scan}", flush=True)
        print(f"idle: {args.idle_files} staged files for {args.idle_seconds:g} s ...",
              flush=True)
        idle = bench_idle(base / "idle", args.idle_files, args.idle_seconds)
        print(f"  {idle}", flush=True)
    s = args.settle
    ok = {True: "yes", False: "**no**"}
    print()
    print("| Measure | Result | Target | Met | Baseline / ratio |")
    print("|---|---|---|---|---|")
    print(f"| Detection latency p50 ({lat['n']} mosaics at {args.rate:g}/s, settle {s:g} s) "
          f"| {lat['p50']:.3f} s | <= {s + 0.25:.2f} s | {ok[lat['p50'] <= s + 0.25]} "
          f"| settle {s:g} s; p50 - settle = {lat['p50'] - s:.3f} s |")
    print(f"| Detection latency p99 | {lat['p99']:.3f} s | <= {s + 1:.2f} s "
          f"| {ok[lat['p99'] <= s + 1]} | max {lat['max']:.3f} s, missing {lat['missing']} |")
    print(f"| Start-up scan, {scan['files']:,} registered staged files "
          f"| {scan['scan']:.2f} s (READY after {scan['ready']:.2f} s) | < 10 s "
          f"| {ok[scan['scan'] < 10 and scan['ready'] < 10]} "
          f"| `find \\| wc -l` {scan['find']:.2f} s; ratio {scan['scan'] / scan['find']:.1f}x |")
    print(f"| Idle CPU, {idle['files']:,} staged files, {idle['seconds']:.0f} s "
          f"| {idle['cpu']:.2f} % of a core | < 1 % | {ok[idle['cpu'] < 1]} | |")
    print(f"| Peak RSS (VmHWM): latency / start-up / idle "
          f"| {lat['hwm']:.0f} / {scan['hwm']:.0f} / {idle['hwm']:.0f} MB | < 200 MB "
          f"| {ok[max(lat['hwm'], scan['hwm'], idle['hwm']) < 200]} | |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
