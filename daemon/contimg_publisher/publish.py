"""Move one claimed product to the products area, so that no crash can lose,
truncate, duplicate or overwrite it.

The protocol, each step recoverable from what is on disk plus the row:
  1. open the staged source without following links, walking from a descriptor of
     stage_root, and check with fstat that it is the file that was registered;
  2. choose the final name: never an existing one, unless it already holds the
     same bytes (then the publish is idempotent); otherwise `<stem>.vN<suffix>`;
  3. record the final and temporary names in the row (reconciliation reads them);
  4. same filesystem: a no-replace rename (renameat2 RENAME_NOREPLACE) of the
     staged inode, which then belongs to the archive alone: nothing is ever linked,
     so no name in the staging area (or outside it) shares an inode with a product;
     a staged file with other hard links, or a folder holding one, is copied instead;
     across filesystems: copy into a temporary name created O_EXCL in the
     destination folder, hashing in the same pass, fsync, verify size and
     checksum against the registry, rename without replacing; then fsync the
     destination folder (and, after a rename, the staging folder). A FITS file
     registered from its headers alone (its checksum pending) is checked in
     that same pass (CHECKSUM/DATASUM, the declared size), its source identity
     compared before and after, and the digest recorded in the row before the
     sidecars and the product take their final names; a file that fails the
     checks loses its temporary copy and is `rejected` with the reason;
  5. commit `published` durably (synchronous=FULL);
  6. only then remove the source of a copy, file or folder, if the name still leads
     to what was published (a folder: the same bytes, hashed again).
Only the archive's own new inodes are ever chmod-ed.
A failure removes the temporary file, leaves the source alone and is recorded
with its kind; `reconcile` (its own module) resolves publishes that a crash
interrupted, and `transfer` holds the byte-level steps (copy, compare, rename).

Several claimed products can go through the protocol together (`publish_many`):
each still takes every step in order, but the durable ones are shared (one commit
for all the plans of step 3, one fsync per destination folder, one commit for all
of step 5, one fsync per staging folder after step 6).
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import os
import signal
import stat
import threading
import time
from collections.abc import Callable, Collection
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from contimg_publisher import (
    aliases,
    content,
    detect,
    fits,
    kinds,
    paths,
    space,
    transfer,
    writers,
)
from contimg_publisher.config import Config, ProductRule
from contimg_publisher.registry import (
    FailureOutcome,
    Identity,
    Product,
    Published,
    RegistryBackend,
    RegistryError,
    checksum_known,
)
from contimg_publisher.states import Attempt, Detected, FailureKind, Status, Step
from contimg_publisher.transfer import Cancelled, PublishFailure

# Test-only fault injection: the process kills itself at the named step. Read nowhere else.
CRASH_ENV = "CONTIMG_PUBLISHER_TEST_CRASH_AT"
CRASH_POINTS = ("after_sidecars", "after_temp_write", "after_rename", "after_commit",
                "before_source_removal")


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
    how: str = ""                   # copy, rename, identical, reconcile, legacy
    supersedes: str | None = None


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


def _crash_point(name: str) -> None:
    if os.environ.get(CRASH_ENV) == name:
        os.kill(os.getpid(), signal.SIGKILL)


def classify(exc: OSError) -> FailureKind:
    if exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
        return FailureKind.NO_SPACE
    if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return FailureKind.PERMISSION
    return FailureKind.OTHER


def rule_for(config: Config, data_type: str) -> ProductRule | None:
    return next((r for r in config.products if r.type == data_type), None)


def destination(config: Config, rule: ProductRule, parts: tuple[bytes, ...]
                ) -> tuple[tuple[bytes, ...], bytes]:
    """(folder components under products_root, name) where a staged product publishes."""
    base = len(rule.base.parts)
    sub = parts[base:] if len(parts) > base else parts[-1:]
    folder = tuple(os.fsencode(p) for p in rule.destination.split("/") if p) + tuple(sub[:-1])
    return folder, sub[-1]


def versioned(name: bytes, rule: ProductRule, version: int) -> bytes:
    """nightly.fits -> nightly.v2.fits (the suffix the rule's glob names is kept)."""
    if version <= 1:
        return name
    text = os.fsdecode(name)
    stem = detect.stem_of(text, rule)
    return os.fsencode(f"{stem}.v{version}{text[len(stem):]}")


def sidecar_destination(sidecar: bytes, staged_name: bytes, final_name: bytes,
                        rule: ProductRule) -> bytes:
    """The published name of a sidecar: the product's staged stem in it becomes the stem of
    the name the product publishes under (a.png -> a.v2.png beside a.v2.fits)."""
    staged_stem = detect.stem_of(os.fsdecode(staged_name), rule)
    final_stem = detect.stem_of(os.fsdecode(final_name), rule)
    return os.fsencode(os.fsdecode(sidecar).replace(staged_stem, final_stem, 1))


def joined_path(root: bytes, folder: tuple[bytes, ...], name: bytes) -> bytes:
    """The path of `name` in `folder` (its parts below `root`), as bytes."""
    return os.path.join(root, *folder, name)


class NoRoom(Exception):
    """The products filesystem lacks room for the copy (with its margin): the product waits,
    nothing is written and no attempt is counted."""


@dataclass
class _Source:
    name: bytes
    dest_name: bytes = b""
    placed: bool = False    # already at dest_name: an interrupted attempt moved it there


@dataclass
class _Job:
    """One claimed product on its way through a batch."""

    product: Product
    mode: str
    result: Result
    cancel: threading.Event | None = None
    started: float = field(default_factory=time.monotonic)
    rule: ProductRule | None = None
    kind: kinds.ProductKind = kinds.FILE
    parts: tuple[bytes, ...] = ()
    folder: tuple[bytes, ...] = ()    # destination folder under products_root
    src_parent: int = -1              # borrowed from the batch's _Folders
    src_fd: int = -1                  # owned: closed when the batch ends
    dest_fd: int = -1                 # borrowed from the batch's _Folders
    ident: Identity | None = None
    sidecars: list[_Source] = field(default_factory=list)
    final: bytes = b""
    identical: bool = False
    same_fs: bool = False             # published by a rename of the staged inode
    temp: bytes | None = None
    temp_shown: str | None = None
    token: str = ""                   # of this attempt's temporary names
    reserved: str | None = None       # the final name reserved in the registry (a folder)

    def lose(self, why: str) -> None:
        self.result.status, self.result.error = Attempt.LOST, why
        self.finish()

    def finish(self) -> None:
        self.result.seconds = time.monotonic() - self.started


class _Folders:
    """The folders one batch works in, each opened once (from descriptors of the two roots,
    without following links; paths.DirCache, holding every folder until the batch ends)
    and all closed when the batch ends, so a folder renamed or replaced between batches is
    walked afresh."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self.stage_root = os.fsencode(str(config.stage_root))
        self.products_root = os.fsencode(str(config.products_root))
        self._roots: dict[bytes, int] = {}
        self._caches: dict[bytes, paths.DirCache] = {}
        self._same: dict[tuple[tuple[bytes, ...], tuple[bytes, ...]], bool] = {}
        self._taken: dict[tuple[bytes, ...], set[bytes]] = {}
        self._in_archive: dict[tuple[bytes, ...], bool] = {}

    def _cache(self, root: bytes, create_mode: int | None = None) -> paths.DirCache:
        cache = self._caches.get(root)
        if cache is None:
            fd = self._roots[root] = paths.open_root(root)
            cache = self._caches[root] = paths.DirCache(fd, limit=None,
                                                        create_mode=create_mode)
        return cache

    def source(self, folder: tuple[bytes, ...]) -> int:
        return self._cache(self.stage_root).folder(folder, verify=False)

    def source_in_archive(self, folder: tuple[bytes, ...]) -> bool:
        """Whether a staging folder lies inside the products area by device and inode (a
        bind mount or another alias made since the configuration was checked): nothing in
        it is ever renamed or removed."""
        if folder not in self._in_archive:
            self._in_archive[folder] = staged_in_archive(self.source(folder),
                                                         self.products_root)
        return self._in_archive[folder]

    def destination(self, folder: tuple[bytes, ...]) -> int:
        if self.products_root not in self._caches:
            os.makedirs(self.products_root, mode=self.config.dir_mode, exist_ok=True)
        return self._cache(self.products_root, self.config.dir_mode).folder(folder,
                                                                             verify=False)

    def same_filesystem(self, source: tuple[bytes, ...], destination: tuple[bytes, ...]
                        ) -> bool:
        key = (source, destination)
        if key not in self._same:
            self._same[key] = paths.same_filesystem(self.source(source),
                                                    self.destination(destination))
        return self._same[key]

    def taken(self, folder: tuple[bytes, ...]) -> set[bytes]:
        """Names in a destination folder that products of this batch are going to take."""
        return self._taken.setdefault(folder, set())

    def close(self) -> None:
        for cache in self._caches.values():
            cache.close()
        for fd in self._roots.values():
            os.close(fd)
        self._caches.clear()
        self._roots.clear()


class _Reservation:
    """The final names one folder product's publish reserves in the registry while it
    chooses its name (RegistryBackend.reserve_name): the one it got, and those that other
    products' publishes held."""

    def __init__(self, registry: RegistryBackend, owner: str, product: Product, root: bytes,
                 folder: tuple[bytes, ...]) -> None:
        self.registry, self.owner, self.product = registry, owner, product
        self.root, self.folder = root, folder
        self.mine: str | None = None
        self.refused: list[tuple[str, str]] = []  # (published path, the holder's data_id)

    def take(self, name: bytes) -> bool:
        path = paths.display(joined_path(self.root, self.folder, name))
        holder = self.registry.reserve_name(path, self.product.data_id, self.owner,
                                            token=self.product.claim_token)
        if holder is None:
            self.mine = path
            return True
        self.refused.append((path, holder))
        return False


class Publisher:
    """Publishes claimed rows; one instance per thread (it uses that thread's Registry)."""

    def __init__(self, config: Config, registry: RegistryBackend, owner: str,
                 log: Any = None, gate: writers.WriterGate | None = None) -> None:
        self.config = config
        self.registry = registry
        self.owner = owner
        self.log = log
        self.gate = gate if gate is not None else writers.WriterGate()
        # When the claims in hand were last known to hold (claimed, or a lease renewed):
        # with a shared registry, a batch stops once that is a lease ago (_keep_lease).
        self._renewed_at = time.monotonic()
        self._batch: list[Product] = []  # the rows of the batch in hand (_renew_rest)
        self._rest_renewed_at = time.monotonic()

    def _no_writer(self, fd: int, path: bytes, shown: str,
                   kind: kinds.ProductKind = kinds.FILE) -> None:
        """Right before a final rename: a writer that appeared since registration would
        write into the archive (a rename) or has bytes the copy lacks."""
        if kind.written(self.gate, fd, path):
            raise PublishFailure(
                FailureKind.SOURCE_CHANGED, f"{shown}: open for writing by another "
                "process; it is examined again once the writer is done")

    def _warn(self, event: str, **fields: Any) -> None:
        if self.log is not None:
            self.log.warning(event, **fields)

    def publish(self, product: Product, mode: str = "auto",
                cancel: threading.Event | None = None) -> Result:
        """Publish one row this process has claimed; failures are recorded, not raised."""
        return self.publish_many([product], mode, cancel)[0]

    def publish_many(self, products: list[Product], mode: str = "auto",
                     cancel: threading.Event | None = None,
                     stop: threading.Event | None = None) -> list[Result]:
        """Publish rows this process has claimed, grouping the durable steps.

        Every product goes through every step of the protocol, in order; the steps are only
        shared: one commit records all publish plans, one fsync per destination folder makes
        all links durable, one commit records all publishes, and one fsync per staging
        folder makes the removals durable. A crash anywhere leaves each row exactly where a
        crash of a single publish would, so reconciliation is the same.

        `stop` ends the batch early: the product being placed is finished, the rest go back
        to waiting (a shutdown that does not wait for a whole batch); `cancel` also stops
        the copy in hand.
        """
        folders = _Folders(self.config)
        self._renewed_at = self._rest_renewed_at = time.monotonic()  # just claimed
        self._batch = list(products)
        jobs = [_Job(p, mode, Result(p.data_id, p.data_type, Attempt.RETRY_DUE, p.stage_path),
                     cancel)
                for p in products]
        try:
            ready = [job for job in jobs if self._attempt(job, folders, self._prepare)]
            self.registry.check_identity()  # nothing is moved on a registry nobody reads
            with self.registry.write():  # one durable commit for every plan
                planned = {job.product.data_id for job in ready if not job.identical and
                           self.registry.set_publish_plan(
                               self.owner, job.product.data_id,
                               job.result.published_path or "", job.temp_shown,
                               [os.fsdecode(s.dest_name) for s in job.sidecars],
                               token=job.product.claim_token)}
            placed: list[_Job] = []
            for index, job in enumerate(ready):
                if not job.identical and job.product.data_id not in planned:
                    job.lose("the claim on this product was lost before the publish")
                    continue
                try:
                    if stop is not None and stop.is_set():
                        raise Cancelled
                    self._keep_lease(job.product)
                    if self._attempt(job, folders, self._place):
                        placed.append(job)
                except Cancelled:
                    with self.registry.write():  # one commit gives the rest back
                        for left in ready[index:]:
                            if not left.identical and left.product.data_id not in planned:
                                left.lose("the claim on this product was lost before the "
                                          "publish")
                                continue
                            if not self.registry.requeue(left.product.data_id, self.owner,
                                                         token=left.product.claim_token):
                                left.lose("the claim on this product was lost before the "
                                          "publish")
                                continue
                            self._release(left)
                            left.result.status = Attempt.REQUEUED
                            left.result.error = "stopped before the publish finished"
                            left.finish()
                    break
            placed = self._sync_destinations(placed, folders)
            if any(not job.identical for job in placed):
                _crash_point("after_rename")
            self._commit(placed, folders)
        finally:
            for job in jobs:
                if job.src_fd >= 0:
                    os.close(job.src_fd)
            folders.close()
        return [job.result for job in jobs]

    def _attempt(self, job: _Job, folders: _Folders,
                 step: Callable[[_Job, _Folders], None]) -> bool:
        """Run one step of one product; a failure is recorded against that product only."""
        try:
            step(job, folders)
            return True
        except PublishFailure as exc:
            self._fail(job, exc.kind, str(exc))
        except NoRoom as exc:
            self._defer(job, str(exc))
        except content.Rejected as exc:
            self._reject(job, str(exc))
        except paths.UnsafePath as exc:
            self._fail(job, FailureKind.SOURCE_CHANGED, f"{exc.path}: {exc.reason}")
        except OSError as exc:
            self._fail(job, classify(exc), transfer.os_text(exc))
        return False

    def _fail(self, job: _Job, kind: FailureKind, text: str) -> None:
        cfg, result = self.config, job.result
        result.kind, result.error = kind, text
        result.failure = self.registry.record_failure(
            job.product.data_id, self.owner, kind, text, cfg.max_attempts,
            cfg.backoff_initial_seconds, cfg.backoff_max_seconds, cfg.error_max_chars,
            token=job.product.claim_token)
        if result.failure is None:
            result.status = Attempt.LOST
        else:
            result.status = Attempt.EXHAUSTED if result.failure.exhausted else Attempt.RETRY_DUE
        self._release(job)
        job.finish()

    def _defer(self, job: _Job, reason: str) -> None:
        """Given back before anything was written, due again after the initial backoff;
        not a failure of the product."""
        result = job.result
        result.error = reason
        due = self.registry.clock() + self.config.backoff_initial_seconds
        result.status = Attempt.DEFERRED if self.registry.requeue(
            job.product.data_id, self.owner, token=job.product.claim_token, due_at=due) \
            else Attempt.LOST
        self._release(job)
        job.finish()

    def _reject(self, job: _Job, reason: str) -> None:
        """The product is not publishable (found by the publish's read): `rejected` with
        the reason, as detection would have recorded it."""
        result = job.result
        result.error = f"{job.product.stage_path}: {reason}"
        result.status = Attempt.REJECTED if self.registry.reject_claimed(
            job.product.data_id, self.owner, reason, self.config.error_max_chars,
            token=job.product.claim_token) \
            else Attempt.LOST
        self._release(job)
        job.finish()

    def _release(self, job: _Job) -> None:
        """The attempt ends without its product at the reserved name: the name goes back.
        Best effort: a reservation left behind is released by reconciliation, and one whose
        name this product did take (a folder fsync that failed) guards nothing the disk
        does not (a name that exists is never chosen)."""
        if job.reserved is None:
            return
        with contextlib.suppress(RegistryError):
            self.registry.release_name(job.reserved, job.product.data_id,
                                       token=job.product.claim_token)
        job.reserved = None

    def _prepare(self, job: _Job, folders: _Folders) -> None:
        """Steps 1 and 2: open and check the source, choose the final name."""
        cfg, product, result = self.config, job.product, job.result
        job.started = time.monotonic()
        rule = rule_for(cfg, product.data_type)
        if rule is None:
            raise PublishFailure(
                FailureKind.OTHER, f"no product rule for type {product.data_type!r} "
                "in the configuration")
        if product.checksum is None or product.identity is None:
            raise PublishFailure(
                FailureKind.SOURCE_CHANGED, "the product has not been described yet")
        job.rule, job.kind = rule, kinds.of(rule)
        parts = job.parts = paths.relative_components(folders.stage_root, product.stage_bytes)
        folder, name = destination(cfg, rule, parts)
        job.folder = folder
        try:
            job.src_parent = folders.source(parts[:-1])
            job.src_fd = os.open(parts[-1], job.kind.open_flags, dir_fd=job.src_parent)
        except FileNotFoundError:
            raise PublishFailure(FailureKind.SOURCE_MISSING,
                                 f"{product.stage_path}: no longer in the staging area") from None
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                raise PublishFailure(FailureKind.SOURCE_CHANGED, f"{product.stage_path}: "
                                     "replaced by a symbolic link") from None
            if exc.errno == errno.ENOTDIR:
                raise PublishFailure(FailureKind.SOURCE_CHANGED, f"{product.stage_path}: "
                                     "is no longer a folder") from None
            raise
        st = os.fstat(job.src_fd)
        job.ident = Identity.of(st)
        if not job.kind.is_type(st.st_mode) or not job.kind.same(product.identity, job.ident):
            raise PublishFailure(
                FailureKind.SOURCE_CHANGED, f"{product.stage_path}: changed since it "
                "was registered; it will be examined again")
        if folders.source_in_archive(parts[:-1]):  # before any folder is made there
            raise PublishFailure(
                FailureKind.OTHER, f"{product.stage_path}: its staging folder lies inside the "
                f"products area {paths.display(folders.products_root)} by device and inode (a "
                "bind mount or another alias of it); nothing there is moved or removed. Remove "
                "the alias, then retry")
        try:
            job.dest_fd = folders.destination(folder)
        except paths.UnsafePath as exc:
            # The products side, not the product: an attempt that counts, with backoff.
            raise PublishFailure(FailureKind.OTHER, f"destination {exc.path} under "
                                 f"{paths.display(folders.products_root)}: {exc.reason}"
                                 ) from None
        job.sidecars = self._sidecars(job.src_parent, name, parts[-1], rule)
        job.token = paths.temp_token(self.config.node_name, product.id)
        reservation = _Reservation(self.registry, self.owner, product, folders.products_root,
                                   folder) if job.kind.reserves_name else None
        final, version, job.identical = self._choose_name(
            job.src_parent, job.dest_fd, name, rule, product, job.sidecars,
            folders.taken(folder), reservation)
        job.final = final
        job.reserved = reservation.mine if reservation is not None else None
        folders.taken(folder).add(final)
        for sc in job.sidecars:
            sc.dest_name = sidecar_destination(sc.name, parts[-1], final, rule)
        final_path = paths.display(joined_path(folders.products_root, folder, final))
        result.published_path = final_path
        if reservation is not None:
            for path, holder_id in reservation.refused:
                self._warn("name_reserved", data_id=product.data_id,
                           data_type=product.data_type, stage_path=product.stage_path,
                           published_path=final_path, existing=path, holder=holder_id,
                           reason="another product's publish reserved this name first "
                                  "(in the registry, before its rename); publishing as "
                                  f"version {version}")
        if version > 1:
            previous = paths.display(joined_path(folders.products_root, folder,
                                           versioned(name, rule, version - 1)))
            holder = self.registry.by_published_path(previous)
            reserved_by = dict(reservation.refused).get(previous) if reservation else None
            result.supersedes = holder.data_id if holder else reserved_by
            self._warn("name_taken", data_id=product.data_id, data_type=product.data_type,
                       stage_path=product.stage_path, published_path=final_path,
                       existing=previous,
                       reason="a different product already has this name; "
                              f"publishing as version {version}")
        job.sidecars += _already_placed(job.dest_fd, job.src_parent, parts[-1], final, rule,
                                        product, job.sidecars)
        if job.identical:
            return
        job.same_fs = folders.same_filesystem(parts[:-1], folder)
        if job.same_fs and job.kind.linked_elsewhere(job.src_fd, st):
            job.same_fs = False
            self._warn("hard_linked_source", data_id=product.data_id,
                       data_type=product.data_type, stage_path=product.stage_path,
                       links=st.st_nlink,
                       reason="the staged file (or a file in the folder) has other hard "
                              "links; it is copied, so the archive gets its own inode and "
                              "the other names are left as they are")
        if not job.same_fs:
            self._check_room(job)
            job.temp = paths.temp_name(final, job.token)
            job.temp_shown = paths.display(joined_path(folders.products_root, folder, job.temp))

    def _check_room(self, job: _Job) -> None:
        """Before a copy: the product and its sidecars, plus the margin, fit (statvfs)."""
        needed = job.product.size_bytes or 0
        for sc in job.sidecars:
            with contextlib.suppress(OSError):
                needed += os.stat(sc.name, dir_fd=job.src_parent, follow_symlinks=False).st_size
        shortfall = space.Room.of(os.fstatvfs(job.dest_fd)).shortfall(
            needed, self.config.min_free_bytes)
        if shortfall is not None:
            raise NoRoom(f"{job.product.stage_path}: {shortfall}")

    def _place(self, job: _Job, _folders: _Folders) -> None:
        """Step 4: put the product at its final name (not yet durable)."""
        result, rule = job.result, job.rule
        assert rule is not None
        if job.identical:
            result.how = "identical"
            return
        if job.same_fs:
            result.how = self._move_same_fs(job, rule)
            return
        assert job.temp is not None
        result.how = "copy"
        temps = [job.temp]
        try:
            result.bytes = self._copy(job, temps)
            temps.clear()
        finally:
            for temp in temps:
                with contextlib.suppress(OSError):
                    paths.remove_tree_under(job.dest_fd, temp)

    def _sync_destinations(self, placed: list[_Job], folders: _Folders) -> list[_Job]:
        """fsync each destination folder once; the products of a folder that cannot be
        synced fail (their names stay, and a retry finds them identical)."""
        failed: dict[tuple[bytes, ...], OSError] = {}
        for folder in dict.fromkeys(job.folder for job in placed if not job.identical):
            try:
                paths.fsync_dir(folders.destination(folder))
            except OSError as exc:
                failed[folder] = exc
        # A rename took a name from a staging folder too; made durable before the commit,
        # so after a power cut the product is at one of its two names, never at both.
        synced: dict[int, OSError | None] = {}  # staging folder descriptor -> its fsync
        for job in placed:
            if job.same_fs and job.folder not in failed:
                if job.src_parent not in synced:
                    try:
                        paths.fsync_dir(job.src_parent)
                        synced[job.src_parent] = None
                    except OSError as exc:
                        synced[job.src_parent] = exc
                if (sync_failure := synced[job.src_parent]) is not None:
                    failed[job.folder] = sync_failure
        kept = []
        for job in placed:
            sync_error = failed.get(job.folder) if not job.identical else None
            if sync_error is None:
                kept.append(job)
            else:
                self._fail(job, classify(sync_error), transfer.os_text(sync_error))
        return kept

    def _commit(self, placed: list[_Job], folders: _Folders) -> None:
        """Steps 5 and 6: one durable commit, then the sources go, one fsync per folder."""
        self.registry.check_identity()  # the commit below lets the sources go
        now = time.time()  # published_at: the time of the one commit that records them all
        with self.registry.write():  # one durable commit for every publish
            done = {job.product.data_id for job in placed if self.registry.mark_published(
                Published(job.product.data_id, job.result.published_path or "", job.mode,
                          tuple(os.fsdecode(s.dest_name) for s in job.sidecars),
                          job.result.supersedes), self.owner, now,
                token=job.product.claim_token)}
        published = []
        for job in placed:
            if job.product.data_id in done:
                job.result.status = Attempt.PUBLISHED
                published.append(job)
            else:
                job.lose("the claim on this product was lost before the commit")
        if not published:
            return
        _crash_point("after_commit")
        touched: dict[tuple[bytes, ...], int] = {}
        for job in published:
            assert job.rule is not None and job.ident is not None
            try:
                if self._remove_source(job.src_parent, job.parts[-1], job.ident, job.rule,
                                       job.sidecars, job.dest_fd, job.product.checksum,
                                       sync=False):
                    touched[job.parts[:-1]] = job.src_parent
            except OSError as exc:
                self._warn("source_not_removed", data_id=job.product.data_id,
                           stage_path=job.product.stage_path, error=transfer.os_text(exc),
                           reason="published; the staged copy is removed on a later pass")
            job.finish()
        for folder, fd in touched.items():
            try:
                paths.fsync_dir(fd)
            except OSError as exc:
                self._warn("source_not_removed", stage_path=paths.display(
                    os.path.join(folders.stage_root, *folder)), error=transfer.os_text(exc),
                    reason="the removal may not be durable; a later pass removes the copy")

    def _sidecars(self, src_parent: int, product_name: bytes, staged_name: bytes,
                  rule: ProductRule) -> list[_Source]:
        """Sidecars present beside the staged product (regular files only)."""
        out = []
        for sidecar in detect.sidecar_names(os.fsdecode(staged_name), rule):
            raw = os.fsencode(sidecar)
            try:
                st = os.stat(raw, dir_fd=src_parent, follow_symlinks=False)
            except FileNotFoundError:
                continue
            if stat.S_ISREG(st.st_mode):
                out.append(_Source(raw))
            else:
                self._warn("sidecar_skipped", sidecar=paths.display(raw),
                           reason=f"is {paths.type_name(st.st_mode)}, not a regular file")
        return out

    def _choose_name(self, src_parent: int, dest_fd: int, name: bytes, rule: ProductRule,
                     product: Product, sidecars: list[_Source],
                     taken: Collection[bytes] = (),
                     reservation: _Reservation | None = None) -> tuple[bytes, int, bool]:
        """The first of name, name.v2, ... that is free or already holds these bytes.

        A name is free when neither it nor its sidecars' names exist, or when the sidecars
        there hold exactly the staged sidecars' bytes: an interrupted attempt of this same
        product moved them first (they go before the product, so that a product never
        appears without them). With a reservation (a folder product), a free name must also
        be reserved in the registry for this product: one that another product's publish
        reserved first is taken, though nothing is there yet."""
        for version in range(1, 10_000):
            candidate = versioned(name, rule, version)
            if candidate in taken:
                continue
            if not transfer.exists(dest_fd, candidate):
                if all(transfer.files_equal_across(src_parent, s.name, dest_fd,
                                           sidecar_destination(s.name, name, candidate, rule))
                       for s in sidecars
                       if transfer.exists(dest_fd,
                                          sidecar_destination(s.name, name, candidate, rule))):
                    if reservation is not None and not reservation.take(candidate):
                        continue
                    return candidate, version, False
                continue
            if kinds.of(rule).same_content(dest_fd, candidate, product.size_bytes,
                                           product.checksum):
                return candidate, version, True
        raise PublishFailure(
            FailureKind.OTHER, f"{paths.display(name)}: 10,000 versions already exist")

    def _move_same_fs(self, job: _Job, rule: ProductRule) -> str:
        """Rename the staged inodes into the archive, sidecars first so that a product never
        appears without them; each is checked after its rename to be the inode that was
        opened, and only then chmod-ed (it has no other name by then). A product whose
        checksum is still pending (registered for a copy to another filesystem, which the
        products area no longer is) is read and checked first, as the copy would have."""
        cfg = self.config
        name = job.parts[-1]
        if not checksum_known(job.product.checksum):
            try:
                checked = transfer.read_all(job.src_fd, self._algorithm(job.product),
                                            job.product.size_bytes, None, job.cancel,
                                            self._renewer(job.product))
            except fits.FitsError as exc:
                raise self._refusal(job, exc) from None
            self._judge(job, checked)
        for sc in job.sidecars:
            if not sc.placed:
                self._move_sidecar(job, sc)
        _crash_point("after_sidecars")
        self._no_writer(job.src_fd, job.product.stage_bytes, job.product.stage_path, job.kind)
        try:
            transfer.rename_checked(job.src_parent, name, job.src_fd, job.dest_fd, job.final,
                                    job.product.stage_path)
        except FileExistsError:
            raise _name_lost(job) from None
        job.kind.after_rename(job.dest_fd, job.final, job.src_fd, cfg.file_mode, cfg.dir_mode)
        return "rename"

    def _move_sidecar(self, job: _Job, sc: _Source) -> None:
        """One sidecar on one filesystem: renamed when it has no other name, else copied."""
        fd = os.open(sc.name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK,
                     dir_fd=job.src_parent)
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise PublishFailure(
                    FailureKind.SOURCE_CHANGED, f"sidecar {paths.display(sc.name)}: "
                    "is no longer a regular file")
            if st.st_nlink != 1:
                self._copy_sidecar(job, sc, fd, "sha256", None)
                return
            self._no_writer(fd, os.path.join(os.fsencode(str(self.config.stage_root)),
                                             *job.parts[:-1], sc.name), paths.display(sc.name))
            try:
                transfer.rename_checked(job.src_parent, sc.name, fd, job.dest_fd, sc.dest_name,
                                paths.display(sc.name))
            except FileExistsError:
                # The same bytes are there already (_choose_name made sure); the staged
                # copy goes with the source.
                return
            os.fchmod(fd, self.config.file_mode)
            sc.placed = True
        finally:
            os.close(fd)

    def _algorithm(self, product: Product) -> str:
        return (product.checksum or "sha256:").split(":", 1)[0]

    def _lease_lost(self, product: Product, reason: str, error: str | None = None) -> None:
        """The claims in hand no longer hold: said once (`lease_lost`, naming the product in
        hand) and Cancelled, so the product is not placed nor committed and its staged
        file stays; the rest of the batch is given back (see publish_many)."""
        self._warn("lease_lost", data_id=product.data_id, data_type=product.data_type,
                   stage_path=product.stage_path, reason=reason, error=error,
                   lease_seconds=self.config.lease_seconds,
                   seconds_since_renewal=round(time.monotonic() - self._renewed_at, 1),
                   action="the product stays in staging; the rest of the batch goes back "
                          "to waiting once the registry can be written")
        raise Cancelled(f"lease lost: {reason}")

    def _renew(self, product: Product) -> None:
        """Renew the lease of the batch (through the product in hand). With a shared
        registry, a claim that is no longer this one (taken by another claim, or resolved
        as dead) and a lease not renewed for a whole lease are a lost lease: another node
        may hold the rows by now."""
        try:
            renewed = self.registry.renew_lease(product.data_id, self.owner,
                                                self.config.lease_seconds,
                                                token=product.claim_token)
        except RegistryError as exc:
            if self.registry.shared and \
                    time.monotonic() - self._renewed_at >= self.config.lease_seconds:
                self._lease_lost(product, f"the lease could not be renewed for "
                                 f"{self.config.lease_seconds:g} s", str(exc))
            raise
        if renewed:
            self._renewed_at = time.monotonic()
            self._renew_rest(product)
        elif self.registry.shared:
            self._lease_lost(product, "the claim is no longer this process's: the row was "
                             "claimed again or resolved as an abandoned publish")

    def _renew_rest(self, product: Product) -> None:
        """With a shared registry, the batch's other rows keep their lease too, once half
        of it has gone by (one transaction): a row further down a batch that outlasts the
        lease would otherwise expire, and another daemon of this node would claim it again
        and copy it for nothing (its writes are fenced, the copy is wasted). Rows already
        done are no longer this claim's and are left as they are."""
        if not self.registry.shared or \
                time.monotonic() - self._rest_renewed_at < self.config.lease_seconds / 2:
            return
        with contextlib.suppress(RegistryError), self.registry.write():
            for other in self._batch:
                if other.data_id != product.data_id:
                    self.registry.renew_lease(other.data_id, self.owner,
                                              self.config.lease_seconds,
                                              token=other.claim_token)
            self._rest_renewed_at = time.monotonic()

    def _keep_lease(self, product: Product) -> None:
        """Before each product of a batch, with a shared registry: the lease is renewed once
        half of it has gone by, and the batch stops when it cannot be for a whole lease."""
        if not self.registry.shared or \
                time.monotonic() - self._renewed_at < self.config.lease_seconds / 2:
            return
        with contextlib.suppress(RegistryError):  # tried again before the next product
            self._renew(product)

    def _renewer(self, product: Product) -> Callable[[], None]:
        """The lease renewal a long read runs about once a second."""
        warned: list[str] = []

        def renew() -> None:
            # A registry that cannot be written for a while (another process holding the
            # write lock, a full disk) does not stop the copy: under the single-writer lock
            # nobody else can take the claim, and the commit checks it anyway.
            try:
                self._renew(product)
            except RegistryError as exc:
                if not warned:
                    warned.append(str(exc))
                    self._warn("lease_not_renewed", data_id=product.data_id,
                               stage_path=product.stage_path, error=str(exc),
                               reason="the copy goes on; the commit checks the claim")
        return renew

    def _copy(self, job: _Job, temps: list[bytes]) -> int:
        """The product into its temporary name, in the one read that hashes it (and checks
        a FITS file registered without its data), judged against the registry; then the
        sidecars to their final names, so that the product's own rename is the last step
        and a product never appears without its sidecars, nor a sidecar for a product that
        turned out not to be publishable."""
        cfg, product = self.config, job.product
        assert job.temp is not None
        algorithm = self._algorithm(product)
        renew = self._renewer(product)
        kind = job.kind
        fits_size = None if checksum_known(product.checksum) else product.size_bytes
        try:
            copied = kind.copy(job.src_fd, job.dest_fd, job.temp, algorithm, fits_size,
                               cfg.file_mode, cfg.dir_mode, job.cancel, renew)
        except fits.FitsError as exc:
            raise self._refusal(job, exc) from None
        paths.fsync_dir(job.dest_fd)
        _crash_point("after_temp_write")
        self._judge(job, copied)
        for sc in job.sidecars:
            if sc.placed:
                continue
            fd = os.open(sc.name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC,
                         dir_fd=job.src_parent)
            try:
                self._copy_sidecar_to(fd, job.dest_fd, sc, product, algorithm, temps,
                                      job.cancel, renew, job.token)
            finally:
                os.close(fd)
        _crash_point("after_sidecars")
        self._no_writer(job.src_fd, product.stage_bytes, product.stage_path, kind)
        try:
            paths.rename_noreplace(job.dest_fd, job.temp, job.dest_fd, job.final)
        except FileExistsError:
            raise _name_lost(job) from None
        return copied.size

    def _changed(self, job: _Job) -> PublishFailure | None:
        """A source that is no longer the registered file, unchanged (its identity after
        the read): examined again, never published on this read."""
        product = job.product
        now = Identity.of(os.fstat(job.src_fd))
        if product.identity is not None and job.kind.same(product.identity, now):
            return None
        return PublishFailure(FailureKind.SOURCE_CHANGED, f"{product.stage_path}: changed "
                              "while being copied; it will be examined again")

    def _refusal(self, job: _Job, error: fits.FitsError) -> Exception:
        """What to raise for a FITS check that failed in the read: a source that changed
        (or a read that ran short because it did) is examined again; otherwise the file
        is not publishable, rejected with the reason that names the HDU."""
        changed = self._changed(job)
        if changed is not None:
            return changed
        if error.reason == fits.CHANGED:
            return PublishFailure(FailureKind.SOURCE_CHANGED, f"{job.product.stage_path}: "
                                  "changed while being copied; it will be examined again")
        return content.Rejected(f"invalid FITS: {error.reason}")

    def _judge(self, job: _Job, read: transfer.Copied) -> None:
        """The product's read, against the registry: a source that changed since
        registration is examined again; bytes that differ from a registered digest are a
        verify_mismatch. A digest that was pending is recorded now, durably, before
        anything takes the product's final name (reconciliation checks that name
        against it)."""
        product = job.product
        changed = self._changed(job)
        if changed is not None:
            raise changed
        known = checksum_known(product.checksum)
        st = os.fstat(job.src_fd)
        if job.kind.size_to_verify(st, read.size) != product.size_bytes or \
                (known and read.checksum != product.checksum):
            raise PublishFailure(FailureKind.VERIFY_MISMATCH,
                                 f"copy of {product.stage_path} does not match the registry: "
                                 f"{read.size} bytes {read.checksum}, expected "
                                 f"{product.size_bytes} bytes {product.checksum}")
        if known:
            return
        checks = read.fits.fits_checksums if read.fits is not None else None
        if not self.registry.record_checksum(product.data_id, self.owner, read.checksum,
                                             checks, token=product.claim_token):
            raise PublishFailure(FailureKind.OTHER,
                                 "the claim on this product was lost during its copy")
        job.product = dataclasses.replace(product, checksum=read.checksum)

    def _copy_sidecar(self, job: _Job, sc: _Source, fd: int, algorithm: str,
                      cancel: threading.Event | None) -> None:
        temps: list[bytes] = []
        try:
            self._copy_sidecar_to(fd, job.dest_fd, sc, job.product, algorithm, temps, cancel,
                                  lambda: None, job.token)
        finally:
            for temp in temps:
                with contextlib.suppress(OSError):
                    paths.remove_tree_under(job.dest_fd, temp)

    def _copy_sidecar_to(self, fd: int, dest_fd: int, sc: _Source, product: Product,
                         algorithm: str, temps: list[bytes], cancel: threading.Event | None,
                         tick: Callable[[], None], token: str = "") -> None:
        """A sidecar through a temporary name to its final name, never replacing one; its
        temporary name carries the attempt's token (that of the product's own temporary
        name, which the row records), so that a sweep by another daemon of this node
        knows it for a live publish's."""
        sc_temp = paths.temp_name(sc.dest_name, token or
                                  paths.temp_token(self.config.node_name, product.id))
        temps.append(sc_temp)
        transfer.copy_file(fd, dest_fd, sc_temp, algorithm, self.config.file_mode, cancel, tick)
        self._no_writer(fd, os.path.join(os.path.dirname(product.stage_bytes), sc.name),
                        paths.display(sc.name))
        try:
            paths.rename_noreplace(dest_fd, sc_temp, dest_fd, sc.dest_name)
        except FileExistsError:
            # Left by an interrupted attempt of this same product: keep the copy that
            # is already there when it holds the same bytes.
            if not transfer.files_equal(dest_fd, sc_temp, sc.dest_name, algorithm):
                raise PublishFailure(FailureKind.OTHER, f"sidecar {paths.display(sc.dest_name)} "
                                     "exists with other content") from None
            paths.remove_tree_under(dest_fd, sc_temp)
        temps.remove(sc_temp)

    def _remove_source(self, src_parent: int, name: bytes, ident: Identity, rule: ProductRule,
                       sidecars: list[_Source], dest_fd: int, checksum: str | None,
                       sync: bool = True) -> bool:
        """Remove the staged copy, only if the name still leads to what was published (a
        folder: the same inode, and the same bytes hashed again). Returns whether anything
        was removed; with sync False the caller fsyncs the folder."""
        _crash_point("before_source_removal")
        removed = False
        try:
            st = os.stat(name, dir_fd=src_parent, follow_symlinks=False)
        except FileNotFoundError:
            st = None  # renamed into the archive
        # A file must be unchanged too (size and mtime): one written to in place after its
        # copy holds bytes the archive does not, and an inode number can be reused.
        kind = kinds.of(rule)
        if st is not None and kind.same(ident, Identity.of(st)) and \
                kind.remove_staged(src_parent, name, st.st_mode, checksum):
            removed = True
        for sc in sidecars:
            if sc.placed:
                continue
            with contextlib.suppress(FileNotFoundError):
                if transfer.files_equal_across(src_parent, sc.name, dest_fd, sc.dest_name):
                    os.unlink(sc.name, dir_fd=src_parent)
                    removed = True
        if removed and sync:
            paths.fsync_dir(src_parent)
        return removed

    def remove_leftover(self, product: Product) -> Tidied:
        """A published product's staged copy is still there: left by a crash before step 6
        (the same inode), or written again with the same bytes (a new inode). Removed only
        when proven identical: the same inode, or the same bytes hashed again on both sides."""
        cfg = self.config
        rule = rule_for(cfg, product.data_type)
        if rule is None or product.identity is None or not product.published_path:
            return Tidied.KEPT
        stage_root = os.fsencode(str(cfg.stage_root))
        parts = paths.relative_components(stage_root, product.stage_bytes)
        published = paths.undisplay(product.published_path)
        if not os.path.lexists(published):
            return Tidied.KEPT
        with _StagedAndPublished(stage_root, parts, published,
                                 os.fsencode(str(cfg.products_root))) as where:
            if where.src_parent < 0:
                return Tidied.KEPT
            final = os.path.basename(published)
            sidecars = [
                _Source(sc.name, sidecar_destination(sc.name, parts[-1], final, rule))
                for sc in self._sidecars(where.src_parent, parts[-1], parts[-1], rule)
            ] if kinds.of(rule).has_sidecars else []
            before = transfer.exists(where.src_parent, parts[-1])
            self._remove_source(where.src_parent, parts[-1], product.identity, rule, sidecars,
                                where.dest_fd, product.checksum)
            if before and not transfer.exists(where.src_parent, parts[-1]):
                return Tidied.REMOVED
            if before and kinds.of(rule) is kinds.FILE and transfer.rerun_identical(
                    where.src_parent, parts[-1], where.dest_fd, final, product.checksum):
                paths.fsync_dir(where.src_parent)
                return Tidied.IDENTICAL_REMOVED
            return Tidied.KEPT

    def publish_late_sidecars(self, product: Product) -> list[tuple[str, Tidied, str]]:
        """Sidecars that arrived after their product was published go beside it, under the
        name it was published as; one already there with the same bytes only loses its
        staged copy; one there with other bytes is kept in staging, with the reason.
        Returns (staged sidecar, what was done, why) for each."""
        cfg = self.config
        rule = rule_for(cfg, product.data_type)
        if rule is None or not kinds.of(rule).has_sidecars or not product.published_path:
            return []
        stage_root = os.fsencode(str(cfg.stage_root))
        parts = paths.relative_components(stage_root, product.stage_bytes)
        published = paths.undisplay(product.published_path)
        final = os.path.basename(published)
        out: list[tuple[str, Tidied, str]] = []
        with _StagedAndPublished(stage_root, parts, published,
                                 os.fsencode(str(cfg.products_root))) as where:
            if where.src_parent < 0 or where.dest_fd < 0:
                return []
            job = _Job(product, "auto", Result(product.data_id, product.data_type,
                                               Attempt.PUBLISHED,
                                               product.stage_path), dest_fd=where.dest_fd,
                       src_parent=where.src_parent, parts=parts)
            placed: list[_Source] = []
            for sc in self._sidecars(where.src_parent, parts[-1], parts[-1], rule):
                sc.dest_name = sidecar_destination(sc.name, parts[-1], final, rule)
                shown = paths.display(os.path.join(stage_root, *parts[:-1], sc.name))
                if transfer.exists(where.dest_fd, sc.dest_name):
                    if transfer.files_equal_across(where.src_parent, sc.name, where.dest_fd,
                                           sc.dest_name):
                        os.unlink(sc.name, dir_fd=where.src_parent)
                        out.append((shown, Tidied.IDENTICAL_REMOVED,
                                    "the same bytes are already archived beside the product"))
                    else:
                        out.append((shown, Tidied.KEPT,
                                    f"a different {paths.display(sc.dest_name)} is already "
                                    "archived beside the product"))
                    continue
                if paths.same_filesystem(where.src_parent, where.dest_fd):
                    self._move_sidecar(job, sc)
                else:
                    fd = os.open(sc.name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC,
                                 dir_fd=where.src_parent)
                    try:
                        self._copy_sidecar(job, sc, fd, cfg.checksum_algorithm, None)
                    finally:
                        os.close(fd)
                placed.append(sc)
                there = os.path.join(os.path.dirname(published), sc.dest_name)
                out.append((shown, Tidied.PUBLISHED, f"published as {paths.display(there)}"))
            if placed:
                paths.fsync_dir(where.dest_fd)
                paths.fsync_dir(where.src_parent)
                self.registry.add_sidecars(product.data_id,
                                           [os.fsdecode(sc.dest_name) for sc in placed])
                # A copy leaves its staged name until the record is durable.
                for sc in placed:
                    with contextlib.suppress(FileNotFoundError):
                        if not sc.placed and transfer.files_equal_across(
                                where.src_parent, sc.name, where.dest_fd, sc.dest_name):
                            os.unlink(sc.name, dir_fd=where.src_parent)
            if out:
                paths.fsync_dir(where.src_parent)
        return out

    def tidy(self, outcome: detect.Outcome) -> list[tuple[str, dict[str, Any]]]:
        """What a detection outcome leaves to clean up in staging, done; returns the events
        to log (name, fields). Shared by the daemon's loop and `scan`."""
        product = outcome.product
        if product is None:
            return []
        events: list[tuple[str, dict[str, Any]]] = []
        try:
            if outcome.action is Detected.LEFTOVER:
                done = self.remove_leftover(product)
                if done is not Tidied.KEPT:
                    events.append((done.event, {
                        "data_id": product.data_id, "stage_path": outcome.stage_path,
                        "published_path": product.published_path}))
            elif outcome.action is Detected.LATE_SIDECAR:
                for sidecar, done, why in self.publish_late_sidecars(product):
                    events.append((f"late_sidecar_{done.value}", {
                        "data_id": product.data_id, "sidecar": sidecar,
                        "published_path": product.published_path, "reason": why}))
        except (OSError, paths.UnsafePath) as exc:
            text = transfer.os_text(exc) if isinstance(exc, OSError) else \
                f"{exc.path}: {exc.reason}"
            events.append(("leftover_kept", {"data_id": product.data_id,
                                             "stage_path": outcome.stage_path, "error": text}))
        except PublishFailure as exc:
            events.append(("leftover_kept", {"data_id": product.data_id,
                                             "stage_path": outcome.stage_path,
                                             "error": str(exc)}))
        return events


class Tidied(StrEnum):
    """What was done with something left in staging beside a published product."""

    REMOVED = "removed"                      # the published inode's staged name, after a crash
    IDENTICAL_REMOVED = "identical_removed"  # written again with the archived bytes
    PUBLISHED = "published"                  # a late sidecar, now beside its product
    KEPT = "kept"                            # not proven identical: left where it is

    @property
    def event(self) -> str:
        return {"removed": "leftover_removed",
                "identical_removed": "identical_rerun_removed"}.get(self.value, "leftover_kept")


class _StagedAndPublished:
    """The staged product's folder and the published product's folder, opened safely for
    the tidying of one product; a missing one is -1."""

    def __init__(self, stage_root: bytes, parts: tuple[bytes, ...], published: bytes,
                 products_root: bytes) -> None:
        self.stage_fd = paths.open_root(stage_root)
        self.src_parent = self.dest_fd = -1
        try:
            self.src_parent = paths.open_dir_under(self.stage_fd, parts[:-1])
            if staged_in_archive(self.src_parent, products_root):
                os.close(self.src_parent)  # an alias of the archive: nothing is tidied there
                self.src_parent = -1
                return
            self.dest_fd = os.open(os.path.dirname(published),
                                   os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except (FileNotFoundError, NotADirectoryError, paths.UnsafePath):
            pass

    def __enter__(self) -> _StagedAndPublished:
        return self

    def __exit__(self, *exc: object) -> None:
        for fd in (self.dest_fd, self.src_parent, self.stage_fd):
            if fd >= 0:
                os.close(fd)


def staged_in_archive(src_parent: int, products_root: bytes) -> bool:
    """Whether the staging folder `src_parent` is the products area or lies inside it, by
    device and inode along its parent chain (a bind mount of the archive into staging, or
    of a staging folder as the archive): then a rename or an unlink there would move or
    delete an archived file."""
    area = aliases.identity_of_path(products_root)
    return area is not None and aliases.lies_inside(src_parent, area)


def _name_lost(job: _Job) -> PublishFailure:
    """The final name was free when chosen and taken when renamed to: another node's (or
    process's) publish of another product took it in between, and the no-replace rename
    kept it. Nothing about this product failed: an `interrupted` attempt, not counted and
    due again at once, whose next try chooses the name again (a later version)."""
    return PublishFailure(FailureKind.INTERRUPTED,
                          f"{job.result.published_path}: taken by another publish just before "
                          "this one's rename; the name is chosen again")


def _already_placed(dest_fd: int, src_parent: int, staged_name: bytes, final: bytes,
                    rule: ProductRule, product: Product, staged: list[_Source]
                    ) -> list[_Source]:
    """Sidecars that the row's last plan named and an interrupted rename already moved to
    the destination (gone from staging, there under this final name's stem)."""
    have = {s.dest_name for s in staged}
    out = []
    for planned in product.sidecars:
        dest = os.fsencode(planned)
        if dest in have or os.sep.encode() in dest:
            continue
        original = sidecar_destination(dest, final, staged_name, rule)
        if sidecar_destination(original, staged_name, final, rule) != dest or \
                transfer.exists(src_parent, original):
            continue
        with contextlib.suppress(FileNotFoundError):
            if stat.S_ISREG(os.stat(dest, dir_fd=dest_fd, follow_symlinks=False).st_mode):
                out.append(_Source(original, dest, placed=True))
    return out
