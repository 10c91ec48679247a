"""Several daemons on one PostgreSQL registry against one daemon on SQLite, in one run.

    python bench/bench_nodes.py [--claims N] [--products N] [--pixels N]   (as root)

1. claims/s: each worker process is one node's daemon, claiming its own node's rows one
   at a time and recording each as published (claim, then mark_published: two commits),
   until none is left; 1, 2 and 4 workers on PostgreSQL, 1 on SQLite.
2. products/s: real daemons (`run`), each with a staging folder of its own, registering
   and publishing real FITS files into one products folder; from every daemon's `started`
   to the last product's arrival; 1, 2 and 4 daemons on PostgreSQL, 1 on SQLite.

The server is a throw-away cluster (tests/pg.py) on a unix socket, fsync off (as in the
tests); SQLite keeps synchronous=FULL. Prints a Markdown table for the README.

`--only sqlite1,pg1` runs some of the rows (the target is PostgreSQL x1 against SQLite
x1, same run); `--no-claims` skips the claims/s half. With CONTIMG_BENCH_PROFILE=DIR every
daemon runs under cProfile, one profile per thread (bench/profiled.py), written to
DIR/<row>/ when it stops.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "daemon"))
sys.path.insert(0, str(REPO))

from tests import pg  # noqa: E402
from tests.helpers import PYTHON, Sandbox, fits_bytes, wait_for  # noqa: E402

from contimg_publisher.registry import Candidate, Identity, Published, open_registry  # noqa: E402


def candidate(node: int, n: int) -> Candidate:
    path = f"/stage/n{node}/mosaics/m_{node}_{n:07d}.fits"
    return Candidate(data_id=f"m_{node}_{n:07d}", data_type="mosaic", base_path="/stage",
                     stage_path=path, stage_path_bytes=os.fsencode(path),
                     identity=Identity(1, n, 1000 + n, n, n), checksum=f"sha256:{n:064x}",
                     metadata={"NIMAGES": 10})


def _claimer(target: str, node: int, start: Any, out: Any) -> None:
    reg = open_registry(target, 60.0, node=f"node-{node}")
    owner = f"bench:{os.getpid()}:{node}"
    done = 0
    start.wait()
    while rows := reg.claim(owner, 600):
        for row in rows:
            reg.mark_published(Published(row.data_id, f"/p/{row.data_id}.fits", "auto"),
                               owner, token=row.claim_token)
            done += 1
    reg.close()
    out.put(done)


def claims_per_second(target: str, workers: int, total: int) -> float:
    reg = open_registry(target, 60.0, node="setup")
    for w in range(workers):
        node_reg = open_registry(target, 60.0, node=f"node-{w}")
        with node_reg.write():
            for n in range(total // workers):
                node_reg.register(candidate(w, n))
        node_reg.close()
    reg.close()
    ctx = multiprocessing.get_context("fork")
    start, out = ctx.Event(), ctx.Queue()
    procs = [ctx.Process(target=_claimer, args=(target, w, start, out)) for w in range(workers)]
    for p in procs:
        p.start()
    time.sleep(1.0)
    t0 = time.perf_counter()
    start.set()
    done = sum(out.get() for _ in procs)
    elapsed = time.perf_counter() - t0
    for p in procs:
        p.join()
    assert done == (total // workers) * workers, done
    return done / elapsed


def _published_times(target: str) -> list[float]:
    reg = open_registry(target, 60.0, node="reader")
    times = sorted(p.published_at or 0.0 for p in reg.products(status="published"))
    reg.close()
    return times


ROWS = {"sqlite1": ("SQLite", 1), "pg1": ("PostgreSQL", 1), "pg2": ("PostgreSQL", 2),
        "pg4": ("PostgreSQL", 4)}


def start_daemon(box: Sandbox, profile: Path | None) -> subprocess.Popen[str]:
    """`run` on the sandbox, its log appended to daemon.log; under bench/profiled.py, a
    profile per thread into `profile`, when given."""
    env = {k: v for k, v in os.environ.items() if k not in ("NOTIFY_SOCKET", "WATCHDOG_USEC")}
    command = [PYTHON, "-m", "contimg_publisher"]
    if profile is not None:
        env["CONTIMG_BENCH_PROFILE"] = str(profile)
        command = [PYTHON, str(REPO / "bench" / "profiled.py")]
    log = open(box.root / "daemon.log", "a")  # noqa: SIM115 - closed with the process
    return subprocess.Popen([*command, "--config", str(box.config_path), "run"], cwd=REPO,
                            env=env, stdout=log, stderr=subprocess.STDOUT, text=True)


def products_per_second(top: Path, target: str | None, daemons: int, products: int,
                        pixels: int, profile: Path | None = None) -> float:
    shared = top / "products"
    boxes = []
    for d in range(daemons):
        root = top / f"d{d}"
        root.mkdir(parents=True)
        paths = {"lock_file": str(root / "publisher.lock")}
        if target is not None:
            paths["registry"] = target
        box = Sandbox(root, products_root=shared, paths=paths, node={"name": f"node-{d}"},
                      metrics={"enabled": False}, log={"level": "info"},
                      detect={"settle_seconds": 0.0, "rescan_seconds": 300})
        for n in range(products // daemons):
            path = box.mosaics / f"m_{d}_{n:05d}.fits"
            path.write_bytes(fits_bytes(pixels, seed=n))
            os.utime(path, (time.time() - 60, time.time() - 60))
        boxes.append(box)
    registry = target or str(boxes[0].registry)
    if target is None:
        assert daemons == 1
    procs = [start_daemon(box, profile) for box in boxes]
    want = (products // daemons) * daemons
    try:
        # Each daemon has walked its staging folder before it says `started`; registering
        # and publishing are timed from the moment every daemon has said it to the last
        # product's arrival in the products folder.
        wait_for(lambda: all('"event": "started"' in (box.root / "daemon.log").read_text()
                             for box in boxes), 120, interval=0.01, what="every daemon ready")
        t0 = time.perf_counter()
        wait_for(lambda: len(list(shared.rglob("*.fits"))) >= want, 600, interval=0.01,
                 what="every product published")
        elapsed = time.perf_counter() - t0
    finally:
        for p in procs:
            p.send_signal(signal.SIGTERM)
        for p in procs:
            p.wait(timeout=60)
    assert len(_published_times(registry)) == want
    return want / elapsed


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--claims", type=int, default=2000)
    parser.add_argument("--products", type=int, default=120)
    parser.add_argument("--pixels", type=int, default=256)
    parser.add_argument("--only", default=",".join(ROWS),
                        help=f"rows to run, comma-separated, of {', '.join(ROWS)}")
    parser.add_argument("--no-claims", action="store_true", help="products/s only")
    args = parser.parse_args()
    wanted = [ROWS[name] for name in args.only.split(",")]
    profiles = os.environ.get("CONTIMG_BENCH_PROFILE")
    reason = pg.unavailable()
    if reason is not None:
        print(f"cannot run: {reason}", file=sys.stderr)
        return 1
    template = pg.make_template()
    rows: list[tuple[str, int, float, float]] = []
    try:
        for backend, workers in wanted:
            top = Path(tempfile.mkdtemp(prefix="bench-nodes-"))
            server = None
            try:
                if backend == "PostgreSQL":
                    server = pg.Server(template)
                    server.start()
                    target: str = server.uri
                else:
                    target = str(top / "claims.sqlite3")
                claims = float("nan") if args.no_claims else \
                    claims_per_second(target, workers, args.claims)
                if server is not None and not args.no_claims:
                    server.remove()
                    server = pg.Server(template)
                    server.start()
                published = products_per_second(top / "daemons",
                                                server.uri if server else None, workers,
                                                args.products, args.pixels,
                                                Path(profiles) / f"{backend}{workers}"
                                                if profiles else None)
                rows.append((backend, workers, claims, published))
                print(f"{backend} x{workers}: {claims:.0f} claims/s, {published:.1f} "
                      "products/s", file=sys.stderr)
            finally:
                if server is not None:
                    server.remove()
                shutil.rmtree(top, ignore_errors=True)
    finally:
        shutil.rmtree(template.parent, ignore_errors=True)
    print(f"| registry | daemons | claims/s (claim + publish commit) | products/s "
          f"({args.products} mosaics of {args.pixels}x{args.pixels}) |")
    print("| --- | ---: | ---: | ---: |")
    for backend, workers, claims, published in rows:
        print(f"| {backend} | {workers} | {claims:.0f} | {published:.1f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
