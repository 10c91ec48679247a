"""The publish protocol's steps, in order, and where a test may kill the process in them.

Every claimed product takes the six steps of `ProtocolStep` in order, each recoverable
from what is on disk plus the row (protocol.py holds one function per step and the order
as data; reconcile.py resolves a publish a crash interrupted). A row records only coarse
progress (`states.Step`, the stored `publish_step`); `ProtocolStep.recorded` says which.
"""

from __future__ import annotations

import os
import signal
from enum import StrEnum

from contimg_publisher.registry import Product
from contimg_publisher.states import Status, Step


class ProtocolStep(StrEnum):
    """One step of the publish protocol; members are in protocol order.

    OPEN_SOURCE: open the staged source without following links, walking from a
      descriptor of stage_root, and check with fstat that it is the file that was
      registered (and that its folder is no alias of the products area).
    CHOOSE_NAME: choose the final name: never an existing one, unless it already holds the
      same bytes (then the publish is idempotent); otherwise `<stem>.vN<suffix>`. A folder
      product reserves its name in the registry first. A copy checks the room it needs.
    RECORD_PLAN: record the final, temporary and sidecar names in the row (reconciliation
      reads them); one durable commit for every product of a batch.
    PLACE: same filesystem: a no-replace rename (renameat2 RENAME_NOREPLACE) of the
      staged inode, which then belongs to the archive alone (a staged file with other hard
      links, or a folder holding one, is copied instead); across filesystems: copy into a
      temporary name created O_EXCL in the destination folder, hashing (and checking a
      FITS file registered from its headers) in the same pass, fsync, verify size and
      checksum against the registry (a pending digest is recorded now), sidecars to their
      final names, then rename without replacing. Then fsync each destination folder
      (and, after a rename, the staging folder). A file that fails the checks loses its
      temporary copy and is `rejected` with the reason.
    COMMIT: commit `published` durably (synchronous=FULL); one commit for the batch.
    REMOVE_SOURCE: only then remove the source of a copy, file or folder, if the name
      still leads to what was published (a folder: the same bytes, hashed again).

    Only the archive's own new inodes are ever chmod-ed. A failure removes the temporary
    file, leaves the source alone and is recorded with its kind.
    """

    OPEN_SOURCE = "open_source"
    CHOOSE_NAME = "choose_name"
    RECORD_PLAN = "record_plan"
    PLACE = "place"
    COMMIT = "commit"
    REMOVE_SOURCE = "remove_source"

    @property
    def recorded(self) -> Step | None:
        """What the row says once this step is done (None: no longer publishing)."""
        return _RECORDED[self]


_RECORDED: dict[ProtocolStep, Step | None] = {
    ProtocolStep.OPEN_SOURCE: Step.CLAIMED,
    ProtocolStep.CHOOSE_NAME: Step.CLAIMED,
    ProtocolStep.RECORD_PLAN: Step.PLANNED,
    ProtocolStep.PLACE: Step.PLANNED,
    ProtocolStep.COMMIT: None,
    ProtocolStep.REMOVE_SOURCE: None,
}


def step_of(row: Product) -> Step | None:
    """How far the publish of a `publishing` row came (None for any other row), as the
    protocol recorded it: claimed, then planned (names recorded before anything is
    written), then the commit that ends it. A row without a recorded step was left by
    older code: this program's version 3 (a lease and perhaps a plan), or the pipeline's
    own code (no lease, nothing recorded)."""
    if row.status != Status.PUBLISHING:
        return None
    if row.publish_step:
        return Step(row.publish_step)
    if row.lease_owner is None and row.publish_target is None:
        return Step.LEGACY
    return Step.PLANNED if row.publish_target else Step.CLAIMED


# Test-only fault injection: the process kills itself at the named point. Read nowhere else.
CRASH_ENV = "CONTIMG_PUBLISHER_TEST_CRASH_AT"


class CrashPoint(StrEnum):
    """A point inside a step where a test can have the process SIGKILL itself (CRASH_ENV
    names it); `step` is the step it interrupts."""

    AFTER_SIDECARS = "after_sidecars"    # the sidecars at their final names, not the product
    AFTER_TEMP_WRITE = "after_temp_write"  # the copy whole in its temporary name, fsynced
    AFTER_RENAME = "after_rename"        # every product at its final name, durable
    AFTER_COMMIT = "after_commit"        # published; the staged copies still there
    BEFORE_SOURCE_REMOVAL = "before_source_removal"  # about to remove one staged copy

    @property
    def step(self) -> ProtocolStep:
        return _CRASH_STEP[self]


_CRASH_STEP = {
    CrashPoint.AFTER_SIDECARS: ProtocolStep.PLACE,
    CrashPoint.AFTER_TEMP_WRITE: ProtocolStep.PLACE,
    CrashPoint.AFTER_RENAME: ProtocolStep.PLACE,
    CrashPoint.AFTER_COMMIT: ProtocolStep.COMMIT,
    CrashPoint.BEFORE_SOURCE_REMOVAL: ProtocolStep.REMOVE_SOURCE,
}

CRASH_POINTS: tuple[CrashPoint, ...] = tuple(CrashPoint)
CRASH_POINTS_BY_STEP: dict[ProtocolStep, tuple[CrashPoint, ...]] = {
    step: tuple(p for p in CrashPoint if p.step is step) for step in ProtocolStep}


class UnknownCrashPoint(ValueError):
    """CRASH_ENV names no crash point: a test that would silently test nothing."""


def armed() -> CrashPoint | None:
    """The crash point CRASH_ENV names, if any; an unknown name is refused."""
    name = os.environ.get(CRASH_ENV)
    if not name:
        return None
    try:
        return CrashPoint(name)
    except ValueError:
        raise UnknownCrashPoint(
            f"{CRASH_ENV}={name!r} names no crash point; known: "
            f"{', '.join(CRASH_POINTS)}") from None


def crash_at(point: CrashPoint) -> None:
    """Die here (SIGKILL, as a power cut would) when CRASH_ENV names this point."""
    if armed() is point:
        os.kill(os.getpid(), signal.SIGKILL)
