"""The safe filesystem primitives on real folders: names as bytes, links refused at every
level, renames that never replace, removal that never follows a link."""

from __future__ import annotations

import errno
import os
import random
import shutil
import socket
import stat
import unicodedata
from collections.abc import Iterator
from pathlib import Path

import pytest

from contimg_publisher import paths
from contimg_publisher.paths import UnsafePath


@pytest.fixture
def root(tmp_path: Path) -> Iterator[tuple[Path, int]]:
    top = tmp_path / "root"
    top.mkdir()
    fd = paths.open_root(str(top))
    yield top, fd
    os.close(fd)


# --- display ---------------------------------------------------------------------------------

SPECIAL = [b"\n", b"\t", b"\r", b"\\", b"\x00", b"\x1b", b"\x7f", b"\xff", b"\xe9", b"\xc3\xa9",
           "\u202e".encode(), "\u200b".encode(), "\u2028".encode(), "😀".encode(), b"\\x41",
           b"\\n", b"\\u0041", b" ", b"/"]


def test_display_round_trips_arbitrary_bytes() -> None:
    """Whatever bytes the pipeline puts in a name, the registry's display form gives them back
    exactly, and it is a single printable line."""
    rng = random.Random(1234)
    samples = [bytes(range(256)), b"".join(SPECIAL), b"plain/name.fits"]
    for _ in range(3000):
        n = rng.randrange(0, 40)
        pick = rng.random()
        if pick < 0.4:
            raw = bytes(rng.randrange(256) for _ in range(n))
        elif pick < 0.8:
            raw = b"".join(rng.choice(SPECIAL + [b"a", b"fits", b"."]) for _ in range(n))
        else:
            raw = "".join(chr(rng.randrange(0x20, 0x3000)) for _ in range(n)).encode(
                "utf-8", "surrogatepass")
        samples.append(raw)
    for raw in samples:
        shown = paths.display(raw)
        assert paths.undisplay(shown) == raw, (raw, shown)
        # No control, formatting or line-separator character survives to break a log line.
        assert not [c for c in shown if unicodedata.category(c) in ("Cc", "Cf", "Zl", "Zp",
                                                                     "Cs")], shown
        shown.encode("utf-8")   # always storable as TEXT


def test_display_examples() -> None:
    assert paths.display(b"caf\xe9.fits") == "caf\\xe9.fits"
    assert paths.display(b"new\nline.fits") == "new\\nline.fits"
    assert paths.display("café.fits".encode()) == "café.fits"
    assert paths.display(b"back\\slash") == "back\\\\slash"
    assert paths.display("rtl\u202e.fits".encode()) == "rtl\\u202e.fits"
    assert paths.display(b"bell\x07") == "bell\\x07"


@pytest.mark.parametrize("text", ["ends\\", "bad\\q", "short\\x4", "nochar\\ud800",
                                  "\\U00110000"])
def test_undisplay_refuses_malformed_escapes(text: str) -> None:
    with pytest.raises(ValueError):
        paths.undisplay(text)


# --- relative_components ---------------------------------------------------------------------

def test_relative_components_accepts_paths_under_root() -> None:
    assert paths.relative_components("/s", "/s/mosaics/a.fits") == (b"mosaics", b"a.fits")
    assert paths.relative_components("/s/", "/s//mosaics/./a.fits") == (b"mosaics", b"a.fits")
    assert paths.relative_components(b"/s", b"mosaics/x/../a.fits") == (b"mosaics", b"a.fits")
    assert paths.relative_components("/s", "/s/nightly..fits") == (b"nightly..fits",)
    assert paths.relative_components(b"/s", b"/s/caf\xe9\n.fits") == (b"caf\xe9\n.fits",)


@pytest.mark.parametrize(("path", "reason"), [
    ("/other/a.fits", "is not under /s"),
    ("/stage2/a.fits", "is not under /s"),      # a sibling sharing the prefix
    ("/s/../etc/passwd", "is not under /s"),
    ("../a.fits", "climbs out of /s"),
    ("a/../../a.fits", "climbs out of /s"),
    ("/s", "itself"),
    ("/s/.", "itself"),
    ("", "itself"),
    ("/s/a\0b", "NUL byte"),
])
def test_relative_components_refusals(path: str, reason: str) -> None:
    with pytest.raises(UnsafePath) as exc:
        paths.relative_components("/s", path)
    assert reason in exc.value.reason


def test_relative_components_relative_root_follows_the_current_folder(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A relative root is taken from the current folder at each call, not remembered."""
    (tmp_path / "one").mkdir()
    (tmp_path / "two").mkdir()
    monkeypatch.chdir(tmp_path / "one")
    assert paths.relative_components("s", str(tmp_path / "one/s/a.fits")) == (b"a.fits",)
    monkeypatch.chdir(tmp_path / "two")
    with pytest.raises(UnsafePath) as exc:
        paths.relative_components("s", str(tmp_path / "one/s/a.fits"))
    assert exc.value.reason == f"is not under {tmp_path / 'two/s'}"


# --- opening ---------------------------------------------------------------------------------

def test_open_file_under_reads_a_regular_file(root: tuple[Path, int]) -> None:
    top, fd = root
    (top / "a" / "b").mkdir(parents=True)
    (top / "a" / "b" / "f.fits").write_bytes(b"content")
    file_fd, parent_fd = paths.open_file_under(fd, (b"a", b"b", b"f.fits"))
    try:
        assert os.read(file_fd, 100) == b"content"
        assert os.fstat(parent_fd).st_ino == (top / "a" / "b").stat().st_ino
        assert os.get_blocking(file_fd)
    finally:
        os.close(file_fd)
        os.close(parent_fd)


@pytest.mark.parametrize("level", [0, 1, 2])
def test_open_file_under_refuses_a_link_at_every_level(root: tuple[Path, int], tmp_path: Path,
                                                       level: int) -> None:
    """A link anywhere between the root and the file is refused, even one that points to
    the very place the real path would reach."""
    top, fd = root
    real = tmp_path / "real"
    (real / "b").mkdir(parents=True)
    (real / "b" / "f.fits").write_bytes(b"secret")
    (top / "a" / "b").mkdir(parents=True)
    (top / "a" / "b" / "f.fits").write_bytes(b"staged")
    components = (b"a", b"b", b"f.fits")
    victim = top.joinpath(*[c.decode() for c in components[:level + 1]])
    target = real.joinpath(*[c.decode() for c in components[1:level + 1]]) if level else real
    if victim.is_dir():
        for child in sorted(victim.rglob("*"), reverse=True):
            child.rmdir() if child.is_dir() else child.unlink()
        victim.rmdir()
    else:
        victim.unlink()
    os.symlink(target, victim)
    with pytest.raises(UnsafePath) as exc:
        paths.open_file_under(fd, components)
    assert "symbolic link" in exc.value.reason
    assert exc.value.path == "/".join(c.decode() for c in components[:level + 1])
    assert (real / "b" / "f.fits").read_bytes() == b"secret"


def test_open_file_under_refuses_special_files(root: tuple[Path, int]) -> None:
    top, fd = root
    os.mkfifo(top / "pipe")
    (top / "dir").mkdir()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    cwd = os.getcwd()
    os.chdir(top)
    try:
        sock.bind("sock")
    finally:
        os.chdir(cwd)
    try:
        cases = {b"pipe": "is a FIFO", b"sock": "is a socket", b"dir": "is a folder"}
        for name, reason in cases.items():
            with pytest.raises(UnsafePath) as exc:
                paths.open_file_under(fd, (name,))
            assert reason in exc.value.reason, (name, exc.value.reason)
        # A FIFO without a writer must not block the open.
        with pytest.raises(UnsafePath):
            paths.open_file_under(fd, (b"pipe",), os.O_WRONLY)
    finally:
        sock.close()
    with pytest.raises(FileNotFoundError):
        paths.open_file_under(fd, (b"missing",))
    with pytest.raises(UnsafePath):
        paths.open_file_under(fd, (b"dir", b"..", b"x"))
    assert stat.S_ISFIFO(os.lstat(top / "pipe").st_mode)


def test_open_dir_under_create_refuses_links(root: tuple[Path, int], tmp_path: Path) -> None:
    top, fd = root
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    os.symlink(elsewhere, top / "linked")
    new = paths.open_dir_under(fd, (b"x", b"y"), create=True)
    os.close(new)
    assert (top / "x" / "y").is_dir()
    with pytest.raises(UnsafePath):
        paths.open_dir_under(fd, (b"linked", b"sub"), create=True)
    assert list(elsewhere.iterdir()) == []


# --- renaming --------------------------------------------------------------------------------

def test_rename_noreplace_never_replaces(root: tuple[Path, int]) -> None:
    top, fd = root
    (top / "src").write_bytes(b"new")
    (top / "dst").write_bytes(b"old")
    with pytest.raises(FileExistsError):
        paths.rename_noreplace(fd, b"src", fd, b"dst")
    assert (top / "dst").read_bytes() == b"old" and (top / "src").read_bytes() == b"new"
    # Not even a dangling link at the destination is replaced.
    os.symlink("nowhere", top / "dangling")
    with pytest.raises(FileExistsError):
        paths.rename_noreplace(fd, b"src", fd, b"dangling")
    assert os.readlink(top / "dangling") == "nowhere"
    (top / "d1").mkdir()
    (top / "d2").mkdir()
    with pytest.raises(FileExistsError):
        paths.rename_noreplace(fd, b"d1", fd, b"d2")
    paths.rename_noreplace(fd, b"src", fd, b"free")
    assert (top / "free").read_bytes() == b"new" and not (top / "src").exists()
    with pytest.raises(UnsafePath):
        paths.rename_noreplace(fd, b"free", fd, b"../escape")


def test_rename_noreplace_by_link_fallback_never_replaces(root: tuple[Path, int],
                                                          monkeypatch: pytest.MonkeyPatch
                                                          ) -> None:
    """On a filesystem without RENAME_NOREPLACE (the kernel answers EINVAL) the link-and-unlink
    path must keep the same guarantee."""
    top, fd = root
    monkeypatch.setattr(paths, "_renameat2", lambda *args: errno.EINVAL)
    (top / "src").write_bytes(b"new")
    (top / "dst").write_bytes(b"old")
    with pytest.raises(FileExistsError):
        paths.rename_noreplace(fd, b"src", fd, b"dst")
    assert (top / "dst").read_bytes() == b"old" and (top / "src").read_bytes() == b"new"
    paths.rename_noreplace(fd, b"src", fd, b"moved")
    assert (top / "moved").read_bytes() == b"new" and not (top / "src").exists()
    (top / "folder").mkdir()
    with pytest.raises(OSError) as exc:
        paths.rename_noreplace(fd, b"folder", fd, b"folder2")
    assert exc.value.errno == errno.EINVAL
    assert (top / "folder").is_dir() and not (top / "folder2").exists()


# --- temporary names -------------------------------------------------------------------------

@pytest.mark.parametrize("name", [b"m.fits", b"L" * 255, "é".encode() * 127 + b"x",
                                  b"caf\xe9\xff" * 51, b"new\nline"])
def test_temp_name_round_trip_fits_255_bytes(name: bytes, root: tuple[Path, int]) -> None:
    top, fd = root
    token = "a" * 64
    temp = paths.temp_name(name, token)
    assert temp.startswith(paths.TEMP_PREFIX) and len(temp) <= 255
    assert paths.parse_temp_name(temp) == token
    assert paths.parse_temp_name(paths.temp_name(name, "row-12_x")) == "row-12_x"
    if name.decode("utf-8", "ignore").encode() == name:   # UTF-8: cut on a character
        temp.decode("utf-8")
    os.close(paths.create_exclusive(fd, temp))          # the filesystem accepts the name
    assert os.path.exists(os.path.join(os.fsencode(top), temp))


def test_temp_name_refusals_and_foreign_names() -> None:
    for token in ("", "a" * 65, "has space", "dot.ted", "é"):
        with pytest.raises(ValueError):
            paths.temp_name(b"m.fits", token)
    assert paths.parse_temp_name(b"m.fits") is None
    assert paths.parse_temp_name(paths.TEMP_PREFIX + b"nodot") is None
    assert paths.parse_temp_name(paths.TEMP_PREFIX + b"m.fits.bad token") is None


# --- removal ---------------------------------------------------------------------------------

def test_remove_tree_under_never_follows_links(root: tuple[Path, int], tmp_path: Path) -> None:
    top, fd = root
    keep = tmp_path / "keep"
    (keep / "sub").mkdir(parents=True)
    (keep / "sub" / "precious").write_bytes(b"keep me")
    (keep / "file").write_bytes(b"keep me too")
    tree = top / "tree"
    (tree / "a" / "b").mkdir(parents=True)
    (tree / "a" / "b" / "f").write_bytes(b"x")
    os.symlink(keep, tree / "a" / "link-to-dir")
    os.symlink(keep / "file", tree / "link-to-file")
    os.chmod(tree / "a" / "b", 0o500)          # read-only folders are cleared too
    paths.remove_tree_under(fd, b"tree")
    assert not tree.exists()
    assert (keep / "sub" / "precious").read_bytes() == b"keep me"
    assert (keep / "file").read_bytes() == b"keep me too"
    # A link given as the name itself: the link goes, the target stays.
    os.symlink(keep, top / "toplink")
    paths.remove_tree_under(fd, b"toplink")
    assert not os.path.lexists(top / "toplink") and (keep / "sub" / "precious").exists()
    paths.remove_tree_under(fd, b"already-gone")
    with pytest.raises(UnsafePath):
        paths.remove_tree_under(fd, b"..")


# --- folder descriptors shared within a pass ------------------------------------------------

def _open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def test_dir_cache_shares_folders_and_closes_them(root: tuple[Path, int]) -> None:
    top, fd = root
    (top / "a" / "b").mkdir(parents=True)
    for name in ("f.fits", "g.fits"):
        (top / "a" / "b" / name).write_bytes(name.encode())
    before = _open_fds()
    with paths.DirCache(fd) as dirs:
        st = dirs.lstat((b"a", b"b", b"f.fits"))
        assert st.st_ino == (top / "a" / "b" / "f.fits").stat().st_ino
        file_fd, parent_fd, fst = dirs.open_file((b"a", b"b", b"g.fits"))
        try:
            assert os.read(file_fd, 100) == b"g.fits"
            assert (fst.st_ino, stat.S_ISREG(fst.st_mode)) == (
                (top / "a" / "b" / "g.fits").stat().st_ino, True)
            assert parent_fd == dirs.folder((b"a", b"b"))
            assert dirs.is_current((b"a", b"b"), parent_fd)
        finally:
            os.close(file_fd)
        assert _open_fds() == before + 2          # a and a/b, once each
    assert _open_fds() == before
    with paths.DirCache(fd) as dirs:
        assert dirs.folder(()) == fd


def test_dir_cache_holds_a_bounded_number_of_folders(root: tuple[Path, int]) -> None:
    top, fd = root
    before = _open_fds()
    with paths.DirCache(fd) as dirs:
        for i in range(3 * paths.DirCache.LIMIT):
            (top / f"d{i}").mkdir()
            (top / f"d{i}" / "f").write_bytes(b"x")
            dirs.lstat((f"d{i}".encode(), b"f"))
            assert _open_fds() <= before + paths.DirCache.LIMIT
    assert _open_fds() == before


@pytest.mark.parametrize("components", [(b"a", b"..", b"f"), (b"a", b"", b"f"),
                                        (b"a/b", b"f"), (b"a", b"b\0c")])
def test_dir_cache_refuses_what_a_fresh_walk_refuses(root: tuple[Path, int],
                                                     components: tuple[bytes, ...]) -> None:
    top, fd = root
    (top / "a" / "b").mkdir(parents=True)
    with pytest.raises(UnsafePath) as expected:
        paths.open_dir_under(fd, components)
    with paths.DirCache(fd) as dirs:
        dirs.folder((b"a",))   # a kept prefix does not skip the check of what follows
        for call in (dirs.lstat, dirs.open_file, dirs.folder):
            with pytest.raises(UnsafePath) as exc:
                call(components)
            assert (exc.value.path, exc.value.reason) == (expected.value.path,
                                                          expected.value.reason)


@pytest.mark.parametrize("level", [0, 1])
def test_dir_cache_refuses_a_kept_folder_replaced_by_a_link(root: tuple[Path, int],
                                                             tmp_path: Path, level: int) -> None:
    """A folder renamed away and replaced by a link to it after its descriptor was kept is
    refused as a link, exactly as a fresh walk refuses it; nothing is read through the kept
    descriptor."""
    top, fd = root
    (top / "a" / "b").mkdir(parents=True)
    (top / "a" / "b" / "f.fits").write_bytes(b"staged")
    components = (b"a", b"b", b"f.fits")
    with paths.DirCache(fd) as dirs:
        dirs.lstat(components)
        kept = dirs.folder(components[:-1])
        victim = top / "a" if level == 0 else top / "a" / "b"
        os.rename(victim, tmp_path / "moved")
        os.symlink(tmp_path / "moved", victim)
        assert not dirs.is_current(components[:-1], kept)
        for call in (dirs.lstat, dirs.open_file):
            with pytest.raises(UnsafePath) as exc:
                call(components)
            assert "symbolic link" in exc.value.reason
            assert exc.value.path == "/".join(c.decode() for c in components[:level + 1])
        with pytest.raises(UnsafePath):
            dirs.folder(components[:-1])


def test_dir_cache_follows_a_kept_folder_replaced_by_another(root: tuple[Path, int],
                                                              tmp_path: Path) -> None:
    """A folder renamed away and replaced by a new folder of the same name: the name now
    leads to the new folder, and the cache uses that one; a removed folder is gone."""
    top, fd = root
    (top / "a" / "b").mkdir(parents=True)
    (top / "a" / "b" / "f.fits").write_bytes(b"old")
    components = (b"a", b"b", b"f.fits")
    with paths.DirCache(fd) as dirs:
        old = dirs.lstat(components)
        os.rename(top / "a", tmp_path / "moved")
        (top / "a" / "b").mkdir(parents=True)
        (top / "a" / "b" / "f.fits").write_bytes(b"new content")
        new = dirs.lstat(components)
        assert new.st_ino != old.st_ino and new.st_size == len(b"new content")
        file_fd, _parent, _st = dirs.open_file(components)
        try:
            assert os.read(file_fd, 100) == b"new content"
        finally:
            os.close(file_fd)
        shutil.rmtree(top / "a")
        with pytest.raises(FileNotFoundError):
            dirs.lstat(components)


# --- names -----------------------------------------------------------------------------------

@pytest.mark.parametrize(("name", "reason"), [
    (b"", "empty"),
    (b"..", "is not a name"),
    (b"caf\xe9.fits", "not valid UTF-8 (byte 0xe9 at offset 3)"),
    (b"new\nline.fits", "U+000A"),
    (b"del\x7f.fits", "U+007F"),
    (b"tab\t.fits", "U+0009"),
    ("rtl\u202efits".encode(), "U+202E"),
    (b"L" * 241, "241 bytes long"),
    (paths.TEMP_PREFIX + b"x", "reserved for temporary files"),
])
def test_name_problem(name: bytes, reason: str) -> None:
    problem = paths.name_problem(name)
    assert problem is not None and reason in problem
    assert paths.name_problem(b"L" * 240) is None
    assert paths.name_problem("café.fits".encode()) is None


@pytest.mark.parametrize("node", ["dsa-node-1", "host.example.org", "n" * 63, "a_b"])
def test_temp_token_carries_the_node_and_fits_every_name(node: str) -> None:
    token = paths.temp_token(node, 123456789012)
    assert len(token) <= 64 and paths.parse_temp_name(paths.temp_name(b"m.fits", token)) == token
    assert paths.temp_node(token) == paths.node_tag(node)
    assert paths.node_tag(node) == node.replace(".", "_")[:32]
    assert paths.temp_node("123-abcdef12") is None  # older names carry no node
    assert paths.temp_node("a" * 64) is None
    assert paths.temp_node("vm-4242-1-boot") is None  # not the attempt's 8 hex digits
