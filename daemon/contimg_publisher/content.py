"""What a staged product holds, read through descriptors without following links: the
errors that say it cannot be taken now (Rejected, NotReady), a file's or a folder's
description (checked content, checksum, metadata), and a folder's digest and settle
witness. Detection describes products with it (through their kinds.ProductKind), and
publishing compares and verifies folder copies with it."""

from __future__ import annotations

import hashlib
import os
import stat
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from contimg_publisher import fits, paths, treewalk
from contimg_publisher.config import ProductRule
from contimg_publisher.registry import Identity, pending_checksum

FITS_SUFFIXES = (".fits", ".fit", ".fts")
Busy = Callable[[int, bytes], bool] | None  # whether a descriptor (and its path) has a writer


class Rejected(Exception):
    """The path is bad input: recorded as `rejected` with this reason."""


class NotReady(Exception):
    """The path is still changing: look at it again later."""


def tree_digest(dir_fd: int, algorithm: str,
                busy: Callable[[int, bytes], bool] | None = None,
                hash_fd: Callable[[int, str], tuple[int, str]] | None = None
                ) -> tuple[int, str, int]:
    """(total bytes, "algorithm:hex" over a sorted manifest of the tree, newest ctime_ns).

    The manifest holds each entry's relative path, type, size and content digest, so two
    folders digest equally exactly when they hold the same files with the same bytes.
    Raises Rejected on a link or special file inside, and paths.TreeProblem (an OSError) on
    a folder it does not enter (deeper than paths.MAX_DEPTH, a loop, unreadable): the
    digest of a tree not read whole would be wrong. `hash_fd` reads each file (the audit
    passes one that keeps to its rate; default fits.hash_fd, looked up when called).
    """
    read = hash_fd if hash_fd is not None else fits.hash_fd
    lines: list[bytes] = []
    total = 0
    newest = os.fstat(dir_fd).st_ctime_ns
    for folder in treewalk.walk(dir_fd):
        top_fd = folder.fd
        for name in sorted(folder.dirs + folder.files):
            st = os.stat(name, dir_fd=top_fd, follow_symlinks=False)
            newest = max(newest, st.st_ctime_ns)
            rel = b"/".join((*folder.parts, name))
            if stat.S_ISDIR(st.st_mode):
                lines.append(b"d\0" + rel + b"\n")
            elif stat.S_ISREG(st.st_mode):
                fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=top_fd)
                try:
                    if busy is not None and busy(fd, rel):
                        raise NotReady(f"{paths.shown((*folder.parts, name))} is open for writing")
                    size, digest = read(fd, algorithm)
                finally:
                    os.close(fd)
                total += size
                lines.append(b"f\0" + rel + b"\0" + str(size).encode() + b"\0" +
                             digest.encode() + b"\n")
            else:
                raise Rejected(f"{paths.shown((*folder.parts, name))} inside the folder is "
                               f"{paths.type_name(st.st_mode)}")
    manifest = hashlib.new(algorithm)
    for line in sorted(lines):
        manifest.update(line)
    return total, f"{algorithm}:{manifest.hexdigest()}", newest


def tree_digest_quick(dir_fd: int) -> tuple[int, int, int]:
    """(total bytes, file count, newest ctime_ns) without reading content: the settle witness
    of a folder product. Raises paths.TreeProblem as tree_digest() does."""
    total = count = 0
    newest = os.fstat(dir_fd).st_ctime_ns
    for folder in treewalk.walk(dir_fd):
        for name in folder.dirs + folder.files:
            try:
                st = os.stat(name, dir_fd=folder.fd, follow_symlinks=False)
            except FileNotFoundError:
                continue
            # ctime only: every write moves it, while mtime can be set to any time (cp -p,
            # tar, touch -d) and a future mtime would keep the product waiting until then.
            newest = max(newest, st.st_ctime_ns)
            if stat.S_ISREG(st.st_mode):
                total += st.st_size
                count += 1
    return total, count, newest


@dataclass(frozen=True)
class Description:
    identity: Identity
    checksum: str
    metadata: dict[str, Any]


def describe_file(root_fd: int, parts: tuple[bytes, ...], algorithm: str,
                  dirs: paths.DirCache | None = None,
                  busy: Callable[[int, bytes], bool] | None = None,
                  read_data: bool = True) -> Description:
    """Check a staged file's content and describe it in one streaming read.

    With read_data False a FITS file's headers alone are read: it is described by what
    they declare, its checksum pending (registry.pending_checksum) until the publish's copy
    reads it; its CHECKSUM/DATASUM are checked then (metadata fits_checksums "pending").

    `dirs` shares folder descriptors with the other files of one pass; without it the
    folders are opened for this file alone. The kept folders are not looked up again
    before the open: after the read, the path must still lead through them to the file
    that was read, or the file waits for another look.
    """
    if dirs is None:
        with paths.DirCache(root_fd) as own:
            return describe_file(root_fd, parts, algorithm, own, busy, read_data)
    try:
        fd, parent_fd, st = dirs.open_file(parts, verify=False)
    except paths.UnsafePath as exc:
        raise Rejected(exc.reason) from None
    try:
        before = Identity.of(st)
        # No writer, no publish: a file some process still has open for writing is not
        # finished, however long it has been quiet (a writer pausing between two HDUs).
        if busy is not None and busy(fd, b""):
            raise NotReady("open for writing by another process")
        if before.size == 0:
            raise Rejected("empty file (0 bytes)")
        head = os.pread(fd, 80, 0)
        name = os.fsdecode(parts[-1]).lower()
        if fits.is_fits_signature(head):
            try:
                if read_data:
                    report = fits.scan_fits(fd, algorithm=algorithm)
                    checksum, metadata = report.checksum, dict(report.metadata)
                    metadata["fits_checksums"] = report.fits_checksums
                    metadata["hdus"] = report.hdus
                else:
                    headers = fits.read_headers(fd)
                    checksum, metadata = pending_checksum(algorithm), dict(headers.metadata)
                    metadata["fits_checksums"] = "pending" if headers.declares_checksums \
                        else "absent"
                    metadata["hdus"] = headers.hdus
            except fits.FitsError as exc:
                raise Rejected(f"invalid FITS: {exc.reason}") from None
        elif name.endswith(FITS_SUFFIXES):
            raise Rejected("not a FITS file: it does not start with the card 'SIMPLE  ='")
        else:
            _size, checksum = fits.hash_fd(fd, algorithm=algorithm)
            metadata = {}
        after = Identity.of(os.fstat(fd))
        if not before.same(after) or after.ctime_ns != before.ctime_ns:
            raise NotReady("changed while being read")
        if busy is not None and busy(fd, b""):
            raise NotReady("opened for writing while being read")
        # The name must still lead to the file that was read, through the same folders.
        try:
            now = Identity.of(os.stat(parts[-1], dir_fd=parent_fd, follow_symlinks=False))
        except FileNotFoundError:
            raise NotReady("vanished while being read") from None
        if not now.same(after) or not dirs.is_current(parts[:-1], parent_fd):
            raise NotReady("replaced while being read")
        return Description(after, checksum, metadata)
    finally:
        os.close(fd)


def describe_directory(root_fd: int, parts: tuple[bytes, ...], rule: ProductRule,
                       algorithm: str,
                       busy: Callable[[int, bytes], bool] | None = None) -> Description:
    try:
        dir_fd = paths.open_dir_under(root_fd, parts)
    except paths.UnsafePath as exc:
        raise Rejected(exc.reason) from None
    try:
        before = os.fstat(dir_fd)
        for required in rule.required:
            try:
                st = os.stat(required, dir_fd=dir_fd, follow_symlinks=False)
            except FileNotFoundError:
                raise Rejected(f"incomplete {rule.type}: {required} is missing") from None
            if not stat.S_ISREG(st.st_mode):
                raise Rejected(f"{required} is {paths.type_name(st.st_mode)}, not a regular file")
        try:
            total, checksum, newest = tree_digest(dir_fd, algorithm, busy)
            _total, files, quick_newest = tree_digest_quick(dir_fd)
        except FileNotFoundError:
            # Something inside went away during the walk: the folder is still changing. (The
            # folder itself is held open; if it is gone, the next check finds that.)
            raise NotReady("changed while being read") from None
        except paths.TreeProblem as exc:
            if exc.kind is paths.Problem.CHANGED:
                raise NotReady(str(exc)) from None
            raise Rejected(f"{exc.path} inside the folder {exc.reason}") from None
        if quick_newest != newest:
            raise NotReady("changed while being read")
        ident = Identity(before.st_dev, before.st_ino, total, before.st_mtime_ns, newest)
        return Description(ident, checksum, {"files": files})
    finally:
        os.close(dir_fd)
