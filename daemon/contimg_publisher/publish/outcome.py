"""What one publish attempt did (`Result`), and the failures a step can end in."""

from __future__ import annotations

import errno
from dataclasses import dataclass
from enum import StrEnum

from contimg_publisher.registry import FailureOutcome
from contimg_publisher.states import Attempt, FailureKind


class Mode(StrEnum):
    """How a publish was asked for (the row's publish_mode)."""

    AUTO = "auto"               # the daemon or `scan`, once the product was ready
    MANUAL = "manual"           # an operator's `publish` command


class How(StrEnum):
    """How a published product reached its final name (Result.how, the `how` log field)."""

    NONE = ""                   # nothing was placed, or the result does not say
    COPY = "copy"               # copied through a temporary name (another filesystem)
    RENAME = "rename"           # the staged inode renamed into the archive
    IDENTICAL = "identical"     # the final name already held these bytes
    RECONCILE = "reconcile"     # resolved after a crash by reconciliation
    LEGACY = "legacy"           # a copy left by older pipeline code, adopted


@dataclass
class Result:
    """What one publish attempt did, for logs and metrics."""

    data_id: str
    data_type: str
    status: Attempt
    stage_path: str
    published_path: str | None = None
    kind: FailureKind | None = None
    error: str | None = None
    failure: FailureOutcome | None = None
    bytes: int = 0
    seconds: float = 0.0
    how: How = How.NONE
    supersedes: str | None = None


class NoRoom(Exception):
    """The products filesystem lacks room for the copy (with its margin): the product waits,
    nothing is written and no attempt is counted."""


def classify(exc: OSError) -> FailureKind:
    if exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
        return FailureKind.NO_SPACE
    if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return FailureKind.PERMISSION
    return FailureKind.OTHER
