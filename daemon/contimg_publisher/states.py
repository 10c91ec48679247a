"""One vocabulary for what a product, an attempt and a detection can be.

The values are the strings the registry already holds (older pipeline code reads and
writes the same `status` column), so a member compares equal to the database's text and
goes into SQL parameters and JSON unchanged.
"""

from __future__ import annotations

from enum import StrEnum


class Status(StrEnum):
    """A row's `status`."""

    STAGING = "staging"          # finished and described; waits to be published
    PUBLISHING = "publishing"    # claimed under a lease
    PUBLISHED = "published"      # in the archive, verified
    FAILED = "failed"            # max_attempts reached: waits for an operator
    REJECTED = "rejected"        # not a publishable product; the reason is in publish_error


class FailureKind(StrEnum):
    """Why one publish attempt failed (publish_failures.kind)."""

    NO_SPACE = "no_space"
    PERMISSION = "permission"
    SOURCE_CHANGED = "source_changed"
    SOURCE_MISSING = "source_missing"
    VERIFY_MISMATCH = "verify_mismatch"
    INTERRUPTED = "interrupted"
    OTHER = "other"

    @property
    def counted(self) -> bool:
        """Whether it uses up an attempt: an interrupted publish or a file that changed says
        nothing about whether the product can be published."""
        return self not in (FailureKind.INTERRUPTED, FailureKind.SOURCE_CHANGED)


class Attempt(StrEnum):
    """How one publish attempt ended (publish.Result.status)."""

    PUBLISHED = "published"
    RETRY_DUE = "retry_due"      # failed; the row is due again (after its backoff)
    EXHAUSTED = "exhausted"      # failed; max_attempts reached, the row is now `failed`
    REQUEUED = "requeued"        # given back unfinished (a stop), no attempt counted
    LOST = "lost"                # the claim was lost to another process; nothing recorded
    REJECTED = "rejected"        # its read found it not publishable: the row is `rejected`
    DEFERRED = "deferred"        # given back before a byte was written (no room on the
    #                              products filesystem): no attempt counted, due again later

    @property
    def failed(self) -> bool:
        return self in (Attempt.RETRY_DUE, Attempt.EXHAUSTED)


class Detected(StrEnum):
    """What detection did with one staged path (detect.Outcome.action)."""

    REGISTERED = "registered"
    UPDATED = "updated"                      # new content: waits again
    UNCHANGED = "unchanged"
    BUSY = "busy"                            # a publish holds its row
    LEFTOVER = "leftover"                    # already published from this path, same bytes
    LATE_SIDECAR = "late_sidecar"            # a sidecar beside a published product
    REJECTED = "rejected"
    REJECTED_UNCHANGED = "rejected_unchanged"
    VANISHED = "vanished"                    # left the staging area before it was published
    FOUND_PUBLISHED = "found_published"      # gone from staging, found verified in the archive
    FOREIGN = "foreign"                      # registered by another writer as another type
    DEFERRED = "deferred"                    # its check failed unexpectedly; looked at later


class Step(StrEnum):
    """How far a publish in flight has come, as its row records it (publish_step): what
    reconciliation finds on disk depends on it.

    CLAIMED: nothing has been written to the products area yet.
    PLANNED: the final, temporary and sidecar names are recorded; any of them may exist
    (the sidecars, the temporary copy, the product under its final name) but nothing is
    committed. The commit then makes the row `published` and clears the step.
    LEGACY: a `publishing` row left by older pipeline code, which copied straight to the
    final name and recorded nothing (never stored: what a row without a step and without a
    lease is).
    """

    CLAIMED = "claimed"
    PLANNED = "planned"
    LEGACY = "legacy"


class Kind(StrEnum):
    """What a product rule's products are (`kind` in the config)."""

    FILE = "file"
    DIRECTORY = "directory"


class Sink(StrEnum):
    """Where outbox events go (the [notify] keys that configure each)."""

    WEBHOOK = "webhook"          # [notify] url: an HTTP POST
    COMMAND = "command"          # [notify] command: the event on its standard input


class Delivery(StrEnum):
    """How one event stands for one sink (outbox_deliveries.outcome, or pending)."""

    PENDING = "pending"          # not yet taken by the sink; the head blocks the rest
    DELIVERED = "delivered"
    DEAD = "dead"                # given up on after [notify] max_attempts
class FindingKind(StrEnum):
    """What the fixity audit found wrong with the products area (audit_findings.kind)."""

    MISSING = "missing"                  # a published row's file or folder is not there
    SIZE_CHANGED = "size_changed"        # there, with another size than recorded
    CHECKSUM_CHANGED = "checksum_changed"  # there, same size, other bytes
    TYPE_CHANGED = "type_changed"        # a folder where a file was published, or the reverse
    SIDECAR_MISSING = "sidecar_missing"  # a sidecar the row records is not beside it
    SYMLINK = "symlink"                  # a symbolic link in the products area (never followed)
    DARK_FILE = "dark_file"              # a file that no row records
    DARK_FOLDER = "dark_folder"          # a folder with nothing recorded in it
    UNREADABLE = "unreadable"            # cannot be read back (permission, I/O error)
    STRAY_TEMPORARY = "stray_temporary"  # named like a temporary, no live publish owns it
    NAME_REJECTED = "name_rejected"      # published under a name detection rejects


class StaleKind(StrEnum):
    """What a file left in the staging area is (hygiene.Stale.kind, quarantine_log.kind)."""

    REJECTED = "rejected"    # a product rejected as bad input
    UNCLAIMED = "unclaimed"  # a file in a product folder that no product owns


class Duty(StrEnum):
    """A task that one daemon of all the nodes sharing a registry does at a time (the
    registry's `lead`): the others stand by and take it over when its lease lapses."""

    OUTBOX = "outbox"  # delivering the shared outbox to the sinks
    AUDIT = "audit"    # the background fixity audit of the shared archive


class Move(StrEnum):
    """A registry operation that changes a row's status (TRANSITIONS: from which, to which;
    MOVE_TEXT: when it happens)."""

    CLAIM = "claim"
    CLAIM_ASKED = "claim_asked"
    PUBLISH = "publish"
    RESTORE = "restore"
    FAIL = "fail"
    REQUEUE = "requeue"
    REJECT = "reject"
    REJECT_CLAIMED = "reject_claimed"
    FORGET = "forget"
    PARK = "park"
    EXHAUST = "exhaust"
    RETRY = "retry"
    REQUEST = "request"


# When each move happens (docs/design.md's table of transitions is rendered from these).
MOVE_TEXT: dict[Move, str] = {
    Move.CLAIM: "claimed under a lease, due (or asked for) and not held",
    Move.CLAIM_ASKED: "claimed for a manual `publish` of one product, held or failed too",
    Move.PUBLISH: "the publish committed, or reconciliation completed it",
    Move.RESTORE: "a waiting product found published in the archive (the publish log)",
    Move.FAIL: "an attempt failed: due again after its backoff, or `failed` once "
               "`max_attempts` is reached",
    Move.REQUEUE: "given back unfinished (a stop, an interrupted publish, no room yet): "
                  "no attempt counted",
    Move.REJECT: "bad input found at registration (a new row, or its file changed into "
                 "bad input)",
    Move.REJECT_CLAIMED: "the publish's read found it not publishable",
    Move.FORGET: "its staged file left the staging area before it was published",
    Move.PARK: "staged outside the configured `stage_root`: waits for an operator",
    Move.EXHAUST: "its attempts already reach `max_attempts`",
    Move.RETRY: "an operator's `retry` (or a rejected file changed into a product)",
    Move.REQUEST: "an operator's `publish` asks for it",
}

_S = Status
# Which statuses each move takes a row from, and the one it leaves it in (FAIL: STAGING or
# FAILED by its attempts; REJECT from None: a new row). The SQL (sql_from) and the Python
# checks (may) both read this one table.
TRANSITIONS: dict[Move, tuple[frozenset[Status], Status]] = {
    Move.CLAIM: (frozenset({_S.STAGING}), _S.PUBLISHING),
    Move.CLAIM_ASKED: (frozenset({_S.STAGING, _S.FAILED}), _S.PUBLISHING),
    Move.PUBLISH: (frozenset({_S.PUBLISHING}), _S.PUBLISHED),
    Move.RESTORE: (frozenset({_S.STAGING, _S.FAILED}), _S.PUBLISHED),
    Move.FAIL: (frozenset({_S.PUBLISHING}), _S.STAGING),
    Move.REQUEUE: (frozenset({_S.PUBLISHING}), _S.STAGING),
    Move.REJECT: (frozenset({_S.STAGING, _S.FAILED, _S.REJECTED}), _S.REJECTED),
    Move.REJECT_CLAIMED: (frozenset({_S.PUBLISHING}), _S.REJECTED),
    Move.FORGET: (frozenset({_S.STAGING}), _S.REJECTED),
    Move.PARK: (frozenset({_S.STAGING}), _S.FAILED),
    Move.EXHAUST: (frozenset({_S.STAGING}), _S.FAILED),
    Move.RETRY: (frozenset({_S.FAILED, _S.STAGING, _S.REJECTED}), _S.STAGING),
    Move.REQUEST: (frozenset({_S.STAGING, _S.FAILED}), _S.STAGING),
}

# Rows that wait for a publish: an operator may still act on a failed one.
WAITING = frozenset({_S.STAGING, _S.FAILED})


def may(move: Move, status: str | None) -> bool:
    """Whether `move` applies to a row in `status`."""
    return status in TRANSITIONS[move][0]


def to(move: Move) -> Status:
    """The status `move` leaves a row in."""
    return TRANSITIONS[move][1]


def ends(move: Move) -> tuple[Status, ...]:
    """Every status `move` may leave a row in (FAIL: staging, or failed by its attempts)."""
    return (to(move), Status.FAILED) if move is Move.FAIL else (to(move),)


def sql(value: StrEnum) -> str:
    """A state (a status, a step, ...) as an SQL literal."""
    return f"'{value.value}'"


def sql_in(statuses: frozenset[Status] | Move) -> str:
    """`status IN (...)` for a set of statuses, or for the statuses a move starts from."""
    if isinstance(statuses, Move):
        statuses = TRANSITIONS[statuses][0]
    if len(statuses) == 1:
        return f"status = {sql(next(iter(statuses)))}"
    return f"status IN ({', '.join(sql(s) for s in sorted(statuses))})"
