"""Deep and long trees around the daemon: staging folders thousands of levels deep (paths
far over PATH_MAX, 4,096 bytes), a folder product holding such a chain, and an archive with
one. Real trees made with mkdir relative to folder descriptors, real daemon processes and the
real commands. Nothing may end the daemon or a command; what is not walked is said, with
the reason."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from contimg_publisher import paths, treewalk

DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW


def make_chain(parent: Path, names: list[bytes]) -> None:
    """Folders parent/names[0]/names[1]/..., each made relative to its parent's descriptor:
    a path of any length can be made this way."""
    fd = os.open(parent, DIR_FLAGS)
    try:
        for name in names:
            os.mkdir(name, dir_fd=fd)
            nxt = os.open(name, DIR_FLAGS, dir_fd=fd)
            os.close(fd)
            fd = nxt
    finally:
        os.close(fd)


def write_at(parent: Path, names: list[bytes], leaf: bytes, data: bytes) -> None:
    """A file at parent/names.../leaf, reached through descriptors."""
    fd = os.open(parent, DIR_FLAGS)
    try:
        for name in names:
            nxt = os.open(name, DIR_FLAGS, dir_fd=fd)
            os.close(fd)
            fd = nxt
        out = os.open(leaf, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644, dir_fd=fd)
        try:
            os.write(out, data)
        finally:
            os.close(out)
    finally:
        os.close(fd)


def exists_at(parent: Path, names: list[bytes]) -> bool:
    fd = os.open(parent, DIR_FLAGS)
    try:
        for name in names[:-1]:
            nxt = os.open(name, DIR_FLAGS, dir_fd=fd)
            os.close(fd)
            fd = nxt
        os.stat(names[-1], dir_fd=fd, follow_symlinks=False)
        return True
    except FileNotFoundError:
        return False
    finally:
        os.close(fd)


@pytest.fixture
def deep_cleanup(tmp_path: Path) -> Iterator[Path]:
    """tmp_path, emptied with rm -rf afterwards: shutil.rmtree (pytest's clean-up) recurses
    and fails on a chain thousands of folders deep."""
    yield tmp_path
    subprocess.run(["rm", "-rf", "--one-file-system", str(tmp_path)], check=False,
                   timeout=300)


def test_walk_reaches_paths_over_path_max_and_stops_at_the_depth_limit(
        deep_cleanup: Path) -> None:
    """The walk itself: files far beyond 4,096 bytes of path are reached; a chain deeper than
    the limit is reported once with its reason (or raised, without a handler); a comb of
    folders (two at every level) is walked whole while the walk holds at most WINDOW folder
    descriptors."""
    top = deep_cleanup / "top"
    top.mkdir()
    long_names = [bytes([ord("a") + i % 26]) * 250 for i in range(40)]
    make_chain(top, long_names)
    write_at(top, long_names, b"leaf", b"x")
    make_chain(top, [b"chain"] + [b"c"] * 400)
    comb = [b"comb"] + [b"x"] * 100
    make_chain(top, comb)
    for depth in range(1, len(comb)):
        os.mkdir(b"y", dir_fd=(fd := _open_path(top, comb[:depth])))
        os.close(fd)
    baseline = len(os.listdir("/proc/self/fd"))
    most = 0
    problems: list[paths.TreeProblem] = []
    seen: list[tuple[bytes, ...]] = []
    leaf_found = False
    top_fd = os.open(top, DIR_FLAGS)
    try:
        for folder in treewalk.walk(top_fd, on_problem=problems.append):
            seen.append(folder.parts)
            most = max(most, len(os.listdir("/proc/self/fd")))
            if folder.parts == tuple(long_names):
                leaf_found = folder.files == [b"leaf"]
        assert leaf_found
        assert len(b"/".join(long_names)) > 10_000
        assert len(seen) == len(set(seen))
        comb_folders = [p for p in seen if p[:1] == (b"comb",)]
        assert len(comb_folders) == 1 + 100 + 100  # the comb, and an x and a y in each
        assert [p.kind for p in problems] == ["too_deep"]
        assert len(problems[0].parts) == treewalk.MAX_DEPTH + 1
        assert problems[0].parts[0] == b"chain"
        assert most - baseline <= treewalk.WINDOW + 2
        with pytest.raises(paths.TreeProblem) as raised:
            for _folder in treewalk.walk(top_fd):
                pass
        assert "more than 256 levels" in str(raised.value)
        assert len(os.listdir("/proc/self/fd")) == baseline + 1  # only top_fd is left
        # Removal is iterative too: the long tree goes, the too-deep chain is refused.
        paths.remove_tree_under(top_fd, long_names[0])
        assert not os.path.lexists(top / os.fsdecode(long_names[0]))
        with pytest.raises(paths.TreeProblem):
            paths.remove_tree_under(top_fd, b"chain")
        assert exists_at(top, [b"chain", *[b"c"] * 400])
    finally:
        os.close(top_fd)


def _open_path(top: Path, names: list[bytes]) -> int:
    fd = os.open(top, DIR_FLAGS)
    for name in names:
        nxt = os.open(name, DIR_FLAGS, dir_fd=fd)
        os.close(fd)
        fd = nxt
    return fd


def test_walk_reports_a_bind_mount_loop(deep_cleanup: Path) -> None:
    """A folder bind-mounted below itself: the walk does not go round; it says where."""
    if os.geteuid() != 0:
        pytest.skip("a bind mount needs root")
    top = deep_cleanup / "top"
    (top / "a" / "b").mkdir(parents=True)
    (top / "a" / "file").write_bytes(b"x")
    subprocess.run(["mount", "--bind", str(top / "a"), str(top / "a" / "b")], check=True)
    try:
        problems: list[paths.TreeProblem] = []
        top_fd = os.open(top, DIR_FLAGS)
        try:
            seen = [f.parts for f in treewalk.walk(top_fd, on_problem=problems.append)]
        finally:
            os.close(top_fd)
        assert seen == [(), (b"a",)]
        assert [(p.kind, p.parts) for p in problems] == [("loop", (b"a", b"b"))]
        assert "one of its parents" in problems[0].reason
    finally:
        subprocess.run(["umount", str(top / "a" / "b")], check=False)
