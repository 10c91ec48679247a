"""The staged source of a publish: no writer may hold it at a final rename, and it is
removed only once published, and only while its name still leads to what was published."""

from __future__ import annotations

import contextlib
import os

from contimg_publisher import kinds, paths, transfer, writers
from contimg_publisher.config import ProductRule
from contimg_publisher.publish.naming import Sidecar
from contimg_publisher.publish.steps import CrashPoint, crash_at
from contimg_publisher.registry import Identity
from contimg_publisher.states import FailureKind
from contimg_publisher.transfer import PublishFailure


def no_writer(gate: writers.WriterGate, fd: int, path: bytes, shown: str,
              kind: kinds.ProductKind = kinds.FILE) -> None:
    """Right before a final rename: a writer that appeared since registration would
    write into the archive (a rename) or has bytes the copy lacks."""
    if kind.written(gate, fd, path):
        raise PublishFailure(
            FailureKind.SOURCE_CHANGED, f"{shown}: open for writing by another "
            "process; it is examined again once the writer is done")


def remove_source(src_parent: int, name: bytes, ident: Identity, rule: ProductRule,
                  sidecars: list[Sidecar], dest_fd: int, checksum: str | None,
                  sync: bool = True) -> bool:
    """Remove the staged copy, only if the name still leads to what was published (a
    folder: the same inode, and the same bytes hashed again). Returns whether anything
    was removed; with sync False the caller fsyncs the folder."""
    crash_at(CrashPoint.BEFORE_SOURCE_REMOVAL)
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
