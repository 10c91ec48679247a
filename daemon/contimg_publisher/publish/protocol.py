"""The publish protocol as code: one function per step (steps.ProtocolStep says what
each promises), and the order as data (`PROTOCOL`).

Each step takes the batch's products still going and returns those that go on; a product
that fails leaves the batch with its failure recorded. The durable parts are shared by the
batch (one commit for all the plans, one fsync per destination folder, one commit for all
the publishes, one fsync per staging folder after the removals), so a crash anywhere
leaves each row exactly where a crash of a single publish would.
"""

from __future__ import annotations

import contextlib
import errno
import os
import time
from collections.abc import Callable

from contimg_publisher import kinds, paths, space, transfer
from contimg_publisher.publish.batch import Batch, attempt, fail, give_back
from contimg_publisher.publish.job import Job, Opened, Plan
from contimg_publisher.publish.naming import (
    Reservation,
    Sidecar,
    already_placed,
    choose_name,
    destination,
    joined_path,
    rule_for,
    sidecar_destination,
    temp_token,
    versioned,
)
from contimg_publisher.publish.outcome import NoRoom, classify
from contimg_publisher.publish.place import place as place_one
from contimg_publisher.publish.sidecars import staged_sidecars
from contimg_publisher.publish.sources import remove_source
from contimg_publisher.publish.steps import CrashPoint, ProtocolStep, crash_at
from contimg_publisher.registry import Identity, Planned, Published
from contimg_publisher.states import Attempt, FailureKind
from contimg_publisher.transfer import Cancelled, PublishFailure

StepFunction = Callable[[Batch, list[Job]], list[Job]]


def _each(step: Callable[[Batch, Job], None]) -> StepFunction:
    """A step taken by each product on its own."""
    def run(batch: Batch, jobs: list[Job]) -> list[Job]:
        return [job for job in jobs if attempt(batch, job, step)]
    return run


def open_source(batch: Batch, job: Job) -> None:
    """OPEN_SOURCE: the staged source, opened without following links and checked to be
    what was registered; the destination folder opened (made if need be)."""
    cfg, product, folders = batch.ctx.config, job.product, batch.folders
    job.started = time.monotonic()
    rule = rule_for(cfg, product.data_type)
    if rule is None:
        raise PublishFailure(
            FailureKind.OTHER, f"no product rule for type {product.data_type!r} "
            "in the configuration")
    if product.checksum is None or product.identity is None:
        raise PublishFailure(
            FailureKind.SOURCE_CHANGED, "the product has not been described yet")
    kind = kinds.of(rule)
    parts = paths.relative_components(folders.stage_root, product.stage_bytes)
    folder, name = destination(cfg, rule, parts)
    try:
        src_parent = folders.source(parts[:-1])
        src_fd = os.open(parts[-1], kind.open_flags, dir_fd=src_parent)
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
    batch.owned_fds.append(src_fd)
    st = os.fstat(src_fd)
    ident = Identity.of(st)
    if not kind.is_type(st.st_mode) or not kind.same(product.identity, ident):
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
        dest_fd = folders.destination(folder)
    except paths.UnsafePath as exc:
        # The products side, not the product: an attempt that counts, with backoff.
        raise PublishFailure(FailureKind.OTHER, f"destination {exc.path} under "
                             f"{paths.display(folders.products_root)}: {exc.reason}"
                             ) from None
    job.opened = Opened(rule, kind, parts, folder, name, src_parent, src_fd, dest_fd, st,
                        ident)


def choose_final_name(batch: Batch, job: Job) -> None:
    """CHOOSE_NAME: the final name (reserved in the registry for a folder), the sidecars'
    names beside it, and for a copy its temporary name and the room it needs."""
    ctx, product, folders = batch.ctx, job.product, batch.folders
    opened = job.opened
    assert opened is not None
    rule, folder, staged_name = opened.rule, opened.folder, opened.staged_name
    found = staged_sidecars(ctx, opened.src_parent, staged_name, rule)
    token = temp_token(ctx.config, product)
    reservation = Reservation(ctx.registry, ctx.owner, product, folders.products_root,
                              folder) if opened.kind.reserves_name else None
    final, version, identical = choose_name(
        opened.src_parent, opened.dest_fd, opened.name, rule, product, found,
        folders.taken(folder), reservation)
    job.reserved = reservation.mine if reservation is not None else None
    folders.taken(folder).add(final)
    named = [Sidecar(sc.name, sidecar_destination(sc.name, staged_name, final, rule))
             for sc in found]
    final_path = paths.display(joined_path(folders.products_root, folder, final))
    job.result.published_path = final_path
    _say_why_versioned(batch, job, opened, version, reservation)
    named += already_placed(opened.dest_fd, opened.src_parent, staged_name, final, rule,
                            product, named)
    same_fs = False
    temp = temp_shown = None
    if not identical:
        same_fs = folders.same_filesystem(opened.parts[:-1], folder)
        if same_fs and opened.kind.linked_elsewhere(opened.src_fd, opened.stat):
            same_fs = False
            ctx.warn("hard_linked_source", data_id=product.data_id,
                     data_type=product.data_type, stage_path=product.stage_path,
                     links=opened.stat.st_nlink,
                     reason="the staged file (or a file in the folder) has other hard "
                            "links; it is copied, so the archive gets its own inode and "
                            "the other names are left as they are")
        if not same_fs:
            _check_room(batch, job, opened, named)
            temp = paths.temp_name(final, token)
            temp_shown = paths.display(joined_path(folders.products_root, folder, temp))
    job.plan = Plan(final, final_path, identical, same_fs, temp, temp_shown, token, named)


def _say_why_versioned(batch: Batch, job: Job, opened: Opened, version: int,
                       reservation: Reservation | None) -> None:
    """Warn of each name this product could not take, and record what it supersedes."""
    ctx, product, result = batch.ctx, job.product, job.result
    final_path = result.published_path
    if reservation is not None:
        for path, holder_id in reservation.refused:
            ctx.warn("name_reserved", data_id=product.data_id,
                     data_type=product.data_type, stage_path=product.stage_path,
                     published_path=final_path, existing=path, holder=holder_id,
                     reason="another product's publish reserved this name first "
                            "(in the registry, before its rename); publishing as "
                            f"version {version}")
    if version > 1:
        previous = paths.display(joined_path(
            batch.folders.products_root, opened.folder,
            versioned(opened.name, opened.rule, version - 1)))
        holder = ctx.registry.by_published_path(previous)
        reserved_by = dict(reservation.refused).get(previous) if reservation else None
        result.supersedes = holder.data_id if holder else reserved_by
        ctx.warn("name_taken", data_id=product.data_id, data_type=product.data_type,
                 stage_path=product.stage_path, published_path=final_path,
                 existing=previous,
                 reason="a different product already has this name; "
                        f"publishing as version {version}")


def _check_room(batch: Batch, job: Job, opened: Opened, named: list[Sidecar]) -> None:
    """Before a copy: the product and its sidecars, plus the margin, fit (statvfs)."""
    needed = job.product.size_bytes or 0
    for sc in named:
        with contextlib.suppress(OSError):
            needed += os.stat(sc.name, dir_fd=opened.src_parent,
                              follow_symlinks=False).st_size
    shortfall = space.Room.of(os.fstatvfs(opened.dest_fd)).shortfall(
        needed, batch.ctx.config.min_free_bytes)
    if shortfall is not None:
        raise NoRoom(f"{job.product.stage_path}: {shortfall}")


def record_plans(batch: Batch, jobs: list[Job]) -> list[Job]:
    """RECORD_PLAN: every plan in one durable commit, before anything is written to the
    products area; a product whose claim was lost meanwhile goes no further."""
    registry, owner = batch.ctx.registry, batch.ctx.owner
    registry.check_identity()  # nothing is moved on a registry nobody reads
    plans = [(job, job.steps_done()[1]) for job in jobs]
    planned = registry.set_publish_plans(owner, [
        Planned(job.product.data_id, plan.published_path, plan.temp_shown,
                tuple(os.fsdecode(s.dest_name) for s in plan.sidecars),
                job.product.claim_token)
        for job, plan in plans if not plan.identical])
    going = []
    for job in jobs:
        if job.steps_done()[1].identical or job.product.data_id in planned:
            going.append(job)
        else:
            job.lose("the claim on this product was lost before the publish")
    return going


def place(batch: Batch, jobs: list[Job]) -> list[Job]:
    """PLACE: each product at its final name, the lease kept between products; a stop
    (or a lost lease) gives the products not yet placed back. Then each destination
    folder, and each staging folder a rename took a name from, made durable once."""
    placed: list[Job] = []
    for index, job in enumerate(jobs):
        try:
            if batch.stop is not None and batch.stop.is_set():
                raise Cancelled
            batch.lease.keep(job.product)
            if attempt(batch, job, place_one):
                placed.append(job)
        except Cancelled:
            give_back(batch.ctx, jobs[index:])
            break
    placed = _sync_destinations(batch, placed)
    if any(not job.steps_done()[1].identical for job in placed):
        crash_at(CrashPoint.AFTER_RENAME)
    return placed


def _sync_destinations(batch: Batch, placed: list[Job]) -> list[Job]:
    """fsync each destination folder once; the products of a folder that cannot be
    synced fail (their names stay, and a retry finds them identical)."""
    failed: dict[tuple[bytes, ...], OSError] = {}
    moved = [(job, *job.steps_done()) for job in placed]
    for folder in dict.fromkeys(o.folder for _, o, p in moved if not p.identical):
        try:
            paths.fsync_dir(batch.folders.destination(folder))
        except OSError as exc:
            failed[folder] = exc
    # A rename took a name from a staging folder too; made durable before the commit,
    # so after a power cut the product is at one of its two names, never at both.
    synced: dict[int, OSError | None] = {}  # staging folder descriptor -> its fsync
    for _, opened, plan in moved:
        if plan.same_fs and opened.folder not in failed:
            if opened.src_parent not in synced:
                try:
                    paths.fsync_dir(opened.src_parent)
                    synced[opened.src_parent] = None
                except OSError as exc:
                    synced[opened.src_parent] = exc
            if (sync_failure := synced[opened.src_parent]) is not None:
                failed[opened.folder] = sync_failure
    kept = []
    for job, opened, plan in moved:
        sync_error = failed.get(opened.folder) if not plan.identical else None
        if sync_error is None:
            kept.append(job)
        else:
            fail(batch.ctx, job, classify(sync_error), transfer.os_text(sync_error))
    return kept


def commit(batch: Batch, jobs: list[Job]) -> list[Job]:
    """COMMIT: every publish in one durable commit (its time is every product's
    published_at); a product whose claim was lost meanwhile is not published."""
    registry, owner = batch.ctx.registry, batch.ctx.owner
    registry.check_identity()  # the commit below lets the sources go
    now = time.time()
    done = registry.mark_published_many([
        (Published(job.product.data_id, plan.published_path, job.mode,
                   tuple(os.fsdecode(s.dest_name) for s in plan.sidecars),
                   job.result.supersedes), job.product.claim_token)
        for job, plan in ((job, job.steps_done()[1]) for job in jobs)], owner, now)
    published = []
    for job in jobs:
        if job.product.data_id in done:
            job.result.status = Attempt.PUBLISHED
            published.append(job)
        else:
            job.lose("the claim on this product was lost before the commit")
    if published:
        crash_at(CrashPoint.AFTER_COMMIT)
    return published


def remove_sources(batch: Batch, jobs: list[Job]) -> list[Job]:
    """REMOVE_SOURCE: each staged copy removed while its name still leads to what was
    published, then one fsync per staging folder. A copy that stays is only warned of:
    the product is published, and a later pass removes it."""
    ctx = batch.ctx
    touched: dict[tuple[bytes, ...], int] = {}
    for job in jobs:
        opened, plan = job.steps_done()
        try:
            if remove_source(opened.src_parent, opened.staged_name, opened.ident,
                             opened.rule, plan.sidecars, opened.dest_fd,
                             job.product.checksum, sync=False):
                touched[opened.parts[:-1]] = opened.src_parent
        except OSError as exc:
            ctx.warn("source_not_removed", data_id=job.product.data_id,
                     stage_path=job.product.stage_path, error=transfer.os_text(exc),
                     reason="published; the staged copy is removed on a later pass")
        job.finish()
    for folder, fd in touched.items():
        try:
            paths.fsync_dir(fd)
        except OSError as exc:
            ctx.warn("source_not_removed", stage_path=paths.display(
                os.path.join(batch.folders.stage_root, *folder)), error=transfer.os_text(exc),
                reason="the removal may not be durable; a later pass removes the copy")
    return jobs


# The protocol's order, as data: protocol_order() checks it against ProtocolStep's.
PROTOCOL: tuple[tuple[ProtocolStep, StepFunction], ...] = (
    (ProtocolStep.OPEN_SOURCE, _each(open_source)),
    (ProtocolStep.CHOOSE_NAME, _each(choose_final_name)),
    (ProtocolStep.RECORD_PLAN, record_plans),
    (ProtocolStep.PLACE, place),
    (ProtocolStep.COMMIT, commit),
    (ProtocolStep.REMOVE_SOURCE, remove_sources),
)
assert tuple(step for step, _ in PROTOCOL) == tuple(ProtocolStep), "PROTOCOL out of order"


def run(batch: Batch, jobs: list[Job]) -> list[Job]:
    """Every step in order; returns the products published."""
    going = jobs
    for _step, function in PROTOCOL:
        going = function(batch, going)
    return going
