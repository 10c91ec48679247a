"""The watch's queued changes applied to what the main loop keeps: the write tracker told
which staged files are being written, the detector which paths and folders to look at.

The watch's thread only queues; everything here runs on the loop's thread, so the tracker
and the detector have one writer.
"""

from __future__ import annotations

import os
import queue

from contimg_publisher import scanpass, watch, writers
from contimg_publisher.watch import ChangeKind

DRAIN_LIMIT = 100_000  # changes taken in one turn; the rest wait for the next


def drain(changes: queue.SimpleQueue[watch.Change | str], tracker: writers.WriteTracker,
          run: scanpass.Pass) -> bool:
    """Take what is queued; True when the watch asked for a rescan (events were lost)."""
    detector = run.detector
    rescan = False
    for _ in range(DRAIN_LIMIT):
        try:
            change = changes.get_nowait()
        except queue.Empty:
            break
        if isinstance(change, str):  # watch.RESCAN, the only string the watcher queues
            rescan = True
            tracker.clear()  # a close-write may be among the events lost
            continue
        if change.kind == ChangeKind.MODIFIED:
            tracker.modified(change.path)
        elif change.kind == ChangeKind.CLOSED:
            tracker.closed_after_write(change.path)
        elif change.kind in (ChangeKind.DELETED, ChangeKind.MOVED_OUT):
            tracker.moved(change.path, change.dest)
        if change.kind in (ChangeKind.DELETED, ChangeKind.MOVED_OUT):
            detector.forget(change.path)
        elif change.kind in (ChangeKind.CREATED, ChangeKind.MOVED_IN) and \
                os.path.isdir(change.path) and not os.path.islink(change.path):
            detector.note(change.path)
            detector.note_folder(change.path)
            run.log_walk_problems()
        else:
            detector.note(change.path)
    return rescan
