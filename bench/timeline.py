"""Where a running daemon's time went, from its own JSON events (a daemon.log).

Each stretch between two consecutive events is charged to the later one's kind: up to a
`registered` event the loop was detecting and registering, up to a `published` event the
publish thread was publishing (the loop logs a batch's results together once it is done),
anything else is "other". The loop alternates the two on a burst (see
worker.Worker.turn_until), so the sums say how much each took.

    .venv/bin/python bench/timeline.py DAEMON_LOG [--from EVENT]
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
from collections import Counter
from pathlib import Path
from typing import Any


def read(path: Path) -> list[dict[str, Any]]:
    out = []
    for line in path.read_text().splitlines():
        try:
            event = json.loads(line)
        except ValueError:
            continue
        if "timestamp" in event:
            event["t"] = datetime.datetime.fromisoformat(event["timestamp"]).timestamp()
            out.append(event)
    return out


def spans(events: list[dict[str, Any]], start: str = "registered",
          end: str = "published") -> dict[str, float]:
    """Seconds charged to each kind of event, from the first `start` to the last `end`."""
    first = next(i for i, e in enumerate(events) if e["event"] == start)
    last = max(i for i, e in enumerate(events) if e["event"] == end)
    charged: Counter[str] = Counter()
    for before, after in zip(events[first:last], events[first + 1:last + 1], strict=True):
        kind = after["event"] if after["event"] in (start, end) else "other"
        charged[kind] += after["t"] - before["t"]
    charged["total"] = events[last]["t"] - events[first]["t"]
    # Runs of the same kind: the loop's turns (batches handed over, batches registered).
    kinds = [e["event"] for e in events[first:last + 1] if e["event"] in (start, end)]
    charged["turns"] = sum(1 for a, b in zip(kinds, kinds[1:], strict=False) if a != b) + 1
    return dict(charged)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("log", type=Path)
    args = parser.parse_args()
    events = read(args.log)
    counts = Counter(e["event"] for e in events)
    result = spans(events)
    print(json.dumps({"events": dict(counts.most_common(8)),
                      **{k: round(v, 3) for k, v in result.items()}}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
