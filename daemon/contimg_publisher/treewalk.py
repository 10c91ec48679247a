"""Iterative walks of a folder tree through descriptors, with a depth limit.

Every walk of the staging area, of a folder product and of the products area goes through
`walk()`: each folder is opened relative to its parent's descriptor with O_NOFOLLOW and
listed with os.scandir on that descriptor, so the length of a path never matters (a tree
whose paths exceed PATH_MAX, 4,096 bytes, is walked like any other), and the walk keeps its
own stack, so a deep tree cannot exhaust Python's recursion (os.walk and os.fwalk recurse
on Python 3.11). What the walk does not enter is a `paths.TreeProblem` with its reason:

- a folder more than MAX_DEPTH (paths.MAX_DEPTH, 256) levels below the top (no product
  needs that many, and a chain of thousands is an accident or an attack);
- a folder that is one of its own parents (a bind mount of a parent below itself);
- a folder that cannot be opened or listed (permissions, I/O errors).

Descriptors are bounded too: at most WINDOW folders of the stack are held open; a folder
whose descriptor was let go is opened again, name by name from the nearest folder still
held, and must be the very folder (device and inode) it was.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Callable, Generator
from dataclasses import dataclass, field

from contimg_publisher import paths
from contimg_publisher.paths import MAX_DEPTH as MAX_DEPTH
from contimg_publisher.paths import Problem as Problem
from contimg_publisher.paths import TreeProblem as TreeProblem

# Folder descriptors a walk holds open at once, at most (besides the caller's top).
WINDOW = 32
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


@dataclass
class Folder:
    """One folder of a walk. `fd` is borrowed: valid until the walk goes on. Remove names
    from `dirs` to keep the walk out of them (as with os.walk, top-down)."""

    parts: tuple[bytes, ...]     # relative to the top; () for the top itself
    fd: int
    dirs: list[bytes]            # folders (never a link)
    files: list[bytes]           # everything else: files, links, FIFOs, ...

    @property
    def rel(self) -> bytes:
        """The folder relative to the top, as a path (b"." for the top)."""
        return b"/".join(self.parts) or b"."


@dataclass(eq=False)
class _Frame:
    parts: tuple[bytes, ...]
    fd: int | None               # None: let go (WINDOW), opened again when needed
    ident: tuple[int, int]
    chain: tuple[tuple[int, int], ...]  # (st_dev, st_ino) of the top and every folder to here
    pending: list[bytes] = field(default_factory=list)  # subfolders still to enter, reversed


def _list(fd: int) -> tuple[list[bytes], list[bytes]]:
    """(folders, other names) of a folder, sorted; a name that vanishes meanwhile is left
    out. Links are never taken for folders."""
    dirs: list[bytes] = []
    files: list[bytes] = []
    with os.scandir(fd) as it:
        for entry in it:
            name = os.fsencode(entry.name)
            try:
                is_dir = entry.is_dir(follow_symlinks=False)
            except FileNotFoundError:
                continue
            (dirs if is_dir else files).append(name)
    dirs.sort()
    files.sort()
    return dirs, files


def walk(top_fd: int, *, max_depth: int = MAX_DEPTH,
         on_problem: Callable[[TreeProblem], None] | None = None,
         top: bytes = b"") -> Generator[Folder, None, None]:
    """Every folder below the folder `top_fd` (itself first), top-down, depth first, names
    sorted; no link followed, no folder entered twice on one chain.

    A folder the walk does not enter goes to `on_problem`; without it, the walk raises the
    TreeProblem. `top` (the top's path) only words the messages. The caller's top_fd is
    neither closed nor moved.
    """
    def problem(parts: tuple[bytes, ...], kind: Problem, reason: str) -> None:
        exc = TreeProblem(parts, kind, reason, top)
        if on_problem is None:
            raise exc
        on_problem(exc)

    top_st = os.fstat(top_fd)
    try:
        dirs, files = _list(top_fd)
    except OSError as exc:
        problem((), Problem.UNREADABLE, f"cannot be listed: {exc.strerror or exc}")
        return
    here = Folder((), top_fd, dirs, files)
    yield here
    ident = (top_st.st_dev, top_st.st_ino)
    stack = [_Frame((), top_fd, ident, (ident,), list(reversed(here.dirs)))]
    held: list[_Frame] = []  # frames whose descriptor is ours, oldest first
    try:
        while stack:
            frame = stack[-1]
            if not frame.pending:
                stack.pop()
                _let_go(frame, held)
                continue
            name = frame.pending.pop()
            parts = frame.parts + (name,)
            if len(parts) > max_depth:
                problem(parts, Problem.TOO_DEEP, paths.too_deep_reason(max_depth))
                continue
            parent_fd = _descriptor(stack, top_fd, held, problem)
            if parent_fd is None:
                frame.pending.clear()  # replaced meanwhile: reported, not entered
                continue
            try:
                fd = os.open(name, _DIR_FLAGS, dir_fd=parent_fd)
            except OSError as exc:
                if exc.errno not in (errno.ENOENT, errno.ENOTDIR, errno.ELOOP):
                    problem(parts, Problem.UNREADABLE,
                            f"cannot be opened: {exc.strerror or exc}")
                continue  # gone, or no longer a folder: nothing to enter
            try:
                st = os.fstat(fd)
                ident = (st.st_dev, st.st_ino)
                if ident in frame.chain:
                    problem(parts, Problem.LOOP,
                            "is the same folder as one of its parents (a bind mount of a "
                            "parent below itself?); not entered again")
                    os.close(fd)
                    continue
                try:
                    dirs, files = _list(fd)
                except OSError as exc:
                    problem(parts, Problem.UNREADABLE, f"cannot be listed: {exc.strerror or exc}")
                    os.close(fd)
                    continue
            except BaseException:
                os.close(fd)
                raise
            child = _Frame(parts, fd, ident, frame.chain + (ident,))
            held.append(child)
            if not frame.pending:
                stack.pop()  # its last subfolder: nothing more to open from it
                _let_go(frame, held)
            here = Folder(parts, fd, dirs, files)
            yield here
            child.pending = list(reversed(here.dirs))
            stack.append(child)
            while len(held) > WINDOW:
                oldest = held.pop(0)
                if oldest.fd is not None:
                    os.close(oldest.fd)
                    oldest.fd = None
    finally:
        for frame in held:
            if frame.fd is not None:
                os.close(frame.fd)
        held.clear()


def _let_go(frame: _Frame, held: list[_Frame]) -> None:
    """Close a frame's descriptor (unless it is the caller's top) once it is done with."""
    if frame in held:
        held.remove(frame)
        if frame.fd is not None:
            os.close(frame.fd)
    frame.fd = None


def _descriptor(stack: list[_Frame], top_fd: int, held: list[_Frame],
                problem: Callable[[tuple[bytes, ...], Problem, str], None]) -> int | None:
    """The descriptor of the frame on top of the stack; one let go is opened again from the
    nearest folder held, name by name, and must be the same folder it was (else the problem
    is reported and None returned)."""
    frame = stack[-1]
    if frame.fd is not None:
        return frame.fd
    base_fd = top_fd
    base_parts: tuple[bytes, ...] = ()
    for lower in reversed(stack[:-1]):
        if lower.fd is not None:
            base_fd, base_parts = lower.fd, lower.parts
            break
    fd = os.dup(base_fd)
    try:
        for part in frame.parts[len(base_parts):]:
            nxt = os.open(part, _DIR_FLAGS, dir_fd=fd)
            os.close(fd)
            fd = nxt
        st = os.fstat(fd)
    except OSError as exc:
        os.close(fd)
        problem(frame.parts, Problem.CHANGED,
                f"was moved or replaced while the walk was below it ({exc.strerror or exc}); "
                "what it holds is looked at on the next walk")
        return None
    if (st.st_dev, st.st_ino) != frame.ident:
        os.close(fd)
        problem(frame.parts, Problem.CHANGED,
                "was replaced while the walk was below it; what it holds is looked at on "
                "the next walk")
        return None
    frame.fd = fd
    held.append(frame)
    return fd
