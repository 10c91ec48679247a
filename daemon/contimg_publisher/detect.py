"""Decide when a staged path is a finished product, describe it, and register it.

The pipeline writes mosaics in place (no temporary name, no marker), often in
several writes, so a product counts as finished only when nothing about it has
changed for `settle_seconds` (its ctime, which every write moves, is the
witness) and its content proves complete: a FITS file must be exactly as long
as its headers say, with valid checksums where it carries them. The file is
then described in one streaming read (size, checksum, header metadata) and its
identity is checked again afterwards, so a file that changed while being read
goes back to waiting instead of being registered with a stale checksum.

A FITS file that will be copied to another filesystem is described from its
headers alone (its declared size, which must be its size, and its metadata):
the copy is its one read, which computes the checksum and checks CHECKSUM and
DATASUM (see `Detector._reads_data` for when the data are read here anyway).

`Detector` is owned by the main loop: it holds the paths waiting to settle.
"""

from __future__ import annotations

import contextlib
import errno
import itertools
import os
import stat
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from contimg_publisher import archive, kinds, paths, treewalk, writers
from contimg_publisher.config import Config, ProductRule
from contimg_publisher.content import (  # detection's own words, used by its callers too
    NotReady,
    Rejected,
)
from contimg_publisher.registry import (
    TRANSIENT,
    Candidate,
    Identity,
    Product,
    Registered,
    RegistryBackend,
    RegistryError,
    Rejection,
)
from contimg_publisher.rules import Match, RuleSet, data_id_for, name_problem, owns, sidecar_names
from contimg_publisher.states import Detected, Status

# How many paths one process() call describes; bounds the time the loop spends away.
BATCH = 256
# A path whose check failed unexpectedly is looked at again after this long.
DEFER_SECONDS = 60.0
# Failures of the registry itself: the loop's to handle (pause, retry), never one path's.
_REGISTRY_ERRORS: tuple[type[Exception], ...] = (RegistryError, *TRANSIENT)


# --- the detector -----------------------------------------------------------------------------

@dataclass
class Pending:
    match: Match
    check_at: float = 0.0


@dataclass
class Outcome:
    """What happened to one path, for logs and for `scan`'s report."""

    action: Detected
    data_id: str
    data_type: str
    stage_path: str
    reason: str | None = None
    product: Product | None = None


# What registering a described product did, as a detection action.
REGISTRATION_ACTIONS = {Registered.NEW: Detected.REGISTERED,
                        Registered.UPDATED: Detected.UPDATED,
                        Registered.UNCHANGED: Detected.UNCHANGED,
                        Registered.BUSY: Detected.BUSY,
                        Registered.PUBLISHED: Detected.LEFTOVER,
                        Registered.FOREIGN: Detected.FOREIGN}


class Detector:
    """Paths waiting to settle, and the checks that turn them into registered products."""

    def __init__(self, config: Config, registry: RegistryBackend,
                 clock: Callable[[], float] = time.time,
                 gate: writers.WriterGate | None = None) -> None:
        self.config = config
        self.registry = registry
        self.clock = clock
        self.gate = gate if gate is not None else writers.WriterGate()
        self.pending: dict[tuple[bytes, ...], Pending] = {}
        self.root = os.fsencode(str(config.stage_root))
        # Folders the last walk could not list: what is below them was not seen, not gone.
        self.unreadable: list[bytes] = []
        # Folders the walks did not enter, and those already given by take_problems().
        self._problems: list[paths.TreeProblem] = []
        self._reported: set[tuple[str, str]] = set()
        self._parsed = RuleSet(config)
        # Device of each rule's products folder (or of its nearest existing parent), for
        # one process() call: whether a product will be copied or renamed.
        self._products_dev: dict[bytes, int | None] = {}

    def reconfigure(self, config: Config) -> None:
        if config.stage_root != self.config.stage_root:
            self.pending.clear()
        self.config = config
        self.root = os.fsencode(str(config.stage_root))

    def _rules(self) -> RuleSet:
        """The current config's parsed rules (parsed again whenever the config is replaced)."""
        if self._parsed.config is not self.config:
            self._parsed = RuleSet(self.config)
        return self._parsed

    # What to look at ------------------------------------------------------------------------

    def note(self, path: str | bytes, now: float | None = None) -> Match | None:
        """A path something happened to (an event, a scan): its product waits to settle."""
        try:
            parts = paths.relative_components(self.root, os.fsencode(path))
        except paths.UnsafePath:
            return None
        found = self._rules().match(parts)
        if found is not None:
            self._queue(found)
        return found

    def _queue(self, found: Match) -> None:
        """The product waits to settle, and is due now."""
        entry = self.pending.get(found.parts)
        if entry is None:
            self.pending[found.parts] = Pending(found, 0.0)
        else:
            entry.check_at = 0.0

    def note_folder(self, path: str | bytes) -> int:
        """A folder appeared (created or moved in): everything below it is looked at, since
        files may have been created before a watch on it existed."""
        try:
            top_parts = paths.relative_components(self.root, os.fsencode(path))
        except paths.UnsafePath:
            return 0
        count = 0
        for parts, _fd, _name, _is_dir in self._walk_parts(top_parts):
            found = self._rules().match(parts)
            if found is not None:
                self._queue(found)
                count += 1
        return count

    def take_problems(self) -> list[paths.TreeProblem]:
        """Folders of the staging area the walks did not enter, each given once while it
        lasts (a folder that stops being a problem is given again should it become one)."""
        current = {(p.path, p.reason): p for p in self._problems}
        new = [p for key, p in current.items() if key not in self._reported]
        self._reported |= set(current)
        self._problems = []
        return new

    def _walk_parts(self, top_parts: tuple[bytes, ...]
                    ) -> Iterator[tuple[tuple[bytes, ...], int, bytes, bool]]:
        """(components, folder descriptor, name, is a folder) of everything below the folder
        at `top_parts` under the staging root (ignored folders skipped, no link followed).
        The descriptor is the folder the name is in, borrowed until the next item.

        The walk goes through descriptors (treewalk), so no path length matters; a folder it
        does not enter (too deep, a loop, unreadable) is kept in `unreadable` (what is below
        it was not seen, not gone) and in the problems take_problems() gives.
        """
        rules = self._rules()

        def unwalked(exc: paths.TreeProblem) -> None:
            where = top_parts + exc.parts
            self.unreadable.append(os.path.join(self.root, *where))
            self._problems.append(paths.TreeProblem(where, exc.kind, exc.reason, self.root))

        try:
            root_fd = paths.open_root(self.root)
        except (FileNotFoundError, NotADirectoryError):
            return
        except OSError as exc:
            self.unreadable.append(self.root)
            unwalked(paths.TreeProblem((), paths.Problem.UNREADABLE,
                                       f"the staging root cannot be opened: "
                                       f"{exc.strerror or exc}"))
            return
        try:
            top_fd = self._open_top(root_fd, top_parts, unwalked)
            if top_fd is None:
                return
            try:
                for folder in treewalk.walk(top_fd, on_problem=unwalked):
                    base = top_parts + folder.parts
                    for name in list(folder.dirs):
                        if rules.ignored((os.fsdecode(name),)):
                            folder.dirs.remove(name)
                            continue
                        # folder products are matched by the folder itself
                        yield base + (name,), folder.fd, name, True
                    for name in folder.files:
                        yield base + (name,), folder.fd, name, False
            finally:
                os.close(top_fd)
        finally:
            os.close(root_fd)

    def _open_top(self, root_fd: int, top_parts: tuple[bytes, ...],
                  unwalked: Callable[[paths.TreeProblem], None]) -> int | None:
        """The folder a walk starts from; None when it is gone or cannot be opened (then
        kept in `unreadable`; a reason other than permissions is a problem too)."""
        try:
            return paths.open_dir_under(root_fd, top_parts)
        except (FileNotFoundError, NotADirectoryError, paths.UnsafePath):
            return None
        except OSError as exc:
            self.unreadable.append(os.path.join(self.root, *top_parts))
            if exc.errno not in (errno.EACCES, errno.EPERM):
                unwalked(paths.TreeProblem((), paths.Problem.UNREADABLE,
                                           f"cannot be opened: {exc.strerror or exc}"))
            return None

    def scan(self) -> dict[str, int]:
        """Walk every rule's folder: new or changed paths wait to settle; registered rows whose
        file is gone are recorded. Unchanged waiting files cost one lstat; of the registry
        only the rows not yet published are read, so a rescan does not grow with history."""
        index = self.registry.stage_index()
        seen: set[str] = set()
        present: set[str] = set()  # products whose own path the walk found
        # (path, owner's stage path, owner name, lstat)
        sidecars: list[tuple[bytes, str, str, os.stat_result]] = []
        unclaimed: list[tuple[bytes, str, os.stat_result]] = []  # (path, reason, lstat)
        stats = {"walked": 0, "queued": 0, "known": 0, "unreadable": 0, "unclaimed": 0}
        self.unreadable = []
        rules = self._rules()
        root_shown = paths.display(self.root)
        bases = sorted({r.base for r in self.config.products}, key=lambda b: len(b.parts))
        walked_tops: list[bytes] = []
        for base in bases:
            top = os.path.join(self.root, os.fsencode(str(base))) if base.parts else self.root
            if any(top == t or top.startswith(t + b"/") for t in walked_tops):
                continue
            walked_tops.append(top)
            if base.parts:
                try:
                    top_parts = paths.relative_components(self.root, top)
                except paths.UnsafePath:
                    continue
            else:
                top_parts = ()
            for parts, dfd, name, is_dir in self._walk_parts(top_parts):
                stats["walked"] += 1
                path = os.path.join(self.root, *parts)
                found = rules.match(parts)
                if found is None:
                    if not is_dir and not rules.ignored(os.fsdecode(p) for p in parts):
                        with contextlib.suppress(FileNotFoundError):
                            unclaimed.append((path, "matches no product rule",
                                              os.stat(name, dir_fd=dfd, follow_symlinks=False)))
                    continue
                key = paths.display(os.path.join(self.root, *found.parts))
                if found.parts == parts:
                    present.add(key)
                elif kinds.of(found.rule).has_sidecars and not is_dir:
                    with contextlib.suppress(FileNotFoundError):
                        sidecars.append((path, key, paths.display(found.parts[-1]),
                                         os.stat(name, dir_fd=dfd, follow_symlinks=False)))
                if key in seen:
                    continue
                seen.add(key)
                known = index.get(key)
                if known is not None and known[1] is not None:
                    try:
                        st = os.stat(name, dir_fd=dfd, follow_symlinks=False)
                    except FileNotFoundError:
                        continue
                    if kinds.of(found.rule).unchanged(st, known[1]):
                        stats["known"] += 1
                        continue
                self._queue(found)
                stats["queued"] += 1
        for path, owner, owner_name, sst in sidecars:
            if owner in present:
                continue
            if owner not in index and self.registry.published_at(owner):
                # Queued above: published beside its product, or kept with a warning.
                unclaimed.append((path, f"sidecar of {owner_name}, which was published before "
                                        "it arrived", sst))
            else:
                unclaimed.append((path, f"sidecar of {owner_name}, which is not in the staging "
                                        "area", sst))
        stats["unclaimed"] = self._record_unclaimed(unclaimed)
        unseen = tuple(paths.display(folder) + "/" for folder in self.unreadable)
        stats["unreadable"] = len(unseen)
        # A problem this whole walk no longer meets is given again should it come back.
        self._reported &= {(p.path, p.reason) for p in self._problems}
        under_root = root_shown + "/"
        for stage_path, (status, _ident) in index.items():
            if status in (Status.STAGING, Status.FAILED) and stage_path not in seen and \
                    stage_path.startswith(under_root) and not stage_path.startswith(unseen) \
                    and self._is_product_path(stage_path):
                self._vanished(stage_path)
        return stats

    def _record_unclaimed(self, found: list[tuple[bytes, str, os.stat_result]]) -> int:
        """Keep the walk's unclaimed files (not folders) in the registry, for `status`;
        each with the lstat the walk took through its folder's descriptor."""
        rows = []
        for path, reason, st in found:
            if stat.S_ISDIR(st.st_mode):
                continue
            rows.append((paths.display(path), path, reason,
                         max(st.st_mtime_ns, st.st_ctime_ns) / 1e9, st.st_size))
        self.registry.replace_unclaimed(rows)
        return len(rows)

    # Settling and checking -----------------------------------------------------------------

    def next_check(self) -> float | None:
        return min((p.check_at for p in self.pending.values()), default=None)

    def settle(self, deadline: float | None = None, limit: int = BATCH) -> list[Outcome]:
        """Process pending paths as they come due, until none is left or the next is due
        after `deadline`: one pass for `scan` and tools that run without the daemon's loop."""
        outcomes: list[Outcome] = []
        while True:
            outcomes += self.process(limit=limit)
            check = self.next_check()
            if check is None or (deadline is not None and check > deadline):
                return outcomes
            wake = check if deadline is None else min(check, deadline)
            time.sleep(max(0.0, wake - self.clock()))

    def forget(self, path: str | bytes) -> None:
        """A path was deleted or moved away."""
        try:
            parts = paths.relative_components(self.root, os.fsencode(path))
        except paths.UnsafePath:
            return
        found = self._rules().match(parts)
        if found is None:
            return
        if found.parts == parts:
            self.pending.pop(found.parts, None)
            self._vanished(paths.display(os.path.join(self.root, *parts)))
        else:
            self.note(os.path.join(self.root, *found.parts))  # a file inside a folder product

    def drop(self, path: str | bytes) -> None:
        """A product this process just published left staging: it no longer waits to settle
        (forget() without asking the registry about a row that is the one published)."""
        try:
            parts = paths.relative_components(self.root, os.fsencode(path))
        except paths.UnsafePath:
            return
        self.pending.pop(parts, None)

    def _late_sidecar(self, m: Match, stage_path: str, dirs: paths.DirCache
                      ) -> Outcome | None:
        """A sidecar beside a product that was already published from this path."""
        if not kinds.of(m.rule).has_sidecars:
            return None
        present = False
        for sidecar in sidecar_names(os.fsdecode(m.parts[-1]), m.rule):
            with contextlib.suppress(OSError, paths.UnsafePath):
                dirs.lstat(m.parts[:-1] + (os.fsencode(sidecar),), verify=False)
                present = True
        if not present:
            return None
        published = [r for r in self.registry.by_stage_path(stage_path)
                     if r.status == Status.PUBLISHED]
        if not published:
            return None
        row = published[-1]  # the newest version published from this path
        return Outcome(Detected.LATE_SIDECAR, row.data_id, row.data_type, stage_path, product=row)

    def _is_product_path(self, stage_path: str) -> bool:
        """Whether a staged path is a product of some rule (rows anywhere else belong to
        other writers: the sweep after a rescan does not even look them up)."""
        try:
            parts = paths.relative_components(self.root, paths.undisplay(stage_path))
        except paths.UnsafePath:
            return False
        found = self._rules().match(parts) if parts else None
        return found is not None and found.parts == parts

    def _vanished(self, stage_path: str) -> Outcome | None:
        """The file of a waiting row this daemon owns is gone from staging: it is in the
        archive already (a row that other code re-registered, resetting what this program
        recorded) or it left before it was published."""
        if not self.registry.waiting_at(stage_path):
            return None  # nearly always: the file left because it was published
        for row in self.registry.by_stage_path(stage_path):
            if row.status not in (Status.STAGING, Status.FAILED) or \
                    not owns(self.config, row):
                continue
            record = archive.find_published(self.config, self.registry, row)
            if record is not None and self.registry.restore_published(row.id, record):
                return Outcome(Detected.FOUND_PUBLISHED, row.data_id, row.data_type, stage_path,
                               reason=f"its file is in the archive: {record.published_path}",
                               product=self.registry.get(row.data_id))
            if self.registry.forget_missing(
                    row.data_id, "the file left the staging area before it was published",
                    self.config.error_max_chars):
                return Outcome(Detected.VANISHED, row.data_id, row.data_type, stage_path)
        return None

    def process(self, now: float | None = None, limit: int = BATCH) -> list[Outcome]:
        """Check every path whose settle time has come; register what is finished."""
        now = self.clock() if now is None else now
        ready = list(itertools.islice((p for p in self.pending.values() if p.check_at <= now),
                                      limit))
        if not ready:
            return []
        self._products_dev.clear()
        outcomes: list[Outcome] = []
        candidates: list[tuple[Candidate, Match]] = []
        root_fd = paths.open_root(self.root)
        # The folders on the way are opened once for all the paths of this call, and closed
        # with it: a folder renamed before the next call is walked afresh.
        dirs = paths.DirCache(root_fd)
        # The rows at every path of this call, asked for once (a round trip each, on a server).
        rows_at = self.registry.by_stage_paths(
            [paths.display(os.path.join(self.root, *entry.match.parts)) for entry in ready])
        try:
            for entry in ready:
                try:
                    result = self._check(root_fd, entry, now, dirs, rows_at)
                except _REGISTRY_ERRORS:
                    raise
                except Exception as exc:  # one path's failure never stops the others
                    outcomes.append(self._deferred(entry, now, exc))
                    continue
                if isinstance(result, Outcome):
                    self.pending.pop(entry.match.parts, None)
                    outcomes.append(result)
                elif isinstance(result, Candidate):
                    self.pending.pop(entry.match.parts, None)
                    candidates.append((result, entry.match))
        finally:
            dirs.close()
            os.close(root_fd)
        try:
            outcomes.extend(self._register(candidates))
        except RegistryError:
            # Nothing of this burst was recorded: it waits to be looked at again.
            for _cand, found in candidates:
                self.pending[found.parts] = Pending(found, now + max(self.config.settle_seconds,
                                                                      1.0))
            raise
        return outcomes

    def _deferred(self, entry: Pending, now: float, exc: Exception) -> Outcome:
        """A path whose check failed unexpectedly: it is looked at again after DEFER_SECONDS,
        and the failure is reported with the path and the reason."""
        m = entry.match
        entry.check_at = now + DEFER_SECONDS
        return Outcome(Detected.DEFERRED, data_id_for(m.rule, m.parts), m.rule.type,
                       paths.display(os.path.join(self.root, *m.parts)),
                       reason=f"{type(exc).__name__}: {exc}")

    def _check(self, root_fd: int, entry: Pending, now: float,
               dirs: paths.DirCache | None = None,
               rows_at: dict[str, list[Product]] | None = None
               ) -> Outcome | Candidate | None:
        if dirs is None:
            with paths.DirCache(root_fd) as own:
                return self._check(root_fd, entry, now, own, rows_at)
        m = entry.match
        stage_path = paths.display(os.path.join(self.root, *m.parts))
        data_id = data_id_for(m.rule, m.parts)
        problem = self._name_problem(m.parts)
        try:
            st = dirs.lstat(m.parts)
        except FileNotFoundError:
            return self._late_sidecar(m, stage_path, dirs) or self._vanished(stage_path) or \
                Outcome(Detected.VANISHED, data_id, m.rule.type, stage_path)
        except paths.UnsafePath as exc:
            return self._reject(m, data_id, stage_path, exc.reason, None)
        except OSError as exc:
            if exc.errno == errno.ENOTDIR:
                return self._vanished(stage_path)
            if exc.errno in (errno.EACCES, errno.EPERM):
                # A folder on the way lost its permissions after the event: say so, and let a
                # later scan take the file (a rejection without identity is looked at again).
                return self._reject(m, data_id, stage_path,
                                    f"cannot be checked: {exc.strerror} on a folder on the way "
                                    "to it; give the daemon's user read and search "
                                    "permission", None)
            raise
        ident = Identity.of(st)
        if problem:
            return self._reject(m, data_id, stage_path, problem, ident)
        kind = kinds.of(m.rule)
        if stat.S_ISLNK(st.st_mode):
            return self._reject(m, data_id, stage_path,
                                "is a symbolic link; stage the file itself, not a link", ident)
        if not kind.is_type(st.st_mode):
            return self._reject(m, data_id, stage_path,
                                f"is {paths.type_name(st.st_mode)}, not {kind.type_text}", ident)
        quiet_since = self._quiet_since(root_fd, m, st, dirs)
        settle = self.config.settle_seconds
        if now - quiet_since < settle:
            entry.check_at = quiet_since + settle
            return None
        rows = rows_at[stage_path] if rows_at is not None and stage_path in rows_at else \
            self.registry.by_stage_path(stage_path)
        if rows and all(r.data_type != m.rule.type for r in rows) and \
                any(r.status != Status.PUBLISHED for r in rows):
            # Registered by another writer as another type: not this daemon's to describe.
            other = rows[-1]
            return Outcome(Detected.FOREIGN, other.data_id, other.data_type, stage_path,
                           reason=f"registered by another writer as {other.data_type!r}",
                           product=other)
        algorithm = self.config.checksum_algorithm
        full = os.path.join(self.root, *m.parts)

        def busy(fd: int, rel: bytes) -> bool:
            return self.gate.busy(fd, os.path.join(full, rel) if rel else full)
        try:
            desc = kind.describe(root_fd, m.parts, m.rule, algorithm, dirs, busy,
                                 self._reads_data(m.rule, st, rows))
        except Rejected as exc:
            return self._reject(m, data_id, stage_path, str(exc), ident)
        except NotReady:
            entry.check_at = now + max(settle, 0.05)
            return None
        except FileNotFoundError:
            return self._vanished(stage_path) or Outcome(Detected.VANISHED, data_id, m.rule.type,
                                                         stage_path)
        except OSError as exc:
            return self._reject(m, data_id, stage_path,
                                f"cannot be read: {exc.strerror or exc}", ident)
        return Candidate(data_id=data_id, data_type=m.rule.type,
                         base_path=paths.display(self.root), stage_path=stage_path,
                         stage_path_bytes=os.path.join(self.root, *m.parts),
                         identity=desc.identity, checksum=desc.checksum, metadata=desc.metadata)

    def _reads_data(self, rule: ProductRule, st: os.stat_result, rows: list[Product]) -> bool:
        """Whether registration reads a staged FITS file's data, or leaves that to the
        publish's copy, the one read of a file that goes to another filesystem.

        Read here on one filesystem (the publish renames the inode, so there is no copy to
        share a read with, and the rename relies on the content proven now); when it is
        not known where the products folder lives; beside a rejected row of the same path
        (the file is checked whole again, so an unchanged bad file keeps its reason rather
        than being copied again); and beside a row published from the same path with the
        same size (only the digest tells an identical rerun, which is not published again,
        from new bytes). `rows`: the rows staged at the product's path."""
        dev = self._products_device(rule)
        if dev is None or dev == st.st_dev:
            return True
        return any(row.status == Status.REJECTED or
                   (row.status == Status.PUBLISHED and row.size_bytes == st.st_size)
                   for row in rows)

    def _products_device(self, rule: ProductRule) -> int | None:
        """st_dev of the rule's products folder, or of its nearest parent that exists (where
        the publish will create it); None when none can be looked at."""
        where = os.path.join(os.fsencode(str(self.config.products_root)),
                             os.fsencode(rule.destination))
        if where not in self._products_dev:
            dev, path = None, os.path.normpath(where)
            while dev is None:
                try:
                    dev = os.stat(path).st_dev
                except OSError:
                    parent = os.path.dirname(path)
                    if parent == path:
                        break
                    path = parent
            self._products_dev[where] = dev
        return self._products_dev[where]

    def _name_problem(self, parts: tuple[bytes, ...]) -> str | None:
        return name_problem(parts, self.config.max_name_bytes)

    def _quiet_since(self, root_fd: int, m: Match, st: os.stat_result,
                     dirs: paths.DirCache) -> float:
        """When the product (with its sidecars) last changed. `st` is the product's lstat,
        taken through `dirs` just before."""
        # ctime, not mtime: see content.tree_digest_quick().
        kind = kinds.of(m.rule)
        newest = max(st.st_ctime_ns, kind.newest_inside(root_fd, m.parts) or 0)
        if kind.has_sidecars:
            name = os.fsdecode(m.parts[-1])
            for sidecar in sidecar_names(name, m.rule):
                with contextlib.suppress(OSError, paths.UnsafePath):
                    # The sidecars' folder is the product's, verified by its lstat just now;
                    # their ctimes only delay the check.
                    sst = dirs.lstat(m.parts[:-1] + (os.fsencode(sidecar),), verify=False)
                    newest = max(newest, sst.st_ctime_ns)
        return newest / 1e9

    def _reject(self, m: Match, data_id: str, stage_path: str, reason: str,
                ident: Identity | None) -> Outcome:
        outcome, row = self.registry.reject(
            data_id, m.rule.type, paths.display(self.root), stage_path,
            os.path.join(self.root, *m.parts), reason, ident, self.config.error_max_chars)
        if outcome == Rejection.SKIPPED and row is not None and \
                row.stage_path != stage_path:
            # The id belongs to another path: keep this rejection under a path-qualified id.
            outcome, row = self.registry.reject(
                f"{m.rule.type}:{stage_path}", m.rule.type, paths.display(self.root),
                stage_path, os.path.join(self.root, *m.parts), reason, ident,
                self.config.error_max_chars)
        action = Detected.REJECTED if outcome in (Rejection.NEW, Rejection.UPDATED) else \
            Detected.REJECTED_UNCHANGED
        return Outcome(action, row.data_id if row else data_id, m.rule.type, stage_path,
                       reason=reason, product=row)

    def _register(self, items: list[tuple[Candidate, Match]]) -> list[Outcome]:
        if not items:
            return []
        outcomes: list[Outcome] = []
        # One commit for the whole burst.
        results = self.registry.register_many([c for c, _m in items])
        for (cand, m), (outcome, row) in zip(items, results, strict=True):
            version = 1
            while outcome == Registered.CONFLICT and version < 1000:
                # The id is taken by another path, or by content already published from this
                # path: the new content becomes the next version of the product.
                version += 1
                cand = Candidate(**{**cand.__dict__, "data_id": f"{data_id_for(m.rule, m.parts)}"
                                                                f".v{version}"})
                outcome, row = self.registry.register(cand)
            action = REGISTRATION_ACTIONS[outcome]
            outcomes.append(Outcome(action, row.data_id, row.data_type, cand.stage_path,
                                    product=row))
        return outcomes
