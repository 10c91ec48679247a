"""Move one claimed product to the products area, so that no crash can lose, truncate,
duplicate or overwrite it.

The protocol's steps are `ProtocolStep` (steps.py, with the crash points a test can kill
the process at); protocol.py takes a batch through them, one function per step. Around
it: naming.py (final names, versions, reservations), place.py (rename or copy, the
FITS judging of the read), sidecars.py, sources.py (the writer check, the staged copy's
removal), lease.py (the lease keeper), tidy.py (what detection finds left in staging),
publisher.py (the entry points). reconcile.py, beside this package, resolves publishes
that a crash interrupted, and `transfer` holds the byte-level steps.
"""

from contimg_publisher.publish.context import Context
from contimg_publisher.publish.folders import staged_in_archive
from contimg_publisher.publish.naming import (
    destination,
    joined_path,
    rule_for,
    sidecar_destination,
    versioned,
)
from contimg_publisher.publish.outcome import How, Mode, NoRoom, Result, classify
from contimg_publisher.publish.publisher import Publisher
from contimg_publisher.publish.steps import (
    CRASH_ENV,
    CRASH_POINTS,
    CRASH_POINTS_BY_STEP,
    CrashPoint,
    ProtocolStep,
    UnknownCrashPoint,
    step_of,
)
from contimg_publisher.publish.tidy import (
    LateSidecar,
    Tidied,
    publish_late_sidecars,
    remove_leftover,
)

__all__ = [
    "CRASH_ENV",
    "CRASH_POINTS",
    "CRASH_POINTS_BY_STEP",
    "Context",
    "CrashPoint",
    "How",
    "LateSidecar",
    "Mode",
    "NoRoom",
    "ProtocolStep",
    "Publisher",
    "Result",
    "Tidied",
    "UnknownCrashPoint",
    "classify",
    "destination",
    "joined_path",
    "publish_late_sidecars",
    "remove_leftover",
    "rule_for",
    "sidecar_destination",
    "staged_in_archive",
    "step_of",
    "versioned",
]
