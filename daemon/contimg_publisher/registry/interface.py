"""The registry's contract: what the rest of the program calls on a registry, whichever
backend keeps it (sqlite.py, the embedded default; postgres.py, for several nodes).

Every backend raises the errors of model.py: RegistryUnavailable (and RegistryBusy) for "cannot
be used now, nothing was recorded", a state the daemon waits out; RegistryGone when the
records went away under it; RegistryError for a registry that cannot be used at all.

Owner-checked writes (those after a claim) also take the claim's token
(Product.claim_token): a backend that issues tokens makes such a write change nothing once
another claim took the row, even one by the same owner.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterable, Sequence
from contextlib import AbstractContextManager
from typing import Any, Protocol, Self

from contimg_publisher.qa import Condition, Record
from contimg_publisher.registry.model import (
    Candidate,
    Event,
    Failure,
    FailureOutcome,
    Finding,
    Heartbeat,
    Identity,
    Product,
    Published,
    PublishRecord,
    Quarantined,
    Rebuilt,
    Recorded,
    Reservation,
    SinkState,
    Unclaimed,
)


class RegistryBackend(Protocol):
    """One connection (or a pool of one) to the registry; open one per thread."""

    #: Where it is: a file path, or a server's URI without its password.
    location: str
    #: The schema this program needs of this backend.
    schema_version: int
    #: Whether other hosts' daemons use it too (a server): a claim is then only counted
    #: on while its lease can be renewed.
    shared: bool

    def close(self) -> None:
        """Close; when the files cannot be written, without the checkpoint the last connection of a
        process makes on closing (it writes the -shm: SIGBUS)."""

    def probe(self) -> None:
        """A real write that leaves nothing behind: whether the registry takes commits again.
        RegistryUnavailable when it does not."""

    def set_qa_gate(self, conditions: Sequence[Condition], records: Sequence[Record] = ()
                    ) -> None:
        """The QA gate claims, due times and hold reasons apply from now on (qa.conditions and
        qa.records of the configured rules). A record's table that does not exist yet holds
        its products with that reason until it does; RegistryError, the gate unchanged, when
        the table exists without a column the rule names. Every commit that records a
        publish (mark_published, confirm_published, restore_published) also points the
        product's record at the published path."""

    def clock(self) -> float:
        """Now, by the clock leases are measured by (a server's own, for a shared registry):
        what reconciliation compares lease_expires_at with."""

    def check_identity(self) -> None:
        """RegistryGone unless the registry is still the one this connection writes (for a file:
        the configured path still leads to it); asked before claims and before every commit
        that lets a source go."""

    def __enter__(self) -> Self:
        ...

    def __exit__(self, *exc: object) -> None:
        ...

    def write(self) -> AbstractContextManager[Any]:
        """One explicit BEGIN IMMEDIATE transaction: committed on success, rolled back on error."""

    def read(self) -> AbstractContextManager[Any]:
        """A consistent snapshot for several SELECTs."""

    def version(self) -> int:
        ...

    def migrate(self) -> list[int]:
        """Bring the file to SCHEMA_VERSION, one transaction per step; returns steps applied."""

    def get(self, data_id: str) -> Product | None:
        ...

    def by_stage_path(self, stage_path: str) -> list[Product]:
        ...

    def by_published_path(self, published_path: str) -> Product | None:
        ...

    def products(self, status: str | None = None, data_type: str | None = None,
                 limit: int | None = None, newest_first: bool = True) -> list[Product]:
        ...

    def stage_index(self) -> dict[str, tuple[str, Identity | None]]:
        """stage_path -> (status, identity) of every row not yet published, for fast rescans."""

    def waiting_at(self, stage_path: str) -> bool:
        """Whether a row staged at this path waits (staging or failed)."""

    def published_at(self, stage_path: str) -> bool:
        """Whether a row staged at this path was published."""

    def history(self, data_id: str) -> list[Failure]:
        ...

    def relationships(self, data_id: str) -> list[dict[str, str]]:
        ...

    def counts(self) -> dict[str, int]:
        """Rows per status (every status a key), in one consistent snapshot."""

    def counts_by_type(self) -> dict[tuple[str, str], int]:
        ...

    def oldest_waiting(self) -> Product | None:
        ...

    def failures_since(self, since: float) -> int:
        ...

    def published_since(self, since: float) -> int:
        ...

    def last_published(self) -> Product | None:
        ...

    def next_due_at(self) -> float | None:
        """When the earliest waiting product becomes due (None: nothing waits)."""

    def publishing(self, every_node: bool = False) -> list[Product]:
        """Rows in `publishing`: this node's, or with every_node those of all nodes."""

    def register(self, c: Candidate, now: float | None = None) -> tuple[str, Product]:
        """Record a finished product; idempotent."""

    def reject(self, data_id: str, data_type: str, base_path: str, stage_path: str,
               stage_path_bytes: bytes, reason: str, identity: Identity | None,
               error_max_chars: int, now: float | None = None) -> tuple[str, Product | None]:
        """Record bad input with the reason; never touches a published or publishing row."""

    def claim(self, owner: str, lease_seconds: float, limit: int = 1, now: float | None = None,
              data_id: str | None = None, max_bytes: int | None = None) -> list[Product]:
        """Move due rows to `publishing` under a lease held by `owner`."""

    def renew_lease(self, data_id: str, owner: str, lease_seconds: float,
                    now: float | None = None, token: str | None = None) -> bool:
        ...

    def set_publish_plan(self, owner: str, data_id: str, target: str, temp: str | None,
                         sidecars: Sequence[str] = (), token: str | None = None) -> bool:
        """Record the final name, the temporary name and the sidecars' final names a publish is
        about to write (reconciliation, and the next attempt after a crash, read them); False
        when `owner` no longer holds the claim."""

    def record_checksum(self, data_id: str, owner: str, checksum: str,
                        fits_checksums: str | None, now: float | None = None,
                        token: str | None = None) -> bool:
        """The digest the publish's copy computed for a row registered without one, and how its
        FITS checksums came out ("verified", "absent"), recorded before the product can reach
        its final name (reconciliation verifies that name against it). False when `owner` no
        longer holds the claim."""

    def reject_claimed(self, data_id: str, owner: str, reason: str, error_max_chars: int,
                       now: float | None = None, host: str | None = None,
                       pid: int | None = None, token: str | None = None) -> bool:
        """A claimed product the publish found is not publishable (a FITS checksum that fails in
        the copy's read): `rejected` with the reason, like a rejection at registration, the
        attempt kept in the history. False when not `owner`'s claim."""

    def mark_published(self, item: Published, owner: str | None,
                       now: float | None = None, token: str | None = None) -> bool:
        """Durably record a publish; with owner None the lease is not checked (reconciliation).
        False when the row's claim is no longer `owner`'s (it is left as it is)."""

    def confirm_published(self, data_id: str, published_path: str, size_bytes: int,
                          checksum: str, metadata: dict[str, Any],
                          now: float | None = None) -> bool:
        """A publish an older program finished on disk but never recorded: the row becomes
        `published` with the copy's description; legacy values already set are kept."""

    def publish_records(self, data_id: str, stage_path: str) -> list[PublishRecord]:
        """This program's publishes of a product (by its id or its staged path), newest first."""

    def restore_published(self, row_id: int, record: PublishRecord,
                          now: float | None = None) -> bool:
        """A waiting row whose product is in the archive (its copy verified against `record`) is
        `published` again, described from the record. Values the legacy writer set are kept;
        what it reset is filled in."""

    def record_failure(self, data_id: str, owner: str | None, kind: str, error: str,
                       max_attempts: int, backoff_initial: float, backoff_max: float,
                       error_max_chars: int, now: float | None = None,
                       host: str | None = None, pid: int | None = None,
                       rng: random.Random | None = None, token: str | None = None
                       ) -> FailureOutcome | None:
        """Count a failed attempt (unless its kind says nothing about the product), keep it in the
        history, and schedule the next try; `failed` once attempts reach max_attempts."""

    def requeue(self, data_id: str, owner: str | None, now: float | None = None,
                token: str | None = None, due_at: float | None = None) -> bool:
        """Give a claimed row back, due now (or at `due_at`), without counting an attempt
        (clean shutdown; no room for it yet)."""

    def forget_missing(self, data_id: str, reason: str, error_max_chars: int,
                       now: float | None = None) -> bool:
        """A waiting product's file is gone from staging: it is rejected, with the reason."""

    def park_outside_root(self, stage_root: str, data_types: Sequence[str], reason: str,
                          error_max_chars: int, now: float | None = None) -> list[str]:
        """Waiting rows of these types, described by this program, whose staged path is not under
        `stage_root` (the configured staging root changed since they were registered) become
        `failed`, with the reason, in the failure history too: an operator state, never a silent
        wait. Returns their data_ids."""

    def retry(self, data_ids: Iterable[str] = (), all_failed: bool = False,
              now: float | None = None) -> list[str]:
        """Clear attempts and make products due again; rejected ones are examined afresh."""

    def request_publish(self, data_id: str, now: float | None = None) -> bool:
        """Ask the running daemon to publish a product now, held or failed or not yet due."""

    def set_hold(self, data_id: str, held: bool, now: float | None = None) -> bool:
        ...

    def mark_exhausted(self, max_attempts: int, now: float | None = None,
                       owns: Callable[[Product], bool] | None = None) -> list[str]:
        """Rows waiting with attempts already at the limit (legacy rows, a lowered limit) become
        `failed`, so they wait for an operator instead of retrying forever. With `owns`, only
        the rows it accepts (the others belong to other writers)."""

    def add_sidecars(self, data_id: str, names: Sequence[str], now: float | None = None
                     ) -> bool:
        """A sidecar that arrived after its product was published now stands beside it."""

    def replace_unclaimed(self, found: Sequence[tuple[str, bytes, str, float, int | None]],
                          now: float | None = None) -> None:
        """Make (path, path bytes, reason, changed_at, size) the whole list of unclaimed files,
        keeping when each was first seen."""

    def unclaimed(self, changed_before: float | None = None,
                  limit: int | None = None) -> list[Unclaimed]:
        """Unclaimed files, oldest change first; with changed_before, only those unchanged since
        then."""

    def size_bytes(self) -> int:
        ...

    def heartbeat(self, owner: str, started: float, version: str) -> None:
        """This daemon (`owner`, started at `started`) is alive now; renewed by its main loop."""

    def end_heartbeat(self, owner: str) -> None:
        """This daemon stopped cleanly."""

    def heartbeats(self) -> list[Heartbeat]:
        """The running daemons of every node (none for a backend without the table)."""

    def waiting(self, limit: int | None = None) -> list[Product]:
        """Products waiting to be published, longest-waiting first."""

    def oldest_unheld_waiting(self) -> Product | None:
        """The longest-waiting product the daemon is expected to publish (held ones wait on
        purpose, unless an operator asked for a publish)."""

    def held(self, data_types: Sequence[str], limit: int | None = None
             ) -> list[tuple[Product, str]]:
        """Waiting products of these types that are not published automatically, with the reason:
        the QA gate's, or a hold (auto_publish_enabled = 0), oldest first. A manual publish that
        was asked for is not held."""

    def qa_holds(self, data_ids: Sequence[str]) -> dict[str, str]:
        """data_id -> the reason the QA gate holds it, for the rows it holds."""

    def recent_published(self, limit: int = 10) -> list[Product]:
        """The last publishes, newest first."""

    def by_status(self, status: str, limit: int | None = None) -> list[Product]:
        """Rows in one status, most recently changed first."""

    # --- folder-name reservations (a products area several nodes share) -------------------

    def reserve_name(self, published_path: str, data_id: str, owner: str,
                     token: str | None = None) -> str | None:
        """Reserve a folder product's final name before its rename, atomically against every
        other publish that uses this registry: None when it is now this product's (reserved
        afresh, or already by an earlier attempt of the same product, which this claim then
        holds); otherwise the data_id of the product that holds it (the caller takes the
        next version). A folder cannot be linked, and not every filesystem a shared products
        area lives on renames without replacing; the reservation is what keeps two nodes
        from choosing one name."""

    def release_name(self, published_path: str, data_id: str, token: str | None = None
                     ) -> bool:
        """Give a reserved name back (the publish ended without taking it); with `token`,
        only while that claim still holds the reservation."""

    def reservations(self) -> list[Reservation]:
        """This node's reservations whose product is not published under the reserved name:
        each is live while its claim is, and reconciliation releases the others."""

    # --- the outbox: one event per publish, in the publish's own commit -----------------

    def add_sinks(self, sinks: Sequence[str], now: float | None = None) -> list[str]:
        """Each sink not seen before starts at the end of the outbox (it hears of publishes
        from now on); one seen before keeps its cursor. Returns the sinks added."""

    def outbox_head(self, sink: str) -> Event | None:
        """The oldest event not yet done for this sink (None: nothing waits, or the sink is
        not registered)."""

    def record_delivered(self, sink: str, seq: int, now: float | None = None) -> int:
        """The sink took event `seq` (its head): its cursor moves past it. Returns the
        attempts it took, 0 when the cursor was already past it (nothing changed)."""

    def record_delivery_failure(self, sink: str, seq: int, error: str, error_max_chars: int,
                                max_attempts: int = 0, now: float | None = None
                                ) -> tuple[int, bool]:
        """A failed attempt at the sink's head; at max_attempts (> 0) it is given up on for
        this sink (`dead`) and the next event becomes the head. Returns (attempts, dead)."""

    def redeliver_dead(self, sinks: Sequence[str]) -> dict[str, int]:
        """Each sink's cursor goes back to just before the oldest event it gave up on.
        Returns sink -> events queued again."""

    def sink_states(self, sinks: Sequence[str]) -> list[SinkState]:
        """Backlog and last failure of each sink."""

    def events(self, sinks: Sequence[str], everything: bool = False, after: int = 0,
               limit: int | None = None) -> list[tuple[Event, dict[str, dict[str, Any]]]]:
        """Events oldest first with their state for every sink; without `everything` only
        those pending for some sink or given up on by one."""

    def last_event_seq(self) -> int:
        ...

    def events_for(self, data_id: str) -> list[Event]:
        ...

    def lead(self, duty: str, owner: str, lease_seconds: float) -> bool:
        """Whether `owner` is the one daemon that does `duty` (states.Duty) now: taken when
        nobody holds it or its holder's lease lapsed, renewed for `lease_seconds` when
        `owner` holds it. A registry with one daemon (SQLite) always says yes."""

    def resign(self, duty: str, owner: str) -> None:
        """`owner` stops doing `duty` (a clean stop): another daemon may take it at once."""

    # --- the fixity audit -----------------------------------------------------------------

    def published_after(self, after_id: int, limit: int, prefix: str | None = None
                        ) -> list[Product]:
        """Published rows with a published path in id order after `after_id`; with prefix,
        only those whose published path starts with it."""

    def recorded_in(self, folder: str) -> Recorded:
        """What any row or logged publish records in one folder of the products area."""

    def is_recorded(self, path: str) -> bool:
        """Whether any row or logged publish names this published path."""

    def observe_findings(self, findings: Sequence[Finding], now: float | None = None,
                         state: dict[str, Any] | None = None) -> list[Finding]:
        """Open new findings, see open ones again; `state` saved in the same commit. Returns
        the new ones."""

    def resolve_findings(self, seen_before: float, now: float | None = None,
                         state: dict[str, Any] | None = None) -> list[Finding]:
        """Open findings a full pass (started at seen_before) did not see again are resolved.
        Returns them."""

    def findings(self, open_only: bool = True, limit: int | None = None) -> list[Finding]:
        ...

    def finding_counts(self) -> dict[str, int]:
        """Open findings by kind (every kind, zero included)."""

    def audit_state(self) -> dict[str, Any]:
        """The background audit's progress (pass_started, cursor, last_pass_finished, ...)."""

    def save_audit_state(self, state: dict[str, Any]) -> None:
        ...

    # --- rebuild from the archive and staging hygiene -------------------------------------

    def insert_rebuilt(self, item: Rebuilt, now: float | None = None) -> str:
        """A row and a publish_log record for an archived product that has none: "created",
        "recorded" (a row names the path by now) or "id_taken"."""

    def rejected_before(self, before: float) -> list[Product]:
        """Rejected rows (of this node's staging area) unchanged since `before`, oldest
        first."""

    def record_quarantine(self, item: Quarantined, original_bytes: bytes) -> None:
        """A file moved into the quarantine folder; an unclaimed one leaves that list."""

    def quarantined(self, limit: int | None = None) -> list[Quarantined]:
        """Files moved into the quarantine folder, newest first."""
