"""Room on a filesystem, asked before a product is copied onto it.

A product larger than the free space would be copied until ENOSPC, counted as a failed
attempt and retried with backoff, and every try would fill the disk again. Asked first
(statvfs), the product waits with the reason instead, and the disk keeps a margin for
everything else that writes there.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

GIB = 1 << 30
DEFAULT_MIN_FREE_FRACTION = 0.01  # with GIB: 1 GiB or 1 % of the filesystem, the larger


@dataclass(frozen=True)
class Room:
    free_bytes: int   # what an unprivileged writer may still use (f_bavail)
    size_bytes: int   # the filesystem's whole size

    @classmethod
    def of(cls, st: os.statvfs_result) -> Room:
        return cls(st.f_bavail * st.f_frsize, st.f_blocks * st.f_frsize)

    def margin(self, min_free_bytes: int | None) -> int:
        """[publish] min_free_bytes, or by default 1 GiB or 1 % of the size, the larger."""
        if min_free_bytes is not None:
            return min_free_bytes
        return max(GIB, int(self.size_bytes * DEFAULT_MIN_FREE_FRACTION))

    def shortfall(self, needed_bytes: int, min_free_bytes: int | None) -> str | None:
        """Why `needed_bytes` do not fit (None when they do), in words an operator acts on."""
        margin = self.margin(min_free_bytes)
        if needed_bytes + margin <= self.free_bytes:
            return None
        return (f"not enough free space on the products filesystem: the copy needs "
                f"{human(needed_bytes)} and [publish] min_free_bytes keeps {human(margin)} "
                f"free, but {human(self.free_bytes)} of {human(self.size_bytes)} are free; "
                "it waits until space is freed (no attempt is counted)")


def human(n: int) -> str:
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{n} B"
