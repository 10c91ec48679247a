"""Run `contimg-publisher ARGS` under cProfile, a profile per thread, for the benchmarks.

    CONTIMG_BENCH_PROFILE=DIR python bench/profiled.py --config FILE run

Each thread's profile is written to DIR/<pid>-<thread name>.prof when the command returns
(read them with `python -m pstats`): cProfile alone sees only the main thread, and the
daemon copies in another.
"""

from __future__ import annotations

import cProfile
import os
import runpy
import sys
import threading
from pathlib import Path
from typing import Any

OUT = Path(os.environ["CONTIMG_BENCH_PROFILE"])
PROFILES: list[tuple[str, cProfile.Profile]] = []
_plain_run = threading.Thread.run


def _profiled_run(self: threading.Thread) -> None:
    profile = cProfile.Profile()
    PROFILES.append((self.name, profile))
    profile.enable()
    try:
        _plain_run(self)
    finally:
        profile.disable()


def main() -> Any:
    threading.Thread.run = _profiled_run  # type: ignore[method-assign]
    sys.argv = ["contimg-publisher", *sys.argv[1:]]
    profile = cProfile.Profile()
    PROFILES.append(("main", profile))
    profile.enable()
    try:
        runpy.run_module("contimg_publisher", run_name="__main__")
    except SystemExit as exc:
        return exc.code
    finally:
        profile.disable()
        OUT.mkdir(parents=True, exist_ok=True)
        for name, each in PROFILES:
            each.dump_stats(OUT / f"{os.getpid()}-{name}.prof")
    return 0


if __name__ == "__main__":
    sys.exit(main())
