"""Step PLACE for one product: the staged inode renamed into the archive (one
filesystem), or copied through a temporary name, hashed and judged in the same read
(another filesystem); sidecars first, the product's own rename last."""

from __future__ import annotations

import contextlib
import dataclasses
import os

from contimg_publisher import content, fits, paths, transfer
from contimg_publisher.publish.batch import Batch
from contimg_publisher.publish.job import Job, Opened, Plan
from contimg_publisher.publish.naming import name_lost
from contimg_publisher.publish.outcome import How
from contimg_publisher.publish.sidecars import copy_sidecar_to, move_sidecar
from contimg_publisher.publish.sources import no_writer
from contimg_publisher.publish.steps import CrashPoint, crash_at
from contimg_publisher.registry import Identity, Product, checksum_known
from contimg_publisher.states import FailureKind
from contimg_publisher.transfer import PublishFailure


def place(batch: Batch, job: Job) -> None:
    """Put the product at its final name (not yet durable)."""
    opened, plan = job.steps_done()
    result = job.result
    if plan.identical:
        result.how = How.IDENTICAL
        return
    if plan.same_fs:
        move_same_fs(batch, job, opened, plan)
        result.how = How.RENAME
        return
    assert plan.temp is not None
    result.how = How.COPY
    temps = [plan.temp]
    try:
        result.bytes = copy(batch, job, opened, plan, temps)
        temps.clear()
    finally:
        for temp in temps:
            with contextlib.suppress(OSError):
                paths.remove_tree_under(opened.dest_fd, temp)


def algorithm_of(product: Product) -> str:
    return (product.checksum or "sha256:").split(":", 1)[0]


def move_same_fs(batch: Batch, job: Job, opened: Opened, plan: Plan) -> None:
    """Rename the staged inodes into the archive, sidecars first so that a product never
    appears without them; each is checked after its rename to be the inode that was
    opened, and only then chmod-ed (it has no other name by then). A product whose
    checksum is still pending (registered for a copy to another filesystem, which the
    products area no longer is) is read and checked first, as the copy would have."""
    ctx = batch.ctx
    cfg = ctx.config
    if not checksum_known(job.product.checksum):
        try:
            checked = transfer.read_all(opened.src_fd, algorithm_of(job.product),
                                        job.product.size_bytes, None, job.cancel,
                                        batch.lease.renewer(job.product))
        except fits.FitsError as exc:
            raise refusal(job, opened, exc) from None
        judge(batch, job, opened, checked)
    staging_folder = os.path.join(batch.folders.stage_root, *opened.parts[:-1])
    for sc in plan.sidecars:
        if not sc.placed:
            move_sidecar(ctx, opened.src_parent, opened.dest_fd, staging_folder, sc,
                         job.product)
    crash_at(CrashPoint.AFTER_SIDECARS)
    no_writer(ctx.gate, opened.src_fd, job.product.stage_bytes, job.product.stage_path,
              opened.kind)
    try:
        transfer.rename_checked(opened.src_parent, opened.staged_name, opened.src_fd,
                                opened.dest_fd, plan.final, job.product.stage_path)
    except FileExistsError:
        raise name_lost(job.result.published_path) from None
    opened.kind.after_rename(opened.dest_fd, plan.final, opened.src_fd, cfg.file_mode,
                             cfg.dir_mode)


def copy(batch: Batch, job: Job, opened: Opened, plan: Plan, temps: list[bytes]) -> int:
    """The product into its temporary name, in the one read that hashes it (and checks
    a FITS file registered without its data), judged against the registry; then the
    sidecars to their final names, so that the product's own rename is the last step
    and a product never appears without its sidecars, nor a sidecar for a product that
    turned out not to be publishable."""
    ctx, product = batch.ctx, job.product
    cfg = ctx.config
    assert plan.temp is not None
    algorithm = algorithm_of(product)
    renew = batch.lease.renewer(product)
    fits_size = None if checksum_known(product.checksum) else product.size_bytes
    try:
        copied = opened.kind.copy(opened.src_fd, opened.dest_fd, plan.temp, algorithm,
                                  fits_size, cfg.file_mode, cfg.dir_mode, job.cancel, renew)
    except fits.FitsError as exc:
        raise refusal(job, opened, exc) from None
    paths.fsync_dir(opened.dest_fd)
    crash_at(CrashPoint.AFTER_TEMP_WRITE)
    judge(batch, job, opened, copied)
    for sc in plan.sidecars:
        if sc.placed:
            continue
        fd = os.open(sc.name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC,
                     dir_fd=opened.src_parent)
        try:
            copy_sidecar_to(ctx, fd, opened.dest_fd, sc, job.product, algorithm, temps,
                            job.cancel, renew, plan.token)
        finally:
            os.close(fd)
    crash_at(CrashPoint.AFTER_SIDECARS)
    no_writer(ctx.gate, opened.src_fd, product.stage_bytes, product.stage_path, opened.kind)
    try:
        paths.rename_noreplace(opened.dest_fd, plan.temp, opened.dest_fd, plan.final)
    except FileExistsError:
        raise name_lost(job.result.published_path) from None
    return copied.size


def changed(job: Job, opened: Opened) -> PublishFailure | None:
    """A source that is no longer the registered file, unchanged (its identity after
    the read): examined again, never published on this read."""
    product = job.product
    now = Identity.of(os.fstat(opened.src_fd))
    if product.identity is not None and opened.kind.same(product.identity, now):
        return None
    return PublishFailure(FailureKind.SOURCE_CHANGED, f"{product.stage_path}: changed "
                          "while being copied; it will be examined again")


def refusal(job: Job, opened: Opened, error: fits.FitsError) -> Exception:
    """What to raise for a FITS check that failed in the read: a source that changed
    (or a read that ran short because it did) is examined again; otherwise the file
    is not publishable, rejected with the reason that names the HDU."""
    source_changed = changed(job, opened)
    if source_changed is not None:
        return source_changed
    if error.reason == fits.CHANGED:
        return PublishFailure(FailureKind.SOURCE_CHANGED, f"{job.product.stage_path}: "
                              "changed while being copied; it will be examined again")
    return content.Rejected(f"invalid FITS: {error.reason}")


def judge(batch: Batch, job: Job, opened: Opened, read: transfer.Copied) -> None:
    """The product's read, against the registry: a source that changed since
    registration is examined again; bytes that differ from a registered digest are a
    verify_mismatch. A digest that was pending is recorded now, durably, before
    anything takes the product's final name (reconciliation checks that name
    against it)."""
    ctx, product = batch.ctx, job.product
    source_changed = changed(job, opened)
    if source_changed is not None:
        raise source_changed
    known = checksum_known(product.checksum)
    st = os.fstat(opened.src_fd)
    if opened.kind.size_to_verify(st, read.size) != product.size_bytes or \
            (known and read.checksum != product.checksum):
        raise PublishFailure(FailureKind.VERIFY_MISMATCH,
                             f"copy of {product.stage_path} does not match the registry: "
                             f"{read.size} bytes {read.checksum}, expected "
                             f"{product.size_bytes} bytes {product.checksum}")
    if known:
        return
    checks = read.fits.fits_checksums if read.fits is not None else None
    if not ctx.registry.record_checksum(product.data_id, ctx.owner, read.checksum,
                                        checks, token=product.claim_token):
        raise PublishFailure(FailureKind.OTHER,
                             "the claim on this product was lost during its copy")
    job.product = dataclasses.replace(product, checksum=read.checksum)
