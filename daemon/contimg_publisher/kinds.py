"""What detection and publishing do differently for a file product and a folder product.

Detection and the protocol (`publish`) are the same for both; each step that depends on
the kind asks the product's `ProductKind` (`of(rule)`): what its type must be, how to
describe it, when it last changed, whether an lstat proves it unchanged, whether it has
sidecars; and for publishing how to open it, whether an inode in it has another name,
whether some process is writing it, how to copy it, compare it, chmod it after a rename,
and remove its staged copy.
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat
import threading
from collections.abc import Callable

from contimg_publisher import content, paths, transfer, treewalk, writers
from contimg_publisher.config import ProductRule
from contimg_publisher.registry import Identity, checksum_known
from contimg_publisher.states import Kind

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
Tick = Callable[[], None]


class ProductKind:
    """The file product; FolderKind overrides what differs for a folder."""

    kind = Kind.FILE
    has_sidecars = True
    # Whether the final name is reserved in the registry before the rename: a file's is
    # taken atomically by its no-replace rename (or link) alone.
    reserves_name = False
    type_text = "a regular file"
    open_flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK

    def is_type(self, mode: int) -> bool:
        return stat.S_ISREG(mode)

    def describe(self, root_fd: int, parts: tuple[bytes, ...], rule: ProductRule,
                 algorithm: str, dirs: paths.DirCache, busy: content.Busy,
                 read_data: bool) -> content.Description:
        """Check the staged product's content and describe it (content.Rejected: bad input;
        content.NotReady: still changing or being written)."""
        return content.describe_file(root_fd, parts, algorithm, dirs, busy, read_data)

    def newest_inside(self, root_fd: int, parts: tuple[bytes, ...]) -> int | None:
        """The newest ctime (ns) of what the product holds beyond its own inode."""
        return None

    def unchanged(self, st: os.stat_result, registered: Identity) -> bool:
        """Whether an lstat alone proves the staged product is the one registered (a
        rescan's shortcut past what is already described)."""
        return self.is_type(st.st_mode) and registered.same(Identity.of(st))

    def linked_elsewhere(self, fd: int, st: os.stat_result) -> bool:
        """Whether renaming would move an inode that also has a name outside the product."""
        return st.st_nlink != 1

    def written(self, gate: writers.WriterGate, fd: int, path: bytes) -> bool:
        """Whether any process has the product (open at `fd`, staged at `path`) open for
        writing."""
        return gate.busy(fd, path)

    def copy(self, src_fd: int, dest_fd: int, temp: bytes, algorithm: str,
             fits_size: int | None, file_mode: int, dir_mode: int,
             cancel: threading.Event | None, tick: Tick) -> transfer.Copied:
        """Copy into `temp` (created here) in dest_fd, hashing it, and with fits_size (the
        size its headers declared) checking it as FITS in the same read (FitsError)."""
        return transfer.copy_file(src_fd, dest_fd, temp, algorithm, file_mode, cancel, tick,
                                  fits_size)

    def size_to_verify(self, st: os.stat_result, copied: int) -> int:
        """The size that must equal the registered one after a copy: the source's, so a
        file that grew during the copy fails the check."""
        return st.st_size

    def same_content(self, dir_fd: int, name: bytes, size: int | None,
                     checksum: str | None) -> bool:
        """Whether `name` in dir_fd already holds exactly these bytes (size: the registered
        size of a file, checked before anything is read). A checksum not yet computed
        matches nothing: nothing is read to compare with it."""
        if not checksum_known(checksum):
            return False
        try:
            st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
        except FileNotFoundError:
            return False
        if not self.is_type(st.st_mode):
            return False
        return self._digest(dir_fd, name, st, size, checksum.split(":", 1)[0]) == checksum

    def _digest(self, dir_fd: int, name: bytes, st: os.stat_result, size: int | None,
                algorithm: str) -> str | None:
        if size is not None and st.st_size != size:
            return None
        return transfer.hash_at(dir_fd, name, algorithm)[1]

    def after_rename(self, dest_fd: int, final: bytes, fd: int, file_mode: int,
                     dir_mode: int) -> None:
        """The product's modes, once the renamed inode has no other name."""
        os.fchmod(fd, file_mode)

    def remove_staged(self, src_parent: int, name: bytes, mode: int,
                      checksum: str | None) -> bool:
        """Remove the staged copy (already proven to be the published one, unchanged)."""
        if not stat.S_ISREG(mode):
            return False
        os.unlink(name, dir_fd=src_parent)
        return True

    def same(self, registered: Identity, now: Identity) -> bool:
        return registered.same(now, self.kind)


class FolderKind(ProductKind):
    """A folder product (a CASA image): its files travel together."""

    kind = Kind.DIRECTORY
    has_sidecars = False
    # A folder cannot be linked, and a products area shared by several nodes may live on a
    # filesystem without a no-replace rename: its name is reserved in the registry first.
    reserves_name = True
    type_text = "a folder"
    open_flags = ProductKind.open_flags | os.O_DIRECTORY

    def is_type(self, mode: int) -> bool:
        return stat.S_ISDIR(mode)

    def describe(self, root_fd: int, parts: tuple[bytes, ...], rule: ProductRule,
                 algorithm: str, dirs: paths.DirCache, busy: content.Busy,
                 read_data: bool) -> content.Description:
        return content.describe_directory(root_fd, parts, rule, algorithm, busy)

    def newest_inside(self, root_fd: int, parts: tuple[bytes, ...]) -> int | None:
        # A tree the walk does not take whole (paths.TreeProblem, an OSError) is left to
        # describe(), which rejects it with the reason.
        with contextlib.suppress(OSError, paths.UnsafePath):
            dir_fd = paths.open_dir_under(root_fd, parts)
            try:
                return content.tree_digest_quick(dir_fd)[2]
            finally:
                os.close(dir_fd)
        return None

    def unchanged(self, st: os.stat_result, registered: Identity) -> bool:
        return False  # the folder's own inode says nothing of the files in it

    def linked_elsewhere(self, fd: int, st: os.stat_result) -> bool:
        for folder in treewalk.walk(fd):
            for f in folder.files:
                with contextlib.suppress(FileNotFoundError):
                    if os.stat(f, dir_fd=folder.fd, follow_symlinks=False).st_nlink != 1:
                        return True
        return False

    def written(self, gate: writers.WriterGate, fd: int, path: bytes) -> bool:
        for folder in treewalk.walk(fd):
            for name in folder.files:
                try:
                    file_fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC |
                                      os.O_NONBLOCK, dir_fd=folder.fd)
                except FileNotFoundError:
                    continue
                except OSError as exc:
                    if exc.errno == errno.ELOOP:
                        continue  # a link: never written through; the digest rejects it
                    raise
                try:
                    inner = b"/".join((*folder.parts, name))
                    if stat.S_ISREG(os.fstat(file_fd).st_mode) and gate.busy(
                            file_fd, os.path.join(path, inner)):
                        return True
                finally:
                    os.close(file_fd)
        return False

    def copy(self, src_fd: int, dest_fd: int, temp: bytes, algorithm: str,
             fits_size: int | None, file_mode: int, dir_mode: int,
             cancel: threading.Event | None, tick: Tick) -> transfer.Copied:
        """A folder's files are hashed at registration, and its copy again (fits_size does
        not apply: a folder is never checked as one FITS file)."""
        size = transfer.copy_tree(src_fd, dest_fd, temp, file_mode, dir_mode, cancel, tick)
        tmp_fd = os.open(temp, _DIR_FLAGS, dir_fd=dest_fd)
        try:
            return transfer.Copied(size, content.tree_digest(tmp_fd, algorithm)[1])
        finally:
            os.close(tmp_fd)

    def size_to_verify(self, st: os.stat_result, copied: int) -> int:
        return copied

    def _digest(self, dir_fd: int, name: bytes, st: os.stat_result, size: int | None,
                algorithm: str) -> str | None:
        fd = os.open(name, _DIR_FLAGS, dir_fd=dir_fd)
        try:
            return content.tree_digest(fd, algorithm)[1]
        except (content.Rejected, paths.TreeProblem):
            return None  # a tree not read whole is never the same content
        finally:
            os.close(fd)

    def after_rename(self, dest_fd: int, final: bytes, fd: int, file_mode: int,
                     dir_mode: int) -> None:
        transfer.chmod_tree(dest_fd, final, file_mode, dir_mode)

    def remove_staged(self, src_parent: int, name: bytes, mode: int,
                      checksum: str | None) -> bool:
        """A folder goes only when its bytes, hashed again, are still the archived ones."""
        if not stat.S_ISDIR(mode) or not self.same_content(src_parent, name, None, checksum):
            return False
        paths.remove_tree_under(src_parent, name)
        return True


FILE, FOLDER = ProductKind(), FolderKind()


def of(rule: ProductRule) -> ProductKind:
    return FOLDER if rule.kind == Kind.DIRECTORY else FILE

