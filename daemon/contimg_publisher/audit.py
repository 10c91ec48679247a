"""The fixity audit: the products area read back against the registry.

Every published row's product must be where its row says, with the recorded size and,
read back from disk, the recorded checksum, its sidecars beside it; and every file or folder
in the products area must be recorded by some row (else it is dark data). Temporary names of
publishes in flight are neither; one that no live publish owns and that has not changed for
a lease is a stray temporary. A published name that detection would reject (a newline, an
escape, ...) is a finding too. Nothing in the products area is ever changed, and no link
is followed: a symbolic link is itself a finding.

`audit` (the command) runs one whole pass and reports. The daemon runs the same checks in an
`Auditor` thread of its own: rows in id order from a cursor kept in the registry (a restart
resumes the pass), reading at most `[audit] bytes_per_second` and only while the publish
thread is idle, so publishing never waits for it; no registry transaction is open while it
reads files. Its findings go into audit_findings (new ones logged once, those a full pass no
longer sees resolved), the metrics and the status page.

On a registry several nodes share, the archive, the cursor and the findings are shared and
the audit is one daemon's duty at a time (registry.lead(Duty.AUDIT)), renewed whenever the
pass records its progress: another node's daemon takes a pass over where it stopped once
the holder stops or its lease lapses, and the holder then ends its pass (HandedOver).
Pass times are the registry's clock, the one every node's findings are seen by.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import stat
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from contimg_publisher import content, logs, paths, rules, temps, treewalk
from contimg_publisher.config import Config
from contimg_publisher.registry import (
    TRANSIENT,
    Finding,
    Product,
    RegistryBackend,
    RegistryError,
    checksum_known,
    open_registry,
)
from contimg_publisher.states import Duty, FindingKind, Kind

CHUNK = 1 << 20
ROWS_PER_QUERY = 200
# The daemon records its findings and cursor at most this often (and every RECORD_ROWS
# rows): one commit per row would put thousands of fsyncs beside the publishes.
RECORD_SECONDS = 5.0
RECORD_ROWS = 500
# With no pass recorded yet, the first starts this long after the daemon (or after one
# interval, if shorter): a start-up has its own work (reconciliation, a backlog).
FIRST_PASS_DELAY = 3600.0
# The audit duty's lease on a shared registry (renewed at every record), and how often a
# daemon that does not hold it looks again.
DUTY_LEASE = 600.0
STANDBY_SECONDS = 30.0
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_FILE_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK
_RETRY: tuple[type[Exception], ...] = (RegistryError, *TRANSIENT)


class Stopped(Exception):
    """The daemon is stopping: the pass ends where it is (its cursor is kept)."""


class HandedOver(Exception):
    """Another daemon of the shared registry holds the audit duty now: this one's pass ends
    where it is, and that one resumes it from the shared cursor."""


class Throttle:
    """A token bucket over the bytes read back: `rate` bytes a second on average, at most
    one second's worth in a burst (0: unlimited). Before each read it also waits while
    `idle()` says publishing runs. With `stop`, every wait ends in Stopped once it is set."""

    def __init__(self, rate: float = 0.0, idle: Callable[[], bool] | None = None,
                 stop: threading.Event | None = None,
                 on_bytes: Callable[[int], None] | None = None) -> None:
        self.rate = rate
        self.idle = idle
        self.stop = stop
        self.on_bytes = on_bytes
        self.bytes = 0
        self._tokens = 0.0
        self._stamp = time.monotonic()

    def _sleep(self, seconds: float) -> None:
        if self.stop is None:
            time.sleep(seconds)
        elif self.stop.wait(seconds):
            raise Stopped

    def wait_idle(self) -> None:
        if self.stop is not None and self.stop.is_set():
            raise Stopped
        while self.idle is not None and not self.idle():
            self._sleep(0.2)

    def take(self, n: int) -> None:
        """Account for reading n bytes, after waiting as long as the rate requires."""
        self.wait_idle()
        if self.rate > 0:
            now = time.monotonic()
            self._tokens = min(self.rate, self._tokens + (now - self._stamp) * self.rate) - n
            self._stamp = now
            if self._tokens < 0:
                self._sleep(-self._tokens / self.rate)
        self.bytes += n
        if self.on_bytes is not None:
            self.on_bytes(n)

    def hash_fd(self, fd: int, algorithm: str) -> tuple[int, str]:
        """fits.hash_fd at this rate: (size, "algorithm:hex")."""
        hasher = hashlib.new(algorithm)
        size = os.fstat(fd).st_size
        offset = 0
        while offset < size:
            want = min(CHUNK, size - offset)
            self.take(want)
            data = os.pread(fd, want, offset)
            if not data:
                break
            hasher.update(data)
            offset += len(data)
        return offset, f"{algorithm}:{hasher.hexdigest()}"


def _is_link_refusal(exc: paths.UnsafePath) -> bool:
    return "symbolic link" in exc.reason


def _kind_of(config: Config, row: Product) -> str | None:
    """The row's product kind by the rule that owns it (None: another writer's row, taken
    as it is on disk)."""
    rule = rules.owner_rule(config, row.data_type, row.stage_bytes)
    return None if rule is None else rule.kind


def check_product(config: Config, root_fd: int, row: Product, throttle: Throttle
                  ) -> tuple[list[Finding], str | None]:
    """One published row against the disk: (findings, why it was not checked or None)."""
    path = row.published_path or ""
    root = os.fsencode(str(config.products_root))
    try:
        parts = paths.relative_components(root, paths.undisplay(path))
    except (paths.UnsafePath, ValueError):
        return [], "not under products_root"

    def found(kind: FindingKind, detail: str, where: str = path) -> list[Finding]:
        return [Finding(kind, where, detail, row.data_id)]

    # Detection's name checks; the length is not judged here (a version suffix may take
    # a name past what detection allows a staged name).
    problem = rules.name_problem(parts, paths.NAME_MAX)
    named = [] if problem is None else found(
        FindingKind.NAME_REJECTED, f"{problem}; detection would never have taken it (a row "
                                   "made by an older rebuild, or by another program)")
    findings, why = _check_under(config, root_fd, root, parts, row, throttle, found)
    return named + findings, why


def _check_under(config: Config, root_fd: int, root: bytes, parts: tuple[bytes, ...],
                 row: Product, throttle: Throttle, found: Callable[..., list[Finding]]
                 ) -> tuple[list[Finding], str | None]:
    try:
        folder_fd = paths.open_dir_under(root_fd, parts[:-1])
    except FileNotFoundError:
        return found(FindingKind.MISSING, "its folder is gone"), None
    except paths.UnsafePath as exc:
        where = paths.display(os.path.join(root, os.fsencode(exc.path)))
        if _is_link_refusal(exc):
            return found(FindingKind.SYMLINK, f"a folder on the way is a symbolic link "
                         f"({exc.reason}); not followed", where), None
        return found(FindingKind.TYPE_CHANGED, f"a folder on the way: {exc.reason}",
                     where), None
    except OSError as exc:
        return found(FindingKind.UNREADABLE, f"its folder: {exc.strerror or exc}"), None
    try:
        return _check_in(config, folder_fd, parts, row, throttle, found), None
    except OSError as exc:
        return found(FindingKind.UNREADABLE, f"cannot be read back: {exc.strerror or exc}"), None
    finally:
        os.close(folder_fd)


def _check_in(config: Config, folder_fd: int, parts: tuple[bytes, ...], row: Product,
              throttle: Throttle, found: Callable[..., list[Finding]]) -> list[Finding]:
    name = parts[-1]
    try:
        st = os.stat(name, dir_fd=folder_fd, follow_symlinks=False)
    except FileNotFoundError:
        return found(FindingKind.MISSING, "no file or folder under its published name")
    if stat.S_ISLNK(st.st_mode):
        return found(FindingKind.SYMLINK, "the published name is a symbolic link; not followed")
    kind = _kind_of(config, row) or (Kind.DIRECTORY if stat.S_ISDIR(st.st_mode) else Kind.FILE)
    out: list[Finding] = []
    known = checksum_known(row.checksum)
    algorithm = row.checksum.split(":", 1)[0] if known and row.checksum else "sha256"
    if kind == Kind.DIRECTORY:
        if not stat.S_ISDIR(st.st_mode):
            return found(FindingKind.TYPE_CHANGED,
                         f"a folder was published, {paths.type_name(st.st_mode)} is there")
        fd = os.open(name, _DIR_FLAGS, dir_fd=folder_fd)
        try:
            total, digest, _newest = content.tree_digest(fd, algorithm, hash_fd=throttle.hash_fd)
        except content.Rejected as exc:
            link = "symbolic link" in str(exc)
            return found(FindingKind.SYMLINK if link else FindingKind.TYPE_CHANGED, str(exc))
        except paths.TreeProblem as exc:
            return found(FindingKind.UNREADABLE, f"not read back whole: {exc.path} inside it "
                                                 f"{exc.reason}")
        finally:
            os.close(fd)
        if row.size_bytes is not None and total != row.size_bytes:
            out += found(FindingKind.SIZE_CHANGED,
                         f"recorded {row.size_bytes} bytes, its files hold {total}")
        elif known and digest != row.checksum:
            out += found(FindingKind.CHECKSUM_CHANGED,
                         f"recorded {row.checksum}, read back {digest}")
    else:
        if not stat.S_ISREG(st.st_mode):
            return found(FindingKind.TYPE_CHANGED,
                         f"a file was published, {paths.type_name(st.st_mode)} is there")
        if row.size_bytes is not None and st.st_size != row.size_bytes:
            out += found(FindingKind.SIZE_CHANGED,
                         f"recorded {row.size_bytes} bytes, {st.st_size} on disk")
        elif known:
            fd = os.open(name, _FILE_FLAGS, dir_fd=folder_fd)
            try:
                if not stat.S_ISREG(os.fstat(fd).st_mode):
                    return found(FindingKind.TYPE_CHANGED, "replaced while being read")
                _size, digest = throttle.hash_fd(fd, algorithm)
            finally:
                os.close(fd)
            if digest != row.checksum:
                out += found(FindingKind.CHECKSUM_CHANGED,
                             f"recorded {row.checksum}, read back {digest}")
        folder = os.path.dirname(paths.undisplay(row.published_path or ""))
        for sidecar in row.sidecars:
            raw = os.fsencode(sidecar)
            try:
                sst = os.stat(raw, dir_fd=folder_fd, follow_symlinks=False)
            except FileNotFoundError:
                out += found(FindingKind.SIDECAR_MISSING, "a sidecar its row records is gone",
                             paths.display(os.path.join(folder, raw)))
                continue
            if stat.S_ISLNK(sst.st_mode):
                out += found(FindingKind.SYMLINK, "a sidecar is a symbolic link; not followed",
                             paths.display(os.path.join(folder, raw)))
    return out


def _open_sub(root_fd: int, sub: tuple[bytes, ...]) -> int | None:
    try:
        return paths.open_dir_under(root_fd, sub) if sub else os.dup(root_fd)
    except (FileNotFoundError, paths.UnsafePath):
        return None


def dark_data(config: Config, registry: RegistryBackend, throttle: Throttle,
              sub: tuple[bytes, ...] = ()) -> Iterator[list[Finding]]:
    """Walk the products area (below `sub`), a folder at a time: what no row records, and
    every symbolic link. Each folder is listed before the registry is asked what it records
    there, and a publish records its names before it creates them, so a publish in flight is
    never taken for dark data; its temporary names are skipped by their prefix."""
    root = os.fsencode(str(config.products_root))
    try:
        root_fd = paths.open_root(root)
    except FileNotFoundError:
        return
    try:
        start_fd = _open_sub(root_fd, sub)
        if start_fd is None:
            return
        unwalked: list[Finding] = []

        def not_walked(exc: paths.TreeProblem) -> None:
            unwalked.append(Finding(FindingKind.UNREADABLE, exc.path,
                                    f"a folder the audit does not enter: {exc.reason}"))

        try:
            start = os.path.join(root, *sub)
            for entry in treewalk.walk(start_fd, on_problem=not_walked, top=start):
                throttle.wait_idle()
                dirs, dfd = entry.dirs, entry.fd
                folder = os.path.join(start, *entry.parts)
                shown = paths.display(folder)
                recorded = registry.recorded_in(shown)
                out: list[Finding] = unwalked[:]
                unwalked.clear()
                claims: temps.LiveTemps | None = None
                for raw in sorted(dirs + entry.files):
                    is_dir = raw in dirs
                    if (token := paths.parse_temp_name(raw)) is not None:
                        if is_dir:
                            dirs.remove(raw)
                        if claims is None:  # read after the folder was listed (see above)
                            claims = temps.live(registry)
                        stray = _stray_temp(config, dfd, raw, token, folder, claims)
                        if stray is not None:
                            out.append(stray)
                        continue
                    try:
                        st = os.stat(raw, dir_fd=dfd, follow_symlinks=False)
                    except FileNotFoundError:
                        if is_dir:
                            dirs.remove(raw)
                        continue
                    where = paths.display(os.path.join(folder, raw))
                    display_name = paths.display(raw)
                    if stat.S_ISLNK(st.st_mode):
                        out.append(Finding(FindingKind.SYMLINK, where,
                                           "a symbolic link in the products area; not followed"))
                    elif display_name in recorded.names:
                        pass  # a product (a folder product is not descended) or a sidecar
                    elif stat.S_ISDIR(st.st_mode):
                        if display_name in recorded.folders:
                            continue  # descended: something in it is recorded
                        out.append(Finding(FindingKind.DARK_FOLDER, where,
                                           "a folder that holds nothing any row records"))
                    else:
                        what = "a file" if stat.S_ISREG(st.st_mode) else \
                            paths.type_name(st.st_mode)
                        out.append(Finding(FindingKind.DARK_FILE, where,
                                           f"{what} ({st.st_size} bytes) that no row records"))
                    if is_dir:
                        dirs.remove(raw)
                yield out
            if unwalked:
                yield unwalked
        finally:
            os.close(start_fd)
    finally:
        os.close(root_fd)


def _stray_temp(config: Config, dfd: int, raw: bytes, token: str, folder: bytes,
                claims: temps.LiveTemps) -> Finding | None:
    """A name shaped like a publish's temporary that no live claim owns and that has not
    changed (mtime or ctime, of the name itself) for a lease: a finding. A younger one may
    be a copy in flight whose claim is being recorded; it is looked at in the next pass."""
    where = os.path.join(folder, raw)
    if claims.owns(paths.display(where), token):
        return None
    try:
        st = os.stat(raw, dir_fd=dfd, follow_symlinks=False)
    except FileNotFoundError:
        return None
    age = time.time() - max(st.st_mtime, st.st_ctime)
    if age < config.lease_seconds:
        return None
    node = paths.temp_node(token)
    if node in (None, paths.node_tag(config.node_name)):
        who = "this node's daemon removes it when it next starts (its sweep of stray " \
              "temporaries), or remove it by hand"
    else:
        who = f"node {node}'s daemon removes it when it next starts, or remove it by hand"
    what = "a folder" if stat.S_ISDIR(st.st_mode) else \
        f"{paths.type_name(st.st_mode)} ({st.st_size} bytes)"
    return Finding(FindingKind.STRAY_TEMPORARY, paths.display(where),
                   f"{what} named like the temporary of a publish in flight, which no live "
                   f"publish owns, unchanged for {age:.0f} s; {who}")


@dataclass
class Report:
    """One whole pass of `audit`."""

    findings: list[Finding] = field(default_factory=list)
    checked: int = 0
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (path, why)
    bytes_read: int = 0
    seconds: float = 0.0


def run(config: Config, registry: RegistryBackend, throttle: Throttle | None = None,
        sub: tuple[bytes, ...] = (), progress: Callable[[Report], None] | None = None
        ) -> Report:
    """One whole pass (below `sub` of the products area): every published row there, then
    the walk for dark data. `progress` is called now and then with the report so far."""
    throttle = throttle or Throttle()
    report = Report()
    started = time.monotonic()
    root = os.fsencode(str(config.products_root))
    prefix = paths.display(os.path.join(root, *sub)) + "/" if sub else None
    seen: set[tuple[str, str]] = set()

    def add(findings: list[Finding]) -> None:
        for f in findings:
            if (f.kind, f.path) not in seen:
                seen.add((f.kind, f.path))
                report.findings.append(f)

    try:
        root_fd = paths.open_root(root)
    except FileNotFoundError:
        root_fd = -1
    try:
        cursor = 0
        last_progress = time.monotonic()
        while rows := registry.published_after(cursor, ROWS_PER_QUERY, prefix):
            for row in rows:
                cursor = row.id
                if root_fd < 0:
                    add([Finding(FindingKind.MISSING, row.published_path or "",
                                 "the products area itself is missing", row.data_id)])
                    continue
                findings, why = check_product(config, root_fd, row, throttle)
                if why is not None:
                    report.skipped.append((row.published_path or "", why))
                    continue
                report.checked += 1
                add(findings)
                if progress is not None and time.monotonic() - last_progress >= 10:
                    report.bytes_read = throttle.bytes
                    progress(report)
                    last_progress = time.monotonic()
    finally:
        if root_fd >= 0:
            os.close(root_fd)
    for findings in dark_data(config, registry, throttle, sub):
        add(findings)
    report.bytes_read = throttle.bytes
    report.seconds = time.monotonic() - started
    return report


class Auditor:
    """The daemon's background audit, in a thread with its own registry connection.

    It only reads files, and writes only its own tables (findings, progress) in short
    transactions between reads. `idle()` (the main loop's word that the publish thread has
    nothing in hand) gates every read; reconfigure() takes a reloaded Config."""

    def __init__(self, config: Config, idle: Callable[[], bool],
                 on_bytes: Callable[[int], None] | None = None, owner: str | None = None
                 ) -> None:
        self.config = config
        self.idle = idle
        self.on_bytes = on_bytes
        self.owner = owner or f"{os.uname().nodename}:{os.getpid()}:audit"
        self.leading: bool | None = None  # holds the duty (None: not asked yet)
        self.stop_event = threading.Event()
        self.started_at = time.monotonic()
        self.thread: threading.Thread | None = None
        self._throttle: Throttle | None = None

    def start(self) -> None:
        self.thread = threading.Thread(target=self._run, name="contimg-audit", daemon=True)
        self.thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        self.stop_event.set()
        if self.thread is not None:
            self.thread.join(timeout=timeout)

    def reconfigure(self, config: Config) -> None:
        self.config = config
        if self._throttle is not None:
            self._throttle.rate = config.audit_bytes_per_second

    def _run(self) -> None:
        registry: RegistryBackend | None = None
        try:
            while not self.stop_event.is_set():
                try:
                    if registry is None:
                        registry = open_registry(self.config, migrate=False)
                    wait = self._due_in(registry)
                    if wait > 0:
                        self.stop_event.wait(min(wait, 5.0))
                        continue
                    if not self._lead(registry):
                        self.stop_event.wait(STANDBY_SECONDS)
                        continue
                    self._pass(registry)
                except Stopped:
                    return
                except HandedOver:
                    self._lead(registry)  # logs the change
                    continue
                except _RETRY as exc:
                    logs.get_logger().warning("audit_paused", error=str(exc),
                                              reason="the registry cannot be used now; the "
                                                     "audit tries again in 30 s")
                    self.stop_event.wait(30.0)
                except Exception as exc:  # the thread must outlive one bad pass
                    logs.get_logger().error("audit_error", error=f"{type(exc).__name__}: {exc}",
                                            reason="the audit tries again in 60 s")
                    self.stop_event.wait(60.0)
        finally:
            if registry is not None:
                with contextlib.suppress(Exception):
                    if self.leading:
                        registry.resign(Duty.AUDIT, self.owner)
                    registry.close()

    def _lead(self, registry: RegistryBackend | None) -> bool:
        """Take or renew the audit duty; a change is logged once."""
        leading = registry is not None and registry.lead(Duty.AUDIT, self.owner, DUTY_LEASE)
        if leading != self.leading:
            logs.get_logger().info(
                "audit_duty", leading=leading, owner=self.owner,
                reason="this daemon audits the archive" if leading else
                "another daemon of the shared registry audits the archive; this one takes "
                "over if that one stops")
            self.leading = leading
        return leading

    def _due_in(self, registry: RegistryBackend) -> float:
        """Seconds until the next pass may start (a pass under way resumes at once)."""
        interval = self.config.audit_interval_seconds
        if interval <= 0:
            return 5.0  # disabled: look again after a reload
        state = registry.audit_state()
        if state.get("pass_started") is not None:
            return 0.0
        last = state.get("last_pass_finished")
        if last is not None:
            return float(last) + interval - registry.clock()
        return self.started_at + min(interval, FIRST_PASS_DELAY) - time.monotonic()

    def _pass(self, registry: RegistryBackend) -> None:
        log = logs.get_logger()
        config = self.config
        state = registry.audit_state()
        started = state.get("pass_started")
        cursor = int(state.get("cursor") or 0)
        resumed = started is not None
        if started is None:
            started = registry.clock()
            cursor = 0
            registry.save_audit_state({"pass_started": started, "cursor": 0})
        throttle = self._throttle = Throttle(config.audit_bytes_per_second, self.idle,
                                             self.stop_event, self.on_bytes)
        log.info("audit_pass_started", resumed=resumed, cursor=cursor,
                 products_root=str(config.products_root),
                 bytes_per_second=config.audit_bytes_per_second)
        clock = time.monotonic()
        pending: list[Finding] = []
        rows_since = checked = new = 0
        last_record = time.monotonic()

        def record(state: dict[str, Any] | None) -> None:
            nonlocal pending, new, last_record, rows_since
            if not registry.lead(Duty.AUDIT, self.owner, DUTY_LEASE):
                raise HandedOver
            for f in registry.observe_findings(pending, state=state):
                new += 1
                log.warning("audit_finding", finding_kind=f.kind, path=f.path,
                            data_id=f.data_id, error=f.detail,
                            action="contimg-publisher audit; restore the product from a "
                                   "copy, or record or remove what no row records")
            pending = []
            last_record = time.monotonic()
            rows_since = 0

        root_fd = paths.open_root(os.fsencode(str(config.products_root)))
        try:
            while rows := registry.published_after(cursor, ROWS_PER_QUERY):
                for row in rows:
                    findings, _why = check_product(config, root_fd, row, throttle)
                    pending += findings
                    cursor = row.id
                    checked += 1
                    rows_since += 1
                    if rows_since >= RECORD_ROWS or \
                            time.monotonic() - last_record >= RECORD_SECONDS:
                        record({"cursor": cursor})
        except Stopped:
            with contextlib.suppress(*TRANSIENT, RegistryError):
                # What was found before the stop is kept; the pass resumes from here.
                record({"cursor": cursor})
            raise
        finally:
            os.close(root_fd)
        record({"cursor": cursor})
        for findings in dark_data(config, registry, throttle):
            pending += findings
            if time.monotonic() - last_record >= RECORD_SECONDS:
                record(None)
        record(None)
        now = registry.clock()
        resolved = registry.resolve_findings(started, now, state={
            "pass_started": None, "cursor": 0, "last_pass_started": started,
            "last_pass_finished": now, "last_pass_bytes": throttle.bytes})
        for f in resolved:
            log.info("audit_finding_resolved", finding_kind=f.kind, path=f.path,
                     data_id=f.data_id, reason="a full pass no longer finds it")
        counts = registry.finding_counts()
        seconds = time.monotonic() - clock
        log.info("audit_pass_finished", products=checked, bytes_read=throttle.bytes,
                 seconds=round(seconds, 3),
                 bytes_per_second=round(throttle.bytes / seconds, 1) if seconds > 0 else None,
                 findings=sum(counts.values()), new=new, resolved=len(resolved),
                 by_kind={k: n for k, n in counts.items() if n})
