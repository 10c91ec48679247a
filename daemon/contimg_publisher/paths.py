"""Safe filesystem primitives for the staging and products areas.

Every action below a root goes through a directory descriptor: folders are walked one
component at a time with O_NOFOLLOW, a file is checked with fstat on the very descriptor
that is then used, and nothing is looked up by name twice. Names are bytes throughout,
because the pipeline may write names that are not UTF-8 or that contain newlines.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import functools
import os
import platform
import re
import stat
import unicodedata
import uuid
from collections.abc import Sequence
from enum import StrEnum

TEMP_PREFIX = b".contimg-tmp."
NAME_MAX = 255
# How many levels of folders below its top a walk (treewalk.walk) or a removal enters.
# Products are a few levels deep; 256 leaves room for any layout, while a hostile chain of
# thousands costs nothing and is reported with this reason.
MAX_DEPTH = 256
_TOKEN = re.compile(rb"[A-Za-z0-9_-]{1,64}")
_RENAME_NOREPLACE = 1
_SYS_RENAMEAT2 = {"x86_64": 316, "amd64": 316, "aarch64": 276, "arm64": 276}
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC

_libc = ctypes.CDLL(None, use_errno=True)
_libc_renameat2 = getattr(_libc, "renameat2", None)
if _libc_renameat2 is not None:
    _libc_renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p,
                                ctypes.c_uint]
    _libc_renameat2.restype = ctypes.c_int


class UnsafePath(Exception):
    """A staged path that must not be acted on; .path (display form) and .reason."""

    def __init__(self, path: bytes | str, reason: str) -> None:
        self.path = display(path)
        self.reason = reason
        super().__init__(f"{self.path}: {reason}")


class Problem(StrEnum):
    """Why a walk did not enter a folder."""

    TOO_DEEP = "too_deep"        # more than MAX_DEPTH levels below the top
    LOOP = "loop"                # the folder is one of its own parents (a bind mount)
    UNREADABLE = "unreadable"    # cannot be opened or listed
    CHANGED = "changed"          # moved or replaced while the walk was below it


class TreeProblem(OSError):
    """A folder a walk (or a removal) did not enter, with the reason. An OSError, so that
    every handler of a filesystem failure also handles it; `strerror` is the reason alone,
    str() leads with the folder (relative to the walk's top, or under `top` when given)."""

    def __init__(self, parts: tuple[bytes, ...], kind: Problem, reason: str,
                 top: bytes = b"") -> None:
        super().__init__(reason)
        self.strerror = reason
        self.parts = parts
        self.kind = kind
        self.reason = reason
        self.top = top

    @property
    def path(self) -> str:
        """The folder, displayed (shortened when long)."""
        return shown(self.parts, self.top)

    def __str__(self) -> str:
        return f"{self.path}: {self.reason}"


def too_deep_reason(max_depth: int = MAX_DEPTH) -> str:
    return (f"is more than {max_depth} levels of folders deep (the depth limit of every "
            "walk); what it holds is not looked at")


# A shortened path in a message keeps this many characters at each end.
_SHOWN_ENDS = 100


def shown(parts: Sequence[bytes], top: bytes = b"") -> str:
    """display() of top/parts for a message, its middle cut out when long (a chain of
    thousands of folders would fill a log line); the levels and bytes cut are counted."""
    full = os.path.join(top, *parts) if top else (b"/".join(parts) or b".")
    text = display(full)
    if len(text) <= 2 * _SHOWN_ENDS + 40:
        return text
    return (f"{text[:_SHOWN_ENDS]}...({len(parts)} levels, {len(full)} bytes)..."
            f"{text[-_SHOWN_ENDS:]}")


# --- display ---------------------------------------------------------------------------

_SHORT_ESCAPES = {"\n": "\\n", "\t": "\\t", "\r": "\\r", "\\": "\\\\"}
_SHORT_UNESCAPES = {"n": b"\n", "t": b"\t", "r": b"\r", "\\": b"\\"}
_PLAIN = re.compile(r"[ -\[\]-~]*")  # printable ASCII except backslash
_PRINTABLE_ASCII = re.compile(rb"[ -~]*")


def _invisible(ch: str) -> bool:
    """Control, formatting (bidi overrides, zero-width) and line/paragraph separators:
    characters that would break or disguise a log line."""
    return unicodedata.category(ch) in ("Cc", "Cf", "Zl", "Zp")


def display(path: bytes | str) -> str:
    """Lossless, printable rendering of a path for logs, the registry and the CLI.

    Valid UTF-8 is kept except backslash (\\\\), newline/tab/CR (\\n, \\t, \\r), other ASCII
    controls (\\xNN) and invisible non-ASCII characters (\\uNNNN); bytes that are not
    UTF-8 become \\xNN (always >= 0x80, so never confused with a character).
    """
    raw = os.fsencode(path)
    text = raw.decode("utf-8", "surrogateescape")
    if _PLAIN.fullmatch(text):
        return text
    out: list[str] = []
    for ch in text:
        code = ord(ch)
        if ch in _SHORT_ESCAPES:
            out.append(_SHORT_ESCAPES[ch])
        elif 0xDC80 <= code <= 0xDCFF:
            out.append(f"\\x{code - 0xDC00:02x}")
        elif code < 0x80 and _invisible(ch):
            out.append(f"\\x{code:02x}")
        elif _invisible(ch):
            out.append(f"\\u{code:04x}" if code <= 0xFFFF else f"\\U{code:08x}")
        else:
            out.append(ch)
    return "".join(out)


def undisplay(text: str) -> bytes:
    """Inverse of display(): the original bytes of a displayed path."""
    out = bytearray()
    i, n = 0, len(text)
    while i < n:
        j = text.find("\\", i)
        if j < 0:
            out += text[i:].encode("utf-8", "surrogateescape")
            break
        out += text[i:j].encode("utf-8", "surrogateescape")
        if j + 1 >= n:
            raise ValueError(f"{text!r}: ends with a lone backslash")
        kind = text[j + 1]
        if kind in _SHORT_UNESCAPES:
            out += _SHORT_UNESCAPES[kind]
            i = j + 2
            continue
        width = {"x": 2, "u": 4, "U": 8}.get(kind)
        digits = text[j + 2:j + 2 + (width or 0)]
        if width is None or len(digits) != width or \
                not all(c in "0123456789abcdefABCDEF" for c in digits):
            raise ValueError(f"{text!r}: invalid escape at offset {j}")
        value = int(digits, 16)
        if kind == "x":
            out.append(value)
        else:
            try:
                out += chr(value).encode("utf-8")
            except (ValueError, UnicodeEncodeError):
                raise ValueError(f"{text!r}: \\{kind}{digits} is not a character") from None
        i = j + 2 + width
    return bytes(out)


# --- names and components ----------------------------------------------------------------


def _component_problem(component: bytes) -> str | None:
    """Why a single component cannot be used relative to a directory descriptor."""
    if not component:
        return "has an empty component"
    if component in (b".", b".."):
        return f"has a {component.decode()!r} component"
    if b"/" in component:
        return "has a component containing '/'"
    if b"\0" in component:
        return "contains a NUL byte"
    return None


def _check_components(components: Sequence[bytes]) -> None:
    for component in components:
        problem = _component_problem(component)
        if problem is not None:
            raise UnsafePath(b"/".join(components), problem)


def _check_name(name: bytes) -> None:
    problem = _component_problem(name)
    if problem is not None:
        raise UnsafePath(name, f"is not a single name: it {problem}")


def _normalise_absolute(path: bytes) -> list[bytes]:
    """POSIX lexical normalisation of an absolute path ('..' at '/' stays at '/')."""
    parts: list[bytes] = []
    for part in path.split(b"/"):
        if part in (b"", b"."):
            continue
        if part == b"..":
            if parts:
                parts.pop()
        else:
            parts.append(part)
    return parts


def relative_components(root: str | bytes, path: str | bytes) -> tuple[bytes, ...]:
    """Components of `path` below `root`, lexically, without touching the filesystem.

    An absolute `path` must lie under `root`; a relative one is taken relative to `root`
    and may not climb above it at any point ('a/../../x'). Names that merely contain
    '..' ('nightly..fits') are ordinary names.
    """
    root_b, path_b = os.fsencode(root), os.fsencode(path)
    if b"\0" in path_b:
        raise UnsafePath(path_b, "contains a NUL byte")
    if not os.path.isabs(root_b):
        root_b = os.path.abspath(root_b)
    root_parts = _root_parts(root_b)
    if os.path.isabs(path_b):
        parts = _normalise_absolute(path_b)
        if parts[:len(root_parts)] != root_parts:
            raise UnsafePath(path_b, f"is not under {_shown_root(root_parts)}")
        parts = parts[len(root_parts):]
    else:
        parts = []
        for part in path_b.split(b"/"):
            if part in (b"", b"."):
                continue
            if part == b"..":
                if not parts:
                    raise UnsafePath(path_b,
                                     f"climbs out of {_shown_root(root_parts)} with '..'")
                parts.pop()
            else:
                parts.append(part)
    if not parts:
        raise UnsafePath(path_b, f"is {_shown_root(root_parts)} itself, not a path under it")
    _check_components(parts)
    return tuple(parts)


@functools.lru_cache(maxsize=32)
def _root_parts(root_b: bytes) -> list[bytes]:
    """Normalised components of an absolute root; cached because every event and every
    walked path is taken relative to the same few roots. Callers must not modify the list."""
    return _normalise_absolute(root_b)


def _shown_root(root_parts: list[bytes]) -> str:
    return display(b"/" + b"/".join(root_parts))


def name_problem(component: bytes, max_bytes: int = 240) -> str | None:
    """Why a name component is not acceptable as a product name, or None.

    max_bytes stays below the 255-byte limit so that a version suffix or a temporary name
    still fits.
    """
    if not component:
        return "the name is empty"
    if component in (b".", b".."):
        return f"{component.decode()!r} is not a name"
    if b"/" in component or b"\0" in component:
        return "contains '/' or a NUL byte"
    if not _PRINTABLE_ASCII.fullmatch(component):
        # Printable ASCII is valid UTF-8 without invisible characters; anything else is
        # looked at character by character.
        try:
            text = component.decode("utf-8")
        except UnicodeDecodeError as exc:
            return (f"is not valid UTF-8 (byte 0x{component[exc.start]:02x} at offset "
                    f"{exc.start})")
        bad = next((ch for ch in text if _invisible(ch)), None)
        if bad is not None:
            return (f"contains the control or invisible character U+{ord(bad):04X} "
                    "(such as a newline); rename the file")
    if len(component) > max_bytes:
        return (f"is {len(component)} bytes long; at most {max_bytes} bytes leave room for a "
                "version suffix under the 255-byte limit")
    if component.startswith(TEMP_PREFIX):
        return f"starts with {TEMP_PREFIX.decode()!r}, reserved for temporary files"
    return None


# --- opening -----------------------------------------------------------------------------


def type_name(mode: int) -> str:
    """'a FIFO', 'a folder', ...: what a file is, for a message."""
    return {stat.S_IFLNK: "a symbolic link", stat.S_IFIFO: "a FIFO", stat.S_IFSOCK: "a socket",
            stat.S_IFCHR: "a character device", stat.S_IFBLK: "a block device",
            stat.S_IFDIR: "a folder", stat.S_IFREG: "a regular file"}.get(
        stat.S_IFMT(mode), f"a file of unknown type 0o{stat.S_IFMT(mode):o}")


def _refusal(dir_fd: int, name: bytes, shown: bytes, wanted: str) -> UnsafePath:
    """The UnsafePath for a name that could not be opened as `wanted`; the lstat only
    words the message, nothing is acted on."""
    try:
        st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    except OSError:
        return UnsafePath(shown, f"changed while being opened; it is not {wanted}")
    if stat.S_ISLNK(st.st_mode):
        return UnsafePath(shown, "is a symbolic link; links below the root are not followed")
    return UnsafePath(shown, f"is {type_name(st.st_mode)}, not {wanted}")


def open_root(path: str | bytes) -> int:
    """Descriptor of a root folder. The operator may reach the root itself through
    symbolic links; only below the root are links refused."""
    return os.open(os.fsencode(path), os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)


def open_folder(path: bytes, root: bytes) -> int:
    """A folder recorded by its path (a row's temporary or final name): below `root` it is
    reached from root's descriptor one component at a time (no length limit on the path,
    no link followed below the root); elsewhere by its path."""
    try:
        parts = relative_components(root, path)
    except UnsafePath:
        return os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    root_fd = open_root(root)
    try:
        return open_dir_under(root_fd, parts)
    finally:
        os.close(root_fd)


def _open_dir_at(dir_fd: int, name: bytes, shown: bytes) -> int:
    try:
        return os.open(name, _DIR_FLAGS, dir_fd=dir_fd)
    except OSError as exc:
        if exc.errno in (errno.ELOOP, errno.ENOTDIR):
            raise _refusal(dir_fd, name, shown, "a folder") from None
        raise


def open_dir_under(root_fd: int, components: Sequence[bytes], *, create: bool = False,
                   mode: int = 0o755) -> int:
    """Walk `components` from root_fd one at a time, refusing links and non-folders.

    With create=True missing folders are made (mode, minus the umask) and each new
    folder's parent is fsynced so the folder survives a crash. Returns a new descriptor.
    """
    _check_components(components)
    fd = os.dup(root_fd)
    try:
        for depth, part in enumerate(components):
            nxt = _open_or_make_dir_at(fd, part, b"/".join(components[:depth + 1]),
                                       mode if create else None)
            os.close(fd)
            fd = nxt
        return fd
    except BaseException:
        os.close(fd)
        raise


def _open_or_make_dir_at(dir_fd: int, name: bytes, shown: bytes, mode: int | None) -> int:
    """_open_dir_at(); with a mode, a missing folder is made first and its parent fsynced,
    so the folder survives a crash."""
    try:
        return _open_dir_at(dir_fd, name, shown)
    except FileNotFoundError:
        if mode is None:
            raise
        try:
            os.mkdir(name, mode, dir_fd=dir_fd)
            os.fsync(dir_fd)
        except FileExistsError:
            pass
        return _open_dir_at(dir_fd, name, shown)


def open_file_under(root_fd: int, components: Sequence[bytes],
                    flags: int = os.O_RDONLY) -> tuple[int, int]:
    """Open a regular file below root_fd; returns (file_fd, parent_dir_fd).

    O_NONBLOCK keeps a FIFO from blocking the open; the type is then checked with fstat
    on the same descriptor, so what was checked is what gets used.
    """
    if not components:
        raise UnsafePath(b"", "no file name given")
    _check_components(components)
    parent = open_dir_under(root_fd, components[:-1])
    try:
        fd, _st = _open_file_in(parent, components[-1], b"/".join(components), flags)
        return fd, parent
    except BaseException:
        os.close(parent)
        raise


def _open_file_in(parent: int, name: bytes, shown: bytes, flags: int
                  ) -> tuple[int, os.stat_result]:
    """Open a regular file `name` in the folder `parent`: (descriptor, its fstat)."""
    try:
        fd = os.open(name, flags | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK, dir_fd=parent)
    except OSError as exc:
        # ELOOP: a link; ENXIO: a socket, or a FIFO opened for writing with no reader;
        # EISDIR: a folder opened for writing.
        if exc.errno in (errno.ELOOP, errno.ENXIO, errno.EISDIR):
            raise _refusal(parent, name, shown, "a regular file") from None
        raise
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise UnsafePath(shown, f"is {type_name(st.st_mode)}, not a regular file")
        os.set_blocking(fd, True)
    except BaseException:
        os.close(fd)
        raise
    return fd, st


class DirCache:
    """Folder descriptors below one root descriptor, shared by the paths of one pass.

    A pass that checks many files in few folders would otherwise walk every folder on the way
    to every file again (open and close per component, several times per file). Folders are
    opened exactly as open_dir_under() opens them (one component at a time, O_NOFOLLOW,
    relative to the parent's descriptor) and kept with their (st_dev, st_ino). Before a
    kept descriptor is used again, each name on the way is looked up again (lstat relative
    to the verified parent) and must still be that very folder; a folder renamed, removed or
    replaced (by a link, say) is dropped and opened afresh, with the refusals and errors of a
    fresh walk. The folder held open cannot have its inode reused, so an equal (st_dev,
    st_ino) is the same folder.

    A descriptor handed out is borrowed: the caller must not close it, and may use it only
    until its next call to this cache that can open or drop folders (folder(), lstat(),
    open_file()); close() (or leaving the `with` block) closes them all. Keep one cache to
    one pass: folders may be renamed between passes.
    """

    # Bound on folders held open, far below the usual limit of 1024 descriptors.
    LIMIT = 64

    def __init__(self, root_fd: int, *, limit: int | None = LIMIT,
                 create_mode: int | None = None) -> None:
        """limit None: no folder is closed before close() (descriptors handed out stay
        valid for the whole pass: a publish batch holds its folders across its steps).
        create_mode: missing folders are made with it (see open_dir_under)."""
        self.root_fd = root_fd
        self.limit = limit
        self.create_mode = create_mode
        self._held: dict[tuple[bytes, ...], tuple[int, int, int]] = {}  # fd, st_dev, st_ino

    def __enter__(self) -> DirCache:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    def close(self) -> None:
        held, self._held = self._held, {}
        for fd, _dev, _ino in held.values():
            os.close(fd)

    def _drop(self, key: tuple[bytes, ...]) -> None:
        """Forget a folder and everything kept below it."""
        for other in [k for k in self._held if k[:len(key)] == key]:
            os.close(self._held.pop(other)[0])

    def folder(self, components: Sequence[bytes], *, verify: bool = True) -> int:
        """Borrowed descriptor of the folder at `components` below the root (the root itself
        for no components); raises what open_dir_under() raises.

        verify=False skips looking the kept folders up again: only for a caller that
        verified the same folder with its previous call, moments before.
        """
        components = tuple(components)
        _check_components(components)
        return self._folder(components, verify)

    def _check(self, components: tuple[bytes, ...]) -> None:
        """_check_components(), skipping a folder prefix that is held (checked when opened)."""
        if len(components) > 1 and components[:-1] in self._held:
            problem = _component_problem(components[-1])
            if problem is not None:
                raise UnsafePath(b"/".join(components), problem)
        else:
            _check_components(components)

    def _folder(self, components: tuple[bytes, ...], verify: bool) -> int:
        """folder() for components already checked. A folder more than MAX_DEPTH levels
        down is refused (UnsafePath): each level would hold a descriptor."""
        if len(components) > MAX_DEPTH:
            raise UnsafePath(b"/".join(components),
                             f"lies {len(components)} levels of folders deep, more than "
                             f"{MAX_DEPTH} (the depth limit of every walk); not looked at")
        if not verify and (held := self._held.get(components)) is not None:
            return held[0]
        if self.limit is not None and len(self._held) >= self.limit:
            self.close()
        fd = self.root_fd
        for depth, part in enumerate(components):
            key = components[:depth + 1]
            held = self._held.get(key)
            if held is not None:
                if not verify or _is_folder(fd, part, held[1], held[2]):
                    fd = held[0]
                    continue
                self._drop(key)
            nxt = _open_or_make_dir_at(fd, part, b"/".join(key), self.create_mode)
            try:
                st = os.fstat(nxt)
            except BaseException:
                os.close(nxt)
                raise
            self._held[key] = (nxt, st.st_dev, st.st_ino)
            fd = nxt
        return fd

    def is_current(self, components: Sequence[bytes], fd: int) -> bool:
        """Whether `components` still lead, name by name from the root, to the kept folders
        ending in `fd`; opens and drops nothing."""
        parent = self.root_fd
        components = tuple(components)
        for depth, part in enumerate(components):
            held = self._held.get(components[:depth + 1])
            if held is None or not _is_folder(parent, part, held[1], held[2]):
                return False
            parent = held[0]
        return parent == fd

    def lstat(self, components: Sequence[bytes], *, verify: bool = True) -> os.stat_result:
        """lstat of the final component, not following it, its parent reached through the
        kept folders."""
        if not components:
            raise UnsafePath(b"", "no name given")
        components = tuple(components)
        self._check(components)
        parent = self._folder(components[:-1], verify)
        return os.stat(components[-1], dir_fd=parent, follow_symlinks=False)

    def open_file(self, components: Sequence[bytes], flags: int = os.O_RDONLY, *,
                  verify: bool = True) -> tuple[int, int, os.stat_result]:
        """open_file_under() through the kept folders: (file descriptor, borrowed parent
        descriptor, the fstat that checked the file's type). The caller closes only the
        file descriptor. verify=False: as for folder()."""
        if not components:
            raise UnsafePath(b"", "no file name given")
        components = tuple(components)
        self._check(components)
        parent = self._folder(components[:-1], verify)
        fd, st = _open_file_in(parent, components[-1], b"/".join(components), flags)
        return fd, parent, st


def _is_folder(parent: int, name: bytes, dev: int, ino: int) -> bool:
    """Whether `name` in `parent` is, right now, the folder (dev, ino), not a link to it."""
    try:
        st = os.stat(name, dir_fd=parent, follow_symlinks=False)
    except OSError:
        return False
    return st.st_ino == ino and st.st_dev == dev and stat.S_ISDIR(st.st_mode)


# --- changing names ----------------------------------------------------------------------


def fsync_dir(dir_fd: int) -> None:
    """Make the folder's entries (new, renamed, removed names) durable."""
    os.fsync(dir_fd)


def _renameat2_syscall(src_dir_fd: int, src_name: bytes, dst_dir_fd: int, dst_name: bytes,
                       flags: int) -> int:
    """renameat2 through syscall(2), for a libc without the wrapper; 0 or an errno."""
    number = _SYS_RENAMEAT2.get(platform.machine().lower())
    if number is None:
        return errno.ENOSYS
    _libc.syscall.restype = ctypes.c_long
    res = _libc.syscall(ctypes.c_long(number), ctypes.c_int(src_dir_fd),
                        ctypes.c_char_p(src_name), ctypes.c_int(dst_dir_fd),
                        ctypes.c_char_p(dst_name), ctypes.c_uint(flags))
    return 0 if res == 0 else ctypes.get_errno()


def _renameat2(src_dir_fd: int, src_name: bytes, dst_dir_fd: int, dst_name: bytes,
               flags: int) -> int:
    """renameat2(2); 0 or an errno."""
    if _libc_renameat2 is None:
        return _renameat2_syscall(src_dir_fd, src_name, dst_dir_fd, dst_name, flags)
    res = _libc_renameat2(src_dir_fd, src_name, dst_dir_fd, dst_name, flags)
    return 0 if res == 0 else ctypes.get_errno()


def _rename_by_link(src_dir_fd: int, src_name: bytes, dst_dir_fd: int, dst_name: bytes) -> None:
    """No-replace rename of a regular file where RENAME_NOREPLACE is unsupported: link
    fails with EEXIST when the destination exists, then the source name is removed."""
    st = os.stat(src_name, dir_fd=src_dir_fd, follow_symlinks=False)
    if not stat.S_ISREG(st.st_mode):
        raise OSError(errno.EINVAL, f"cannot rename {type_name(st.st_mode)} without replacing "
                      "on this filesystem (no RENAME_NOREPLACE)", display(src_name))
    link_noreplace(src_dir_fd, src_name, dst_dir_fd, dst_name)
    os.unlink(src_name, dir_fd=src_dir_fd)


def rename_noreplace(src_dir_fd: int, src_name: bytes, dst_dir_fd: int, dst_name: bytes) -> None:
    """Atomic rename that never replaces an existing destination.

    FileExistsError when the destination exists, OSError(EXDEV) across filesystems.
    Where the filesystem lacks RENAME_NOREPLACE, a regular file is moved by link and
    unlink; a folder raises OSError(EINVAL), for the caller (which holds the publish
    lock) to handle.
    """
    _check_name(src_name)
    _check_name(dst_name)
    err = _renameat2(src_dir_fd, src_name, dst_dir_fd, dst_name, _RENAME_NOREPLACE)
    if err == 0:
        return
    if err in (errno.EINVAL, errno.ENOSYS):
        _rename_by_link(src_dir_fd, src_name, dst_dir_fd, dst_name)
        return
    raise OSError(err, os.strerror(err), display(src_name), None, display(dst_name))


def link_noreplace(src_dir_fd: int, src_name: bytes, dst_dir_fd: int, dst_name: bytes) -> None:
    """A second name for a file (the link itself if it is a link, never its target);
    FileExistsError when the destination exists."""
    _check_name(src_name)
    _check_name(dst_name)
    os.link(src_name, dst_name, src_dir_fd=src_dir_fd, dst_dir_fd=dst_dir_fd,
            follow_symlinks=False)


def _mount_id(fd: int) -> int | None:
    """The mount a descriptor lives on, from /proc/self/fdinfo; None where unreadable."""
    try:
        with open(f"/proc/self/fdinfo/{fd}", "rb") as fh:
            for line in fh:
                if line.startswith(b"mnt_id:"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def same_filesystem(fd_a: int, fd_b: int) -> bool:
    """Whether a rename or a hard link between the two folders can work.

    The same st_dev is not enough: two bind mounts of one filesystem (systemd's
    ReadWritePaths= makes them) refuse a rename or link between them with EXDEV.
    """
    if os.fstat(fd_a).st_dev != os.fstat(fd_b).st_dev:
        return False
    mount_a, mount_b = _mount_id(fd_a), _mount_id(fd_b)
    return mount_a is None or mount_b is None or mount_a == mount_b


def create_exclusive(dir_fd: int, name: bytes, mode: int = 0o600) -> int:
    """Create a new file for writing; FileExistsError if the name exists, even as a
    dangling link, so nothing is ever written through a link."""
    _check_name(name)
    return os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                   mode, dir_fd=dir_fd)


# --- temporary names ---------------------------------------------------------------------


def temp_name(final_name: bytes, token: str) -> bytes:
    """Temporary name for `final_name` in the destination folder:
    b'.contimg-tmp.' + final name (truncated to fit 255 bytes) + b'.' + token.

    The token (letters, digits, '-' and '_', at most 64) names the registry row the file
    belongs to, so reconciliation can match a leftover to its product.
    """
    token_b = token.encode("ascii", "replace")
    if not _TOKEN.fullmatch(token_b):
        raise ValueError(f"temporary-name token {token!r}: use 1 to 64 letters, digits, "
                         "'-' or '_'")
    _check_name(final_name)
    room = NAME_MAX - len(TEMP_PREFIX) - 1 - len(token_b)
    part = final_name[:room]
    if len(part) < len(final_name):
        # Cut on a character boundary when the name is UTF-8, so the temp name stays readable.
        for cut in range(len(part), max(len(part) - 4, -1), -1):
            try:
                part[:cut].decode("utf-8")
            except UnicodeDecodeError:
                continue
            part = part[:cut]
            break
    return TEMP_PREFIX + part + b"." + token_b


_NODE_TAG_MAX = 32  # leaves room in the 64-character token for a row id and 8 hex digits
_ATTEMPT = re.compile(r"[0-9a-f]{8}")


def node_tag(node: str) -> str:
    """A node's name as it stands in its temporary names: letters, digits, '-' and '_'
    (anything else becomes '_'), at most 32 characters."""
    return (re.sub(r"[^A-Za-z0-9_-]", "_", node)[:_NODE_TAG_MAX]) or "_"


def temp_token(node: str, row_id: int) -> str:
    """The token of a temporary name: '<node tag>-<row id>-<8 random hex digits>'. The node
    says whose copy in flight it is, in a products area several nodes share; the row id
    which product; the random part which attempt."""
    return f"{node_tag(node)}-{row_id}-{uuid.uuid4().hex[:8]}"


def temp_node(token: str) -> str | None:
    """The node tag of a token made by temp_token(), or None for a token without one
    (written before temporary names carried the node)."""
    parts = token.rsplit("-", 2)
    if len(parts) == 3 and parts[0] and parts[1].isdigit() and _ATTEMPT.fullmatch(parts[2]):
        return parts[0]
    return None


def temp_row(token: str) -> int | None:
    """The row id of a token made by temp_token(), or None for a token without one."""
    parts = token.rsplit("-", 2)
    if len(parts) == 3 and parts[0] and parts[1].isdigit() and _ATTEMPT.fullmatch(parts[2]):
        return int(parts[1])
    return None


def parse_temp_name(name: bytes) -> str | None:
    """The token of a temporary name made by temp_name(), or None if the name is not ours."""
    name = os.fsencode(name)
    if not name.startswith(TEMP_PREFIX):
        return None
    rest = name[len(TEMP_PREFIX):]
    if b"." not in rest:
        return None
    token = rest.rsplit(b".", 1)[1]
    return token.decode("ascii") if _TOKEN.fullmatch(token) else None


# --- removal -----------------------------------------------------------------------------


def remove_tree_under(dir_fd: int, name: bytes, max_depth: int = MAX_DEPTH) -> None:
    """Remove the file or folder tree `name` in dir_fd, never following a link (a link is
    removed, its target is left alone). A name that is already gone is fine.

    Iterative, through descriptors (no path is built, so its length never matters); a
    folder more than `max_depth` levels below `name` raises TreeProblem before anything
    below the limit is removed from it (what was removed elsewhere stays removed)."""
    _check_name(name)
    fd = _open_folder_or_unlink(name, dir_fd)
    if fd is None:
        return
    # Each frame: (the folder's descriptor, its name, names in it still to remove).
    stack: list[tuple[int, bytes, list[bytes]]] = []
    try:
        stack.append((fd, name, _clearable(fd)))
        while stack:
            folder_fd, folder_name, entries = stack[-1]
            if not entries:
                stack.pop()
                os.close(folder_fd)
                parent = stack[-1][0] if stack else dir_fd
                with contextlib.suppress(FileNotFoundError):
                    os.rmdir(folder_name, dir_fd=parent)
                continue
            entry = entries.pop()
            sub = _open_folder_or_unlink(entry, folder_fd)
            if sub is None:
                continue
            if len(stack) > max_depth:
                os.close(sub)
                raise TreeProblem((name, *(f[1] for f in stack[1:]), entry),
                                  Problem.TOO_DEEP, too_deep_reason(max_depth))
            try:
                stack.append((sub, entry, _clearable(sub)))
            except BaseException:
                os.close(sub)
                raise
    finally:
        for folder_fd, _name, _entries in stack:
            os.close(folder_fd)


def _open_folder_or_unlink(name: bytes, dir_fd: int) -> int | None:
    """`name` opened as a folder (to be emptied), or None once it is gone: a file or a link
    is unlinked here, a name already gone is left gone."""
    try:
        return os.open(name, _DIR_FLAGS, dir_fd=dir_fd)
    except FileNotFoundError:
        return None
    except OSError as exc:
        if exc.errno not in (errno.ENOTDIR, errno.ELOOP):
            raise
    with contextlib.suppress(FileNotFoundError):
        os.unlink(name, dir_fd=dir_fd)
    return None


def _clearable(fd: int) -> list[bytes]:
    """The names in a folder, after making it clearable: our own copied trees may be
    read-only."""
    with contextlib.suppress(OSError):
        os.fchmod(fd, stat.S_IMODE(os.fstat(fd).st_mode) | stat.S_IRWXU)
    return [os.fsencode(entry) for entry in os.listdir(fd)]
