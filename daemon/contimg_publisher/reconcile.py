"""Resolve publishes that a crash interrupted, from what is on disk plus the row, and
remove temporary files that no live publish claims. Runs under the single-writer lock,
at start-up and periodically.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Iterator
from typing import Any

from contimg_publisher import fits, kinds, paths, rules, transfer, treewalk, writers
from contimg_publisher import temps as temps_mod
from contimg_publisher.config import Config, ProductRule
from contimg_publisher.lock import owner_alive
from contimg_publisher.publish import (
    Context,
    How,
    Mode,
    Result,
    destination,
    joined_path,
    remove_leftover,
    rule_for,
    staged_in_archive,
    step_of,
)
from contimg_publisher.registry import Product, Published, RegistryBackend, checksum_known
from contimg_publisher.states import Attempt, FailureKind, Status, Step

SWEEP_SLICE_SECONDS = 0.02  # of a stray-temporary sweep per turn of the daemon's loop


def reconcile(config: Config, registry: RegistryBackend, owner: str, log: Any = None,
              now: float | None = None, sweep: bool = True) -> list[Result]:
    """Resolve publishes a crash interrupted, and remove temporary files nobody claims.

    Runs under the single-writer lock. A row is resolved from what is on disk: a verified
    final copy -> published (and the staged copy removed); otherwise back to waiting,
    recorded as `interrupted` (which uses up no attempt). A publish by the pipeline's own
    code (no lease) is only looked at when this daemon owns the row, and only once its
    files have been quiet for `legacy_quiet_seconds`: that process may still be copying.
    Without `sweep` the products area is not walked for stray temporary files: the daemon
    sweeps it in slices after READY (stray_temp_sweep), since that walk grows with the
    archive.
    """
    now = registry.clock() if now is None else now  # leases are the registry's clock
    results: list[Result] = []
    ctx = Context(config, registry, owner, log)
    for row in registry.publishing():
        if _claim_live(row, owner, now):
            continue
        if step_of(row) is Step.LEGACY:
            rule = rules.owner_rule(config, row.data_type, row.stage_bytes)
            if rule is None:
                continue  # another writer's row, and its publish
            busy = legacy_in_progress(config, rule, row, now)
            if busy is not None:
                if log is not None:
                    log.info("legacy_publish_in_progress", data_id=row.data_id,
                             data_type=row.data_type, stage_path=row.stage_path, reason=busy,
                             action="left alone until it has been quiet for "
                                    f"{config.legacy_quiet_seconds:g} s")
                continue
        try:
            results.append(_resolve(ctx, row))
        except (OSError, paths.UnsafePath, ValueError) as exc:
            # One row's odd path never stops the others, nor the daemon's start: this row
            # stays as it is and is tried again at the next reconciliation.
            if log is not None:
                log.error("reconcile_failed", data_id=row.data_id, data_type=row.data_type,
                          stage_path=row.stage_path, error=f"{type(exc).__name__}: {exc}",
                          action="tried again at the next reconciliation")
    release_dead_reservations(registry, owner, now, log)
    if sweep:
        remove_stray_temps(config, registry, owner, log)
    return results


def _claim_live(row: Product, owner: str, now: float) -> bool:
    """Whether a `publishing` row is in the hands of a live publish: this process's, or
    another one's while its lease runs and its process is not known to be gone (on this
    host: a second daemon of this node, a `publish` command). A claim whose lease ran out
    is resolved even when its process lives (stalled, cut off from the registry): every
    later write of that claim names its token and changes nothing, and its copy in flight
    (whose temporary name is removed here) could not be committed anyway."""
    alive = owner_alive(row.lease_owner)
    live_lease = row.lease_expires_at is not None and row.lease_expires_at > now
    return row.lease_owner == owner or (alive is not False and live_lease)


def release_dead_reservations(registry: RegistryBackend, owner: str, now: float,
                              log: Any = None) -> list[str]:
    """Release this node's folder-name reservations whose claim is dead: the product is
    not publishing under the claim that reserved the name (requeued, failed, claimed again
    since) or that claim's process is gone. Run after the rows are resolved, so that a
    rename that finished before a crash has made its row published (and its reservation
    settled) first. The release names the claim's token: a reservation the product's new
    claim took over meanwhile stays. Returns the released names."""
    released = []
    for res in registry.reservations():
        row = registry.get(res.data_id)
        if row is not None and row.status == Status.PUBLISHING and \
                row.claim_token == res.claim_token and _claim_live(row, owner, now):
            continue
        if registry.release_name(res.published_path, res.data_id, token=res.claim_token):
            released.append(res.published_path)
            if log is not None:
                log.info("reservation_released", data_id=res.data_id,
                         published_path=res.published_path, owner=res.owner,
                         reason="the publish that reserved this name is no longer live")
    return released


def resolve_own(config: Config, registry: RegistryBackend, owner: str, data_ids: list[str],
                log: Any = None) -> list[Result]:
    """Publishes of this very process that died inside it (an exception in the publish
    thread, a registry error during a commit): resolved now, from disk and the row, as a
    crash would be at the next start, so no row stays `publishing` under a live lease."""
    ctx = Context(config, registry, owner, log)
    results = []
    for data_id in data_ids:
        row = registry.get(data_id)
        if row is not None and row.status == Status.PUBLISHING and row.lease_owner == owner:
            results.append(_resolve(ctx, row))
    return results


def _resolve(ctx: Context, row: Product) -> Result:
    """By the step the row records: a legacy copy is judged from disk; a planned publish is
    published when its final name holds the registered bytes; anything else (claimed, or
    planned and not there yet) goes back to waiting, its temporary copy removed."""
    config, registry = ctx.config, ctx.registry
    result = Result(row.data_id, row.data_type, Attempt.REQUEUED, row.stage_path,
                    how=How.RECONCILE)
    step = step_of(row)
    products_root = os.fsencode(str(config.products_root))
    if step is Step.PLANNED and row.publish_temp:
        with contextlib.suppress(FileNotFoundError, NotADirectoryError):
            temp = paths.undisplay(row.publish_temp)
            parent = paths.open_folder(os.path.dirname(temp), products_root)
            try:
                paths.remove_tree_under(parent, os.path.basename(temp))
            finally:
                os.close(parent)
    target = row.publish_target
    rule = rule_for(config, row.data_type)
    if step is Step.LEGACY and rule is not None and kinds.of(rule) is kinds.FILE:
        legacy = _resolve_legacy(ctx, row, rule, result)
        if legacy is not None:
            return legacy
    # A checksum still pending means the copy never finished its read: the final name was
    # not taken for this publish (the digest is recorded before it is).
    if step is Step.PLANNED and target and rule is not None and checksum_known(row.checksum):
        raw = paths.undisplay(target)
        parent_path, final = os.path.dirname(raw), os.path.basename(raw)
        with contextlib.suppress(FileNotFoundError, NotADirectoryError):
            parent = paths.open_folder(parent_path, products_root)
            try:
                verified = kinds.of(rule).same_content(parent, final, row.size_bytes,
                                                       row.checksum)
                # The sidecars went to their final names before the product did; the row
                # learns of them only at the commit, which the crash came before.
                sidecars = row.sidecars or ([
                    name for name in rules.sidecar_names(os.fsdecode(final), rule)
                    if transfer.exists(parent, os.fsencode(name))]
                    if kinds.of(rule).has_sidecars else [])
            finally:
                os.close(parent)
            if verified and registry.mark_published(
                    Published(row.data_id, target, row.publish_mode or Mode.AUTO,
                              tuple(sidecars)), None):
                result.status, result.published_path = Attempt.PUBLISHED, target
                done = registry.get(row.data_id)
                if done is not None:
                    with contextlib.suppress(OSError, paths.UnsafePath):
                        remove_leftover(ctx, done)
                return result
    outcome = registry.record_failure(
        row.data_id, None, FailureKind.INTERRUPTED,
        f"publish by {row.lease_owner or 'an older program'} was interrupted; it will be "
        "published again", config.max_attempts, config.backoff_initial_seconds,
        config.backoff_max_seconds, config.error_max_chars)
    result.failure, result.kind = outcome, FailureKind.INTERRUPTED
    result.error = outcome.error if outcome else None
    return result


def legacy_in_progress(config: Config, rule: ProductRule, row: Product, now: float
                       ) -> str | None:
    """Why a `publishing` row without a lease may still be in the hands of the process that
    claimed it (older pipeline code, which records neither a lease nor a heartbeat), or None
    once nothing about it has changed for legacy_quiet_seconds: its copy under the final
    name and its staged file (ctime, which every write moves) and nobody has the copy open
    for writing."""
    try:
        parts = paths.relative_components(os.fsencode(str(config.stage_root)), row.stage_bytes)
    except paths.UnsafePath:
        return None
    folder, name = destination(config, rule, parts)
    copy = joined_path(os.fsencode(str(config.products_root)), folder, name)
    newest: float | None = None
    for path in (copy, row.stage_bytes):
        with contextlib.suppress(OSError):
            st = os.lstat(path)
            newest = max(newest or 0.0, st.st_ctime_ns / 1e9)
    with contextlib.suppress(OSError):
        if writers.check_path(copy) is writers.WriterCheck.WRITING:
            return f"{paths.display(copy)} is open for writing"
    if newest is not None and now - newest < config.legacy_quiet_seconds:
        return f"its files changed {max(0.0, now - newest):.0f} s ago"
    return None


def _resolve_legacy(ctx: Context, row: Product, rule: ProductRule,
                    result: Result) -> Result | None:
    """A row an older program left in `publishing` (it never cleared them). That program
    copied straight to the final name, so what is there is its complete copy (the staged
    file already gone) or a truncated prefix of the staged file. A complete, valid FITS copy
    makes the row published; a provable prefix is removed so the product can be published
    under its own name. Anything else is left alone. None: requeue as usual."""
    config, registry, log = ctx.config, ctx.registry, ctx.log
    try:
        parts = paths.relative_components(os.fsencode(str(config.stage_root)), row.stage_bytes)
    except paths.UnsafePath:
        return None
    folder, name = destination(config, rule, parts)
    products_root = os.fsencode(str(config.products_root))
    shown = paths.display(joined_path(products_root, folder, name))
    stage_fd = products_fd = dest_dir = src_fd = src_parent = copy_fd_ = -1
    try:
        products_fd = paths.open_root(products_root)
        dest_dir = paths.open_dir_under(products_fd, folder)
        copy_fd_, _parent = paths.open_file_under(dest_dir, (name,))
        os.close(_parent)
        stage_fd = paths.open_root(os.fsencode(str(config.stage_root)))
        try:
            src_fd, src_parent = paths.open_file_under(stage_fd, parts)
        except FileNotFoundError:
            src_fd = -1
        if src_fd < 0:
            algorithm = config.checksum_algorithm
            try:
                report = fits.scan_fits(copy_fd_, algorithm)
            except fits.FitsError as exc:
                if log is not None:
                    log.warning("legacy_copy_invalid", data_id=row.data_id,
                                published_path=shown, error=exc.reason,
                                reason="left by an older program; the staged file is gone")
                return None
            if registry.confirm_published(row.data_id, shown, report.size, report.checksum,
                                          report.metadata):
                result.status, result.published_path = Attempt.PUBLISHED, shown
                result.how = How.LEGACY
                return result
            return None
        if staged_in_archive(src_parent, products_root):
            return None  # an alias of the archive: never removed from there (publish says so)
        copy_st, src_st = os.fstat(copy_fd_), os.fstat(src_fd)
        if copy_st.st_size == src_st.st_size:
            return _adopt_equal_copy(ctx, row, result, shown, (dest_dir, name, copy_fd_),
                                     (src_parent, parts[-1], src_fd))
        if copy_st.st_size < src_st.st_size and \
                transfer.is_prefix(copy_fd_, src_fd, copy_st.st_size):
            current = os.stat(name, dir_fd=dest_dir, follow_symlinks=False)
            if (current.st_dev, current.st_ino) == (copy_st.st_dev, copy_st.st_ino):
                os.unlink(name, dir_fd=dest_dir)
                paths.fsync_dir(dest_dir)
                if log is not None:
                    log.warning("legacy_partial_removed", data_id=row.data_id,
                                published_path=shown, bytes=copy_st.st_size,
                                staged_bytes=src_st.st_size,
                                reason="a truncated copy left by an older program; "
                                       "the product is published again")
        return None
    except (FileNotFoundError, NotADirectoryError, paths.UnsafePath):
        return None
    finally:
        for fd in (copy_fd_, src_fd, src_parent, dest_dir, products_fd, stage_fd):
            if fd >= 0:
                os.close(fd)


def _same_file(dir_fd: int, name: bytes, fd: int) -> bool:
    """Whether `name` still leads to the unchanged file open as `fd`."""
    try:
        now = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    except FileNotFoundError:
        return False
    held = os.fstat(fd)
    return (now.st_dev, now.st_ino, now.st_size, now.st_mtime_ns) == (
        held.st_dev, held.st_ino, held.st_size, held.st_mtime_ns)


def _adopt_equal_copy(ctx: Context, row: Product, result: Result, shown: str,
                      copy: tuple[int, bytes, int], staged: tuple[int, bytes, int]
                      ) -> Result | None:
    """The older program copied the whole file to its final name and died before its
    unlink and its row update: a copy of the staged file's size is compared byte for byte
    (by digest, both read now). Equal: the copy is the product (no second version) and the
    staged file is removed, once its name still leads to the file that was read. Not equal,
    or not a valid FITS file: None, and the product is published as usual (another
    version beside that content)."""
    config, registry, log = ctx.config, ctx.registry, ctx.log
    dest_dir, name, copy_fd = copy
    src_parent, src_name, src_fd = staged
    algorithm = config.checksum_algorithm
    try:
        report = fits.scan_fits(copy_fd, algorithm)
    except fits.FitsError as exc:
        if log is not None:
            log.warning("legacy_copy_invalid", data_id=row.data_id, published_path=shown,
                        error=exc.reason, reason="left by an older program beside its "
                                                 "staged file; published as another version")
        return None
    if fits.hash_fd(src_fd, algorithm) != (report.size, report.checksum) or \
            not _same_file(src_parent, src_name, src_fd) or \
            not _same_file(dest_dir, name, copy_fd):
        return None
    if not registry.confirm_published(row.data_id, shown, report.size, report.checksum,
                                      report.metadata):
        return None
    result.status, result.published_path, result.how = Attempt.PUBLISHED, shown, How.LEGACY
    # The row names the archived copy now; the staged name goes only if it still leads to
    # the file that was read (a file written there since is left, and looked at again).
    kept = None
    try:
        if _same_file(src_parent, src_name, src_fd):
            os.unlink(src_name, dir_fd=src_parent)
            paths.fsync_dir(src_parent)
    except OSError as exc:
        kept = transfer.os_text(exc)
    if log is not None:
        log.warning("legacy_copy_adopted", data_id=row.data_id, published_path=shown,
                    bytes=report.size, checksum=report.checksum,
                    reason="a complete copy left by an older program, equal to the staged "
                           "file; it is the product, not copied again",
                    staged_kept=kept)
    return result


def remove_stray_temps(config: Config, registry: RegistryBackend, owner: str,
                       log: Any = None) -> int:
    """Remove temporary names (ours, by their prefix) that no live publish claims. Nothing
    else in the products area is ever touched."""
    return sum(stray_temp_sweep(config, registry, owner, log))


def advance_sweep(sweep: Iterator[int], budget: float = SWEEP_SLICE_SECONDS
                  ) -> Iterator[int] | None:
    """A slice of a stray_temp_sweep, at most `budget` seconds of it: the sweep while
    folders remain, None once it is done."""
    until = time.monotonic() + budget
    for _removed in sweep:
        if time.monotonic() >= until:
            return sweep
    return None


def stray_temp_sweep(config: Config, registry: RegistryBackend, owner: str, log: Any = None
                     ) -> Iterator[int]:
    """remove_stray_temps one folder at a time: yields how many it removed in each, so a
    caller can spread the walk of a large archive over many turns of its loop.

    Each folder's names are listed before the claims are read: a temporary name is recorded
    in its row before it is created, so one that is listed and not claimed is stray. A
    caller that advances the sweep while its own publishes run must not (the daemon advances
    it only while its publish thread is idle).

    Only this node's temporary names are removed (those its node tag names, and untagged
    older ones): in a products area several nodes share, another node's name is that
    node's to judge, by its own claims and processes. Of this node's names, those of a live
    claim are kept, whichever daemon of the node holds it: the product's own temporary
    name (recorded in the row), the sidecars' copied beside it (they carry its token),
    and, for a publish by rename (no temporary name recorded), any of its row's."""
    root = os.fsencode(str(config.products_root))
    try:
        root_fd = paths.open_root(root)
    except OSError:
        return
    try:
        yield from _sweep_folders(root, root_fd, registry, owner, log,
                                  paths.node_tag(config.node_name))
    finally:
        os.close(root_fd)


def _sweep_folders(root: bytes, root_fd: int, registry: RegistryBackend, owner: str, log: Any,
                   mine: str) -> Iterator[int]:
    """stray_temp_sweep's walk (through descriptors, treewalk): a folder it does not enter,
    or a temporary tree it cannot remove, is logged with the reason and left alone."""
    def unwalked(exc: paths.TreeProblem) -> None:
        if log is not None:
            log.warning("folder_not_walked", path=exc.path, problem=exc.kind,
                        error=exc.reason, action="stray temporary names below it are not "
                                                 "looked for")

    for folder in treewalk.walk(root_fd, on_problem=unwalked, top=root):
        dirs, files, dfd = folder.dirs, folder.files, folder.fd
        top = os.path.join(root, *folder.parts)
        tokens = {name: token for name in list(dirs) + files
                  if (token := paths.parse_temp_name(name)) is not None}
        dirs[:] = [name for name in dirs if name not in tokens]  # never walked into
        temps = [name for name, token in tokens.items()
                 if paths.temp_node(token) in (None, mine)]
        removed = 0
        if temps:
            # Every node's claims: a products area shared by several nodes holds their
            # copies in flight too, each recorded in its row before it is created.
            claims = temps_mod.live(registry, owner)
            for name in temps:
                full = os.path.join(top, name)
                if claims.owns(paths.display(full), tokens[name]):
                    continue
                try:
                    paths.remove_tree_under(dfd, name)
                except FileNotFoundError:
                    continue
                except OSError as exc:
                    if log is not None:
                        log.warning("temp_not_removed", path=paths.shown((name,), top),
                                    error=str(exc.strerror or exc))
                    continue
                removed += 1
                if log is not None:
                    log.info("temp_removed", path=paths.display(full))
        yield removed
