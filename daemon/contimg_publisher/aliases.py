"""Whether one folder lies inside another by what they are, not by how they are spelled.

Paths and their realpath cannot see a bind mount: a folder inside the staging area
bind-mounted elsewhere and named as the products area has another path and the same
device and inode. Two views are used:

- identity: (st_dev, st_ino) of a folder and of each folder above it (walked up by `..`
  from a descriptor), so a root that is the same folder as another, or a folder above it,
  under any name, is seen;
- place: the filesystem a path is on and its path inside that filesystem, from the kernel's
  mount table (/proc/self/mountinfo), with the mounts below a folder counted as part of it,
  so a bind mount of a folder inside another root (or of another root into this one) is
  seen from either side.

No import from the rest of the program: the configuration uses it.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass

MOUNTINFO = "/proc/self/mountinfo"
MOUNTINFO_MAX_BYTES = 16 << 20  # the mount table is read whole, up to this size
MAX_DEPTH = 4096               # folders walked up at most (a path is at most 4096 bytes)
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC

Identity = tuple[int, int]
PathArg = str | bytes | os.PathLike[str]


def identity_of(st: os.stat_result) -> Identity:
    return st.st_dev, st.st_ino


def chain_fd(dir_fd: int) -> list[Identity]:
    """The identity of the folder `dir_fd` and of every folder above it, up to the root
    (bounded by MAX_DEPTH)."""
    out = [identity_of(os.fstat(dir_fd))]
    fd = os.dup(dir_fd)
    try:
        for _ in range(MAX_DEPTH):
            up = os.open("..", _DIR_FLAGS, dir_fd=fd)
            os.close(fd)
            fd = up
            here = identity_of(os.fstat(fd))
            if here == out[-1]:
                break  # the root: `..` is itself
            out.append(here)
    finally:
        os.close(fd)
    return out


def lies_inside(dir_fd: int, area: Identity) -> bool:
    """Whether the folder `dir_fd` is the folder `area` or lies below it, by identity."""
    return area in chain_fd(dir_fd)


def identity_of_path(path: PathArg) -> Identity | None:
    """The identity of an existing folder (links followed, as the roots are); None when it
    cannot be looked at."""
    try:
        return identity_of(os.stat(os.fsencode(path)))
    except OSError:
        return None


def chain_of_path(path: PathArg) -> list[Identity]:
    """chain_fd of an existing folder; [] when it cannot be opened."""
    try:
        fd = os.open(os.fsencode(path), _DIR_FLAGS)
    except OSError:
        return []
    try:
        return chain_fd(fd)
    except OSError:
        return []
    finally:
        os.close(fd)


# --- the mount table ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Mount:
    """One line of mountinfo: the filesystem (major:minor), the folder of that filesystem
    it shows (`root`) and where (`point`)."""

    device: bytes
    root: bytes
    point: bytes


def _unescape(field: bytes) -> bytes:
    """mountinfo writes space, tab, newline and backslash as \\ooo."""
    if b"\\" not in field:
        return field
    out, i = bytearray(), 0
    while i < len(field):
        if field[i:i + 1] == b"\\" and field[i + 1:i + 4].isdigit() and len(field) >= i + 4:
            out.append(int(field[i + 1:i + 4], 8) & 0xFF)
            i += 4
        else:
            out.append(field[i])
            i += 1
    return bytes(out)


def mounts(source: str = MOUNTINFO) -> list[Mount] | None:
    """The mount table in the kernel's order; None when it cannot be read (no /proc)."""
    try:
        with open(source, "rb") as fh:
            data = fh.read(MOUNTINFO_MAX_BYTES + 1)
    except OSError:
        return None
    if len(data) > MOUNTINFO_MAX_BYTES:
        return None  # not a table this check can take whole; the other view still runs
    out = []
    for line in data.splitlines():
        fields = line.split(b" ")
        if len(fields) >= 5:
            out.append(Mount(fields[2], _unescape(fields[3]), _unescape(fields[4])))
    return out


def _within(path: bytes, folder: bytes) -> bool:
    return path == folder or path.startswith(folder.rstrip(b"/") + b"/")


def place(path: PathArg, table: list[Mount]) -> tuple[bytes, bytes] | None:
    """(filesystem, path inside it) of a path (its links resolved; it need not exist): the
    mount whose point is the nearest above it, the last one mounted there."""
    real = os.path.realpath(os.fsencode(path))
    best: Mount | None = None
    for m in table:
        if _within(real, m.point) and (best is None or len(m.point) >= len(best.point)):
            best = m
    if best is None:
        return None
    rest = real[len(best.point.rstrip(b"/")):]
    return best.device, os.path.normpath(best.root.rstrip(b"/") + rest) if rest else best.root


def reach(path: PathArg, table: list[Mount]) -> list[tuple[bytes, bytes]]:
    """Every (filesystem, folder inside it) that can be reached below `path`: its own place
    and the folders mounted below it."""
    real = os.path.realpath(os.fsencode(path))
    own = place(path, table)
    out = [own] if own is not None else []
    out += [(m.device, m.root) for m in table if m.point != real and _within(m.point, real)]
    return out


# --- the question the configuration asks ---------------------------------------------------------


def inside(child: PathArg, parent: PathArg, table: list[Mount] | None) -> bool:
    """Whether folder `child` is folder `parent` or lies inside it, by identity along its
    parent chain or by its place in a filesystem (bind mounts included). A path that does
    not exist yet is judged by place alone."""
    area = identity_of_path(parent)
    if area is not None and area in chain_of_path(child):
        return True
    if table is None:
        return False
    own = place(child, table)
    if own is None:
        return False
    return any(device == own[0] and _within(own[1], folder)
               for device, folder in reach(parent, table))


def overlap(a: PathArg, b: PathArg, table: list[Mount] | None) -> str | None:
    """How folders a and b overlap ("the same folder as", "inside", "contains"), or None."""
    a_in_b, b_in_a = inside(a, b, table), inside(b, a, table)
    if a_in_b and b_in_a:
        return "is the same folder as"
    if a_in_b:
        return "lies inside"
    if b_in_a:
        return "contains"
    return None


def current_table() -> list[Mount] | None:
    """This process's mount table, or None (then identity alone is compared)."""
    with contextlib.suppress(OSError):
        return mounts()
    return None
