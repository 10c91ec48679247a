"""Whether a file can take writes now, asked of the kernel by name, never by opening it.

SQLite maps the registry's WAL index (`-shm`) into memory, shared and writable, and
writes it as plain memory: read marks when a read starts, hash entries and the header
when a write commits. A file made immutable (`chattr +i`) has its dirty pages written
back and write-protected at once (ext4 does so when the flag is set), and the next write
to such a page faults into the filesystem, which refuses it with SIGBUS, not an error
code: the process dies. The same happens when the filesystem went read-only under the
mapping (ext4 `errors=remount-ro`). So the registry asks here before each transaction
and gives up with an error instead. Files are looked up by name only: opening and closing
a descriptor of the registry would drop the POSIX locks SQLite holds on it.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import struct

# linux/stat.h
_AT_FDCWD = -100
_AT_SYMLINK_NOFOLLOW = 0x100
_STATX_BASIC_STATS = 0x7FF
_STATX_ATTR_IMMUTABLE = 0x10
_STATX_ATTR_APPEND = 0x20
_ATTRIBUTES_OFFSET = 8         # struct statx: stx_attributes (u64)
_ATTRIBUTES_MASK_OFFSET = 56   # stx_attributes_mask (u64)
_STATX_SIZE = 256

_statx: object = None  # the libc function once looked up; False when there is none


def _libc_statx() -> object:
    global _statx
    if _statx is None:
        try:
            libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
            func = libc.statx
            func.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_uint,
                             ctypes.c_void_p]
            func.restype = ctypes.c_int
            _statx = func
        except (OSError, AttributeError):
            _statx = False
    return _statx


def flags(path: str) -> tuple[bool, bool] | None:
    """(immutable, append-only) as the filesystem reports them; None when the file does
    not exist or the kernel cannot say (no statx, or a filesystem without the attributes)."""
    func = _libc_statx()
    if not func:
        return None
    buf = ctypes.create_string_buffer(_STATX_SIZE)
    if func(_AT_FDCWD, os.fsencode(path), _AT_SYMLINK_NOFOLLOW,  # type: ignore[operator]
            _STATX_BASIC_STATS, buf) != 0:
        return None
    attributes, = struct.unpack_from("=Q", buf, _ATTRIBUTES_OFFSET)
    known, = struct.unpack_from("=Q", buf, _ATTRIBUTES_MASK_OFFSET)
    if not known & (_STATX_ATTR_IMMUTABLE | _STATX_ATTR_APPEND):
        return None
    return bool(attributes & _STATX_ATTR_IMMUTABLE), bool(attributes & _STATX_ATTR_APPEND)


def why_unwritable(path: str) -> str | None:
    """Why the existing file at `path` cannot take writes now, or None (writable, absent,
    or nothing known against it). Permission bits are not asked: a descriptor opened
    before a chmod keeps writing."""
    found = flags(path)
    if found is not None:
        immutable, append = found
        if immutable:
            return "immutable (chattr +i)"
        if append:
            return "append-only (chattr +a)"
    elif not _libc_statx() and os.path.lexists(path) and not os.access(path, os.W_OK):
        return "not writable"  # no statx: access() refuses an immutable file, even root's
    try:
        if os.statvfs(path).f_flag & os.ST_RDONLY:
            return "on a read-only filesystem"
    except OSError:  # absent, or unreachable: SQLite itself then says why
        return None
    return None
