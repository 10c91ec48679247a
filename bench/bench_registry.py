"""Registry throughput and query latency, side by side with the legacy access pattern.

    python bench/bench_registry.py [--products N] [--rounds N] [--rows N] [--dir FOLDER]

1. Registration and claim throughput on real files in one folder: the registry module
   (register and claim in batches, one BEGIN IMMEDIATE transaction per batch) against
   the legacy pattern (Python sqlite3, one autocommitted statement per product), both with
   synchronous=FULL.
2. A registry of one million rows: wall time of the `status` and `list --status failed`
   commands (whole process, median of 3), with the bare `sqlite3` shell running the
   equivalent queries and a Python start-up as baselines.

Prints a Markdown table ready for the README.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "daemon"))

from contimg_publisher.registry import (  # noqa: E402
    SCHEMA_VERSION,
    Candidate,
    Identity,
    Registry,
)

LEGACY_INSERT = (
    "INSERT INTO data_registry (data_type, data_id, base_path, status, stage_path, created_at,"
    " staged_at, metadata_json, auto_publish_enabled, publish_attempts)"
    " VALUES (?, ?, ?, 'staging', ?, ?, ?, ?, 1, 0)")


def candidate(n: int) -> Candidate:
    path = f"/stage/dsa110-contimg/mosaics/2026/11/mosaic_{n:07d}.fits"
    return Candidate(data_id=f"mosaic_{n:07d}", data_type="mosaic",
                     base_path="/stage/dsa110-contimg", stage_path=path,
                     stage_path_bytes=os.fsencode(path),
                     identity=Identity(2049, 100_000 + n, 400_000_000 + n, n, n),
                     checksum=f"sha256:{n:064x}",
                     metadata={"NIMAGES": 10, "MEDRMS": 1.2e-4, "OBJECT": f"field{n % 97}"})


def bench_registry(folder: Path, n: int, batch: int) -> tuple[float, float, float, float]:
    """products/s for (register batched, claim batched, register one by one, claim one by one)."""
    cands = [candidate(i) for i in range(n)]
    path = folder / "ours.sqlite3"
    with Registry(path) as reg:
        t0 = time.perf_counter()
        for i in range(0, n, batch):
            with reg.write():
                for c in cands[i:i + batch]:
                    reg.register(c)
        register = n / (time.perf_counter() - t0)
        t0 = time.perf_counter()
        claimed = 0
        while rows := reg.claim("bench", 600, limit=batch):
            claimed += len(rows)
        claim = claimed / (time.perf_counter() - t0)
        assert claimed == n, claimed
    single = folder / "ours-single.sqlite3"
    with Registry(single) as reg:
        t0 = time.perf_counter()
        for c in cands:
            reg.register(c)
        register_one = n / (time.perf_counter() - t0)
        t0 = time.perf_counter()
        claimed = 0
        while reg.claim("bench", 600, limit=1):
            claimed += 1
        claim_one = claimed / (time.perf_counter() - t0)
        assert claimed == n, claimed
    return register, claim, register_one, claim_one


def bench_legacy(folder: Path, n: int) -> tuple[float, float]:
    """The older code's pattern: autocommit, one INSERT per product; claiming is a SELECT of
    one staging row and an UPDATE of it, each its own implicit transaction."""
    from contimg_publisher.registry import LEGACY_DDL

    cands = [candidate(i) for i in range(n)]
    db = sqlite3.connect(folder / "legacy.sqlite3", isolation_level=None)
    db.execute("PRAGMA synchronous=FULL")
    db.executescript(LEGACY_DDL)
    t0 = time.perf_counter()
    for c in cands:
        now = time.time()
        db.execute(LEGACY_INSERT, (c.data_type, c.data_id, c.base_path, c.stage_path, now, now,
                                   '{"NIMAGES": 10}'))
    register = n / (time.perf_counter() - t0)
    t0 = time.perf_counter()
    claimed = 0
    while True:
        row = db.execute("SELECT id FROM data_registry WHERE status = 'staging'"
                         " ORDER BY staged_at LIMIT 1").fetchone()
        if row is None:
            break
        db.execute("UPDATE data_registry SET status = 'publishing' WHERE id = ?", row)
        claimed += 1
    claim = claimed / (time.perf_counter() - t0)
    assert claimed == n, claimed
    db.close()
    return register, claim


def status_for(i: int) -> str:
    k = i % 1000
    if k < 970:
        return "published"
    if k < 985:
        return "staging"
    if k < 990:
        return "failed"
    if k < 995:
        return "rejected"
    return "publishing"


def build_million(path: Path, rows: int) -> float:
    """A registry of `rows` products (and a failure history) written in one transaction."""
    now = time.time()
    t0 = time.perf_counter()
    with Registry(path) as reg:
        assert reg.version() == SCHEMA_VERSION

        def products():
            for i in range(rows):
                status = status_for(i)
                staged = now - (rows - i) * 30.0
                stage = f"/stage/dsa110-contimg/mosaics/2026/mosaic_{i:07d}.fits"
                published = status == "published"
                yield ("mosaic" if i % 10 else "image", f"mosaic_{i:07d}",
                       "/stage/dsa110-contimg", status, stage,
                       f"/data/products/mosaics/2026/mosaic_{i:07d}.fits" if published else None,
                       staged, staged, staged + 20.0 if published else None,
                       "auto" if published else None, '{"NIMAGES": 10}', '{"NIMAGES": 10}',
                       3 if status == "failed" else 0,
                       "OSError: [Errno 28] No space left on device"
                       if status == "failed" else None,
                       400_000_000 + i, f"sha256:{i:064x}", 100_000 + i, staged + 20.0)

        def failures():
            for i in range(rows):
                if status_for(i) == "failed":
                    staged = now - (rows - i) * 30.0
                    for attempt in (1, 2, 3):
                        yield (f"mosaic_{i:07d}", attempt, "no_space",
                               "OSError: [Errno 28] No space left on device",
                               staged + attempt * 60.0, "host", 1234)

        with reg.write() as cur:
            cur.executemany(
                "INSERT INTO data_registry (data_type, data_id, base_path, status, stage_path,"
                " published_path, created_at, staged_at, published_at, publish_mode,"
                " metadata_json, header_json, publish_attempts, publish_error, size_bytes,"
                " checksum, stage_ino, updated_at)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)", products())
            cur.executemany(
                "INSERT INTO publish_failures (data_id, attempt, kind, error, at, host, pid)"
                " VALUES (?, ?, ?, ?, ?, ?, ?)", failures())
        reg.conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        reg.conn.execute("ANALYZE")
    return time.perf_counter() - t0


def in_process(path: Path) -> tuple[float, float]:
    """Median seconds of the reads `status` and `list --status failed` make, in this process
    (open included, interpreter start-up and imports excluded)."""
    from contimg_publisher import statuspage

    def status() -> None:
        now = time.time()
        with Registry(path, migrate=False) as reg:
            reg.counts()
            reg.oldest_waiting()
            reg.failures_since(now - 3600)
            reg.last_published()
            statuspage.snapshot(reg, limit=0, now=now)

    def failed() -> None:
        with Registry(path, migrate=False) as reg:
            assert len(reg.products(status="failed", limit=50)) == 50

    out = []
    for fn in (status, failed):
        times = []
        for _ in range(3):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        out.append(statistics.median(times))
    return out[0], out[1]


def wall(cmd: list[str], env: dict[str, str], ok: tuple[int, ...] = (0, 1)) -> float:
    """Median wall time of 3 runs of a whole process."""
    times = []
    for _ in range(3):
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
        times.append(time.perf_counter() - t0)
        if proc.returncode not in ok:
            raise SystemExit(f"{' '.join(cmd)} exited {proc.returncode}: {proc.stderr}")
    return statistics.median(times)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--products", type=int, default=1000,
                        help="products registered and claimed per pattern (default 1000)")
    parser.add_argument("--rounds", type=int, default=3,
                        help="alternating rounds of both patterns (default 3; medians)")
    parser.add_argument("--batch", type=int, default=100, help="batch size (default 100)")
    parser.add_argument("--rows", type=int, default=1_000_000,
                        help="rows of the large registry (default 1000000)")
    parser.add_argument("--dir", type=Path, default=None,
                        help="folder for the files (default: a new temporary folder)")
    parser.add_argument("--keep", action="store_true", help="keep the files")
    args = parser.parse_args()

    folder = Path(tempfile.mkdtemp(prefix="bench-registry-", dir=args.dir))
    fs = subprocess.run(["stat", "-f", "-c", "%T", str(folder)], capture_output=True,
                        text=True).stdout.strip()
    print(f"files in {folder} ({fs}); sqlite {sqlite3.sqlite_version}; "
          f"{args.products} products, batches of {args.batch}", flush=True)
    try:
        # Rounds alternate the two patterns, so a change in the disk's fsync latency during
        # the run affects both alike; medians are reported.
        legacy_runs, ours_runs = [], []
        for r in range(args.rounds):
            round_dir = folder / f"round{r}"
            round_dir.mkdir()
            legacy_runs.append(bench_legacy(round_dir, args.products))
            ours_runs.append(bench_registry(round_dir, args.products, args.batch))
            lr, lc = legacy_runs[-1]
            rr, rc, ro, co = ours_runs[-1]
            print(f"round {r + 1}: legacy register {lr:,.0f}/s, claim {lc:,.0f}/s; registry "
                  f"register {rr:,.0f}/s, claim {rc:,.0f}/s (batched), {ro:,.0f}/s, "
                  f"{co:,.0f}/s (one by one)", flush=True)
        legacy_reg, legacy_claim = (statistics.median(x) for x in zip(*legacy_runs,
                                                                          strict=True))
        reg, claim, reg_one, claim_one = (statistics.median(x) for x in zip(*ours_runs,
                                                                            strict=True))

        big = folder / "million" / "registry.sqlite3"
        build = build_million(big, args.rows)
        size = big.stat().st_size
        print(f"built {args.rows:,} rows in {build:.1f} s ({size / 2**20:.0f} MiB)", flush=True)
        cfg = folder / "million" / "config.toml"
        cfg.write_text(f'[paths]\nstage_root = "{folder}/stage"\n'
                       f'products_root = "{folder}/products"\nregistry = "{big}"\n')
        env = dict(os.environ, PYTHONPATH=str(REPO / "daemon"))
        cli = [sys.executable, "-m", "contimg_publisher", "--config", str(cfg)]
        status = wall([*cli, "status"], env)
        failed = wall([*cli, "list", "--status", "failed"], env)
        q_status, q_failed = in_process(big)
        with Registry(big, migrate=False) as big_reg:
            t0 = time.perf_counter()
            indexed = len(big_reg.stage_index())
            stage_index = time.perf_counter() - t0
        assert indexed == args.rows, indexed
        startup = wall([sys.executable, "-c", "import contimg_publisher.cli"], env, ok=(0,))
        # What `status` itself needs; the rest of the CLI's start-up is other commands' imports.
        needed = wall([sys.executable, "-c", "import contimg_publisher.registry,"
                       " contimg_publisher.statuspage, contimg_publisher.config,"
                       " contimg_publisher.lock, contimg_publisher.logs"], env, ok=(0,))
        sq = shutil.which("sqlite3")
        if sq:
            sq_status = wall([sq, str(big), "SELECT status, COUNT(*) FROM data_registry"
                              " GROUP BY status; SELECT data_type, status, COUNT(*) FROM"
                              " data_registry GROUP BY data_type, status; SELECT * FROM"
                              " data_registry WHERE status = 'staging' ORDER BY staged_at"
                              " LIMIT 1; SELECT COUNT(*) FROM publish_failures WHERE at >="
                              " strftime('%s', 'now') - 3600"], env, ok=(0,))
            sq_failed = wall([sq, str(big), "SELECT * FROM data_registry WHERE status ="
                              " 'failed' ORDER BY id DESC LIMIT 50"], env, ok=(0,))
        else:
            sq_status = sq_failed = float("nan")
    finally:
        if not args.keep:
            shutil.rmtree(folder, ignore_errors=True)

    print()
    print(f"| measure ({args.products} products, batches of {args.batch}, synchronous=FULL, "
          f"{fs}, median of {args.rounds} rounds) | legacy pattern | registry | ratio |")
    print("| --- | ---: | ---: | ---: |")
    print(f"| register, products/s (batched) | {legacy_reg:,.0f} | {reg:,.0f} | "
          f"{reg / legacy_reg:.1f}x |")
    print(f"| claim, products/s (batched) | {legacy_claim:,.0f} | {claim:,.0f} | "
          f"{claim / legacy_claim:.1f}x |")
    print(f"| register, products/s (one per transaction) | {legacy_reg:,.0f} | {reg_one:,.0f} "
          f"| {reg_one / legacy_reg:.1f}x |")
    print(f"| claim, products/s (one per transaction) | {legacy_claim:,.0f} | "
          f"{claim_one:,.0f} | {claim_one / legacy_claim:.1f}x |")
    print()
    print(f"| {args.rows:,} rows ({size / 2**20:.0f} MiB), process wall time, median of 3 "
          "| `contimg-publisher` | bare `sqlite3` | ratio |")
    print("| --- | ---: | ---: | ---: |")
    print(f"| `status` | {status:.3f} s | {sq_status:.3f} s | {status / sq_status:.1f}x |")
    print(f"| `list --status failed` | {failed:.3f} s | {sq_failed:.3f} s | "
          f"{failed / sq_failed:.1f}x |")
    print(f"| `status` reads only, in process (no start-up) | {q_status:.3f} s | | |")
    print(f"| `list --status failed` reads only, in process | {q_failed:.3f} s | | |")
    print(f"| `stage_index()` (the registry read of each full rescan), in process | "
          f"{stage_index:.3f} s | | |")
    print(f"| Python start-up and `import contimg_publisher.cli` only | {startup:.3f} s | | |")
    print(f"| Python start-up importing only the modules `status` uses | {needed:.3f} s | | |")
    print()
    ok_reg = reg / legacy_reg >= 10
    ok_status = status < 0.5
    print(f"target batched registration >= 10x legacy: {'met' if ok_reg else 'NOT met'}; "
          f"target status < 0.5 s: {'met' if ok_status else 'NOT met'}")
    return 0 if ok_reg and ok_status else 1


if __name__ == "__main__":
    sys.exit(main())
