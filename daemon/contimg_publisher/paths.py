"""Safe filesystem primitives: descriptor-relative, never following links, never
acting on a name twice."""

from __future__ import annotations

import ctypes
import errno
import os
import stat
from collections.abc import Sequence

TEMP_PREFIX = b".contimg-tmp."
_RENAME_NOREPLACE = 1
_libc = ctypes.CDLL(None, use_errno=True)


class UnsafePath(Exception):
    """A path that must not be acted on; .path (display form) and .reason."""

    def __init__(self, path: bytes | str, reason: str) -> None:
        self.path = display(path)
        self.reason = reason
        super().__init__(f"{self.path}: {reason}")


def display(path: bytes | str) -> str:
    """Printable, lossless rendering: control bytes, backslash and bad UTF-8 escaped."""
    raw = os.fsencode(path)
    out = []
    for ch in raw.decode("utf-8", "surrogateescape"):
        code = ord(ch)
        if 0xDC80 <= code <= 0xDCFF:
            out.append(f"\\x{code - 0xDC00:02x}")
        elif ch == "\\":
            out.append("\\\\")
        elif code < 0x20 or code == 0x7F:
            out.append({"\n": "\\n", "\t": "\\t"}.get(ch, f"\\x{code:02x}"))
        else:
            out.append(ch)
    return "".join(out)


def undisplay(text: str) -> bytes:
    out = bytearray()
    i = 0
    while i < len(text):
        ch = text[i]
        if ch == "\\" and i + 1 < len(text):
            nxt = text[i + 1]
            if nxt == "x":
                out.append(int(text[i + 2:i + 4], 16))
                i += 4
                continue
            out += {"n": b"\n", "t": b"\t", "\\": b"\\"}[nxt]
            i += 2
            continue
        out += ch.encode("utf-8")
        i += 1
    return bytes(out)


def relative_components(root: str | bytes, path: str | bytes) -> tuple[bytes, ...]:
    """Components of path under root, lexically; UnsafePath when it leaves root."""
    root_b = os.path.normpath(os.fsencode(root))
    path_b = os.fsencode(path)
    full = path_b if os.path.isabs(path_b) else os.path.join(root_b, path_b)
    norm = os.path.normpath(full)
    if not norm.startswith(root_b.rstrip(b"/") + b"/"):
        raise UnsafePath(path_b, f"is not inside {display(root_b)}")
    parts = tuple(p for p in norm[len(root_b.rstrip(b"/")) + 1:].split(b"/") if p)
    if not parts or any(p in (b".", b"..") for p in parts):
        raise UnsafePath(path_b, f"is not inside {display(root_b)}")
    return parts


def name_problem(component: bytes, max_bytes: int = 240) -> str | None:
    if not component:
        return "empty name"
    try:
        text = component.decode("utf-8")
    except UnicodeDecodeError:
        return "not valid UTF-8"
    if any(ord(c) < 0x20 or ord(c) == 0x7F for c in text):
        return "contains control characters (such as a newline)"
    if len(component) > max_bytes:
        return f"{len(component)} bytes long; at most {max_bytes} leave room for a version suffix"
    return None


def open_root(path: str | bytes) -> int:
    return os.open(os.fsencode(path), os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)


def open_dir_under(root_fd: int, components: Sequence[bytes], *, create: bool = False,
                   mode: int = 0o755) -> int:
    fd = os.dup(root_fd)
    walked: list[bytes] = []
    try:
        for part in components:
            walked.append(part)
            try:
                nxt = os.open(part, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC,
                              dir_fd=fd)
            except FileNotFoundError:
                if not create:
                    raise
                try:
                    os.mkdir(part, mode, dir_fd=fd)
                    os.fsync(fd)
                except FileExistsError:
                    pass
                nxt = os.open(part, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC,
                              dir_fd=fd)
            except OSError as exc:
                if exc.errno in (errno.ELOOP, errno.ENOTDIR):
                    st = os.stat(part, dir_fd=fd, follow_symlinks=False)
                    kind = "a symbolic link" if stat.S_ISLNK(st.st_mode) else "not a folder"
                    raise UnsafePath(b"/".join(walked), f"is {kind}") from None
                raise
            os.close(fd)
            fd = nxt
        return fd
    except BaseException:
        os.close(fd)
        raise


def open_file_under(root_fd: int, components: Sequence[bytes],
                    flags: int = os.O_RDONLY) -> tuple[int, int]:
    parent = open_dir_under(root_fd, components[:-1])
    try:
        try:
            fd = os.open(components[-1], flags | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK,
                         dir_fd=parent)
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                raise UnsafePath(b"/".join(components), "is a symbolic link") from None
            raise
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            os.close(fd)
            kind = {stat.S_IFIFO: "a FIFO", stat.S_IFSOCK: "a socket",
                    stat.S_IFCHR: "a character device", stat.S_IFBLK: "a block device",
                    stat.S_IFDIR: "a folder"}.get(stat.S_IFMT(st.st_mode), "not a regular file")
            raise UnsafePath(b"/".join(components), f"is {kind}, not a regular file")
        os.set_blocking(fd, True)
        return fd, parent
    except BaseException:
        os.close(parent)
        raise


def lstat_under(root_fd: int, components: Sequence[bytes]) -> os.stat_result:
    parent = open_dir_under(root_fd, components[:-1])
    try:
        return os.stat(components[-1], dir_fd=parent, follow_symlinks=False)
    finally:
        os.close(parent)


def fsync_dir(dir_fd: int) -> None:
    os.fsync(dir_fd)


def rename_noreplace(src_dir_fd: int, src_name: bytes, dst_dir_fd: int, dst_name: bytes) -> None:
    """renameat2(RENAME_NOREPLACE); FileExistsError when the destination exists."""
    res = _libc.renameat2(src_dir_fd, src_name, dst_dir_fd, dst_name, _RENAME_NOREPLACE)
    if res == 0:
        return
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS) and stat.S_ISREG(
            os.stat(src_name, dir_fd=src_dir_fd, follow_symlinks=False).st_mode):
        link_noreplace(src_dir_fd, src_name, dst_dir_fd, dst_name)
        os.unlink(src_name, dir_fd=src_dir_fd)
        return
    if err == errno.EEXIST:
        raise FileExistsError(err, os.strerror(err), display(dst_name))
    raise OSError(err, os.strerror(err), display(dst_name))


def link_noreplace(src_dir_fd: int, src_name: bytes, dst_dir_fd: int, dst_name: bytes) -> None:
    os.link(src_name, dst_name, src_dir_fd=src_dir_fd, dst_dir_fd=dst_dir_fd,
            follow_symlinks=False)


def create_exclusive(dir_fd: int, name: bytes, mode: int = 0o600) -> int:
    return os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                   mode, dir_fd=dir_fd)


def temp_name(final_name: bytes, token: str) -> bytes:
    tail = b"." + token.encode()
    room = 255 - len(TEMP_PREFIX) - len(tail)
    return TEMP_PREFIX + final_name[:room] + tail


def parse_temp_name(name: bytes) -> str | None:
    if not name.startswith(TEMP_PREFIX) or b"." not in name[len(TEMP_PREFIX):]:
        return None
    return name.rsplit(b".", 1)[1].decode("utf-8", "replace")


def remove_tree_under(dir_fd: int, name: bytes) -> None:
    try:
        st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    except FileNotFoundError:
        return
    if not stat.S_ISDIR(st.st_mode):
        os.unlink(name, dir_fd=dir_fd)
        return
    fd = os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dir_fd)
    try:
        for entry in os.listdir(fd):
            remove_tree_under(fd, os.fsencode(entry))
    finally:
        os.close(fd)
    os.rmdir(name, dir_fd=dir_fd)
