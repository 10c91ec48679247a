"""A registry client for tests/test_postgres_partition.py, run inside the network
namespace: it connects over the veth link, says `ready`, and once told (a line on stdin,
sent after the link went down) ends the transaction it held open and times one call of
each kind, printing one JSON line per
call: what it was, how long it blocked, and what it raised.

Usage: pg_dead_link_client.py URI BUSY_TIMEOUT_SECONDS LEASE_SECONDS
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable

from contimg_publisher.registry import open_registry


def main() -> int:
    uri, busy, lease = sys.argv[1], float(sys.argv[2]), float(sys.argv[3])
    reg = open_registry(uri, busy, node="node-cut", lease_seconds=lease)
    reg.heartbeat("cut:1:1:1", time.time(), "test")
    calls: dict[str, Callable[[], object]] = {}
    started = time.monotonic()
    try:
        # A transaction left open when the link goes down, holding its heartbeat row's lock.
        with reg.write():
            reg.heartbeat("cut:1:1:1", time.time(), "test")
            print(json.dumps({"ready": True, "limits": vars(reg.limits)}),  # type: ignore[attr-defined]
                  flush=True)
            sys.stdin.readline()
            started = time.monotonic()
        error = None
    except Exception as exc:  # noqa: BLE001 - reported to the test, which judges it
        error = f"{type(exc).__name__}: {exc}"
    print(json.dumps({"call": "commit", "seconds": round(time.monotonic() - started, 2),
                      "error": error}), flush=True)
    calls = {
        "clock": reg.clock,
        "heartbeat": lambda: reg.heartbeat("cut:1:1:1", time.time(), "test"),
        "next_due_at": reg.next_due_at,
        "claim": lambda: reg.claim("cut:1:1:1", lease, limit=8),
        "probe": reg.probe,
    }
    for name, call in calls.items():
        started = time.monotonic()
        try:
            call()
            error = None
        except Exception as exc:  # noqa: BLE001 - reported to the test, which judges it
            error = f"{type(exc).__name__}: {exc}"
        print(json.dumps({"call": name, "seconds": round(time.monotonic() - started, 2),
                          "error": error}), flush=True)
    reg.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
