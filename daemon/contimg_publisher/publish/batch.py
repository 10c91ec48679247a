"""A batch of claimed products going through the protocol together, and the ways one
product's attempt can end before it is published (each recorded against that product
only)."""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable
from dataclasses import dataclass, field

from contimg_publisher import content, paths, transfer
from contimg_publisher.publish.context import Context
from contimg_publisher.publish.folders import Folders
from contimg_publisher.publish.job import Job
from contimg_publisher.publish.lease import LeaseKeeper
from contimg_publisher.publish.outcome import NoRoom, classify
from contimg_publisher.registry import RegistryError
from contimg_publisher.states import Attempt, FailureKind
from contimg_publisher.transfer import PublishFailure


@dataclass
class Batch:
    ctx: Context
    folders: Folders
    lease: LeaseKeeper
    stop: threading.Event | None = None
    owned_fds: list[int] = field(default_factory=list)  # closed when the batch ends


def attempt(batch: Batch, job: Job, step: Callable[[Batch, Job], None]) -> bool:
    """Run one step of one product; a failure is recorded against that product only."""
    try:
        step(batch, job)
        return True
    except PublishFailure as exc:
        fail(batch.ctx, job, exc.kind, str(exc))
    except NoRoom as exc:
        defer(batch.ctx, job, str(exc))
    except content.Rejected as exc:
        reject(batch.ctx, job, str(exc))
    except paths.UnsafePath as exc:
        fail(batch.ctx, job, FailureKind.SOURCE_CHANGED, f"{exc.path}: {exc.reason}")
    except OSError as exc:
        fail(batch.ctx, job, classify(exc), transfer.os_text(exc))
    return False


def fail(ctx: Context, job: Job, kind: FailureKind, text: str) -> None:
    """A failed attempt, recorded (with its backoff, or `failed` at max_attempts)."""
    cfg, result = ctx.config, job.result
    result.kind, result.error = kind, text
    result.failure = ctx.registry.record_failure(
        job.product.data_id, ctx.owner, kind, text, cfg.max_attempts,
        cfg.backoff_initial_seconds, cfg.backoff_max_seconds, cfg.error_max_chars,
        token=job.product.claim_token)
    if result.failure is None:
        result.status = Attempt.LOST
    else:
        result.status = Attempt.EXHAUSTED if result.failure.exhausted else Attempt.RETRY_DUE
    release(ctx, job)
    job.finish()


def defer(ctx: Context, job: Job, reason: str) -> None:
    """Given back before anything was written, due again after the initial backoff;
    not a failure of the product."""
    result = job.result
    result.error = reason
    due = ctx.registry.clock() + ctx.config.backoff_initial_seconds
    result.status = Attempt.DEFERRED if ctx.registry.requeue(
        job.product.data_id, ctx.owner, token=job.product.claim_token, due_at=due) \
        else Attempt.LOST
    release(ctx, job)
    job.finish()


def reject(ctx: Context, job: Job, reason: str) -> None:
    """The product is not publishable (found by the publish's read): `rejected` with
    the reason, as detection would have recorded it."""
    result = job.result
    result.error = f"{job.product.stage_path}: {reason}"
    result.status = Attempt.REJECTED if ctx.registry.reject_claimed(
        job.product.data_id, ctx.owner, reason, ctx.config.error_max_chars,
        token=job.product.claim_token) \
        else Attempt.LOST
    release(ctx, job)
    job.finish()


def give_back(ctx: Context, jobs: list[Job]) -> None:
    """A stop before these products were placed: back to waiting, in one commit, no
    attempt counted."""
    with ctx.registry.write():
        for job in jobs:
            if not ctx.registry.requeue(job.product.data_id, ctx.owner,
                                        token=job.product.claim_token):
                job.lose("the claim on this product was lost before the publish")
                continue
            release(ctx, job)
            job.result.status = Attempt.REQUEUED
            job.result.error = "stopped before the publish finished"
            job.finish()


def release(ctx: Context, job: Job) -> None:
    """The attempt ends without its product at the reserved name: the name goes back.
    Best effort: a reservation left behind is released by reconciliation, and one whose
    name this product did take (a folder fsync that failed) guards nothing the disk
    does not (a name that exists is never chosen)."""
    if job.reserved is None:
        return
    with contextlib.suppress(RegistryError):
        ctx.registry.release_name(job.reserved, job.product.data_id,
                                  token=job.product.claim_token)
    job.reserved = None
