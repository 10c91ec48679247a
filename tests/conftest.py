"""Fixtures shared by several test modules, and the test tiers.

Tiers are markers (declared in pyproject.toml): `root` (mounts, other users, sysctls),
`postgres` (a real PostgreSQL server), `systemd` (journald, systemd-analyze, systemd as
PID 1 in a container), `slow` (more than about 5 s). `./.ci/dev test -m "not slow"` is
the quick round; `./.ci/dev test` and CI run everything. A `root` test is skipped, with
its reason, where the tests do not run as root.

What a test needs of the machine (root, a tool, user namespaces, a tmpfs, a PostgreSQL
server) it asks for by a fixture below, which skips the test, printing why, where the
machine lacks it; a test module does not test the machine itself."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.helpers import (
    REPO,
    MakeSandbox,
    MountExt4,
    MountTmpfs,
    Sandbox,
    find_tool,
    is_root,
    mount_ext4,
    mount_tmpfs,
    need_root,
    need_tool,
    skip_with,
    umount,
)

# The PostgreSQL fixtures, for every module by name (tests/pg.py starts the servers).
from tests.pg import pg_server, pg_template  # noqa: F401

# Fixtures that start PostgreSQL (tests/pg.py), and modules that drive systemd's own tools.
POSTGRES_FIXTURES = {"pg_server", "pg_template"}
SYSTEMD_MODULES = {"test_systemd_boot", "test_systemd_unit", "test_journald", "test_package"}
SYSTEMD_FIXTURES = {"systemd_nspawn", "systemd_analyze", "journald"}
# Fixtures below that only exist for root: a test that uses one is in the root tier.
ROOT_FIXTURES = {"as_root", "tmpfs_products", "journald", "loop_ext4", "systemd_nspawn"}


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """The postgres, systemd and root tiers follow from what a test uses, so that a new
    test that starts PostgreSQL, drives systemd or mounts a filesystem is in its tier
    without being told."""
    for item in items:
        fixtures = set(getattr(item, "fixturenames", ()))
        if POSTGRES_FIXTURES & fixtures:
            item.add_marker(pytest.mark.postgres)
        if ROOT_FIXTURES & fixtures and item.get_closest_marker("root") is None:
            item.add_marker(pytest.mark.root(
                f"for the fixture {', '.join(sorted(ROOT_FIXTURES & fixtures))}"))
        if SYSTEMD_FIXTURES & fixtures or item.module is not None and \
                item.module.__name__.rsplit(".", 1)[-1] in SYSTEMD_MODULES:
            item.add_marker(pytest.mark.systemd)


def pytest_runtest_setup(item: pytest.Item) -> None:
    marker = item.get_closest_marker("root")
    if marker is not None and not is_root():
        why = marker.args[0] if marker.args else "it changes the machine"
        skip_with(f"needs root: {why}")


# --- sandboxes --------------------------------------------------------------------------------

@pytest.fixture
def sandbox(tmp_path: Path) -> Sandbox:
    """A staging area, a products area and a registry in the test's folder; the status
    server off, a 0.5 s settle time."""
    return Sandbox(tmp_path, detect={"settle_seconds": 0.5, "rescan_seconds": 300},
                   metrics={"enabled": False})


@pytest.fixture
def make_sandbox(tmp_path: Path) -> MakeSandbox:
    """`make_sandbox(folder="", products_root=None, **tables)`: a Sandbox in the test's
    folder (or in `folder` under it, for a test with several), with the Sandbox's own
    defaults and the given config tables over them."""
    def make(folder: str = "", products_root: Path | None = None,
             **overrides: Any) -> Sandbox:
        return Sandbox(tmp_path / folder if folder else tmp_path, products_root, **overrides)
    return make


@pytest.fixture(params=["same_fs", "across"])
def sandbox_fs(request: pytest.FixtureRequest, tmp_path: Path,
               tmpfs: MountTmpfs) -> Sandbox:
    """A sandbox whose products area is on the staging area's filesystem, or on a tmpfs of
    its own (the test then runs once each way)."""
    if request.param == "same_fs":
        return Sandbox(tmp_path)
    return Sandbox(tmp_path, products_root=tmpfs(tmp_path / "products", "256m"))


# --- filesystems ------------------------------------------------------------------------------

@pytest.fixture
def tmpfs() -> Iterator[MountTmpfs]:
    """`tmpfs(path, size)` mounts a tmpfs there (`size` is mount's size= option, further
    options may follow it) and returns the path; unmounted after the test. Skips the test,
    when called, where the tests do not run as root (so a test parametrized over
    filesystems still runs its other cases)."""
    mounted: list[Path] = []

    def mount(path: Path, size: str) -> Path:
        need_root("mounting a tmpfs")
        mount_tmpfs(path, size)
        mounted.append(path)
        return path
    yield mount
    for path in reversed(mounted):
        umount(path)


@pytest.fixture
def tmpfs_products(tmp_path: Path, tmpfs: MountTmpfs) -> Path:
    """A products area on its own filesystem, so a publish is a copy through a temp file."""
    need_root("mounting a tmpfs for the products area")
    return tmpfs(tmp_path / "products", "1g")


@pytest.fixture
def loop_ext4() -> Iterator[MountExt4]:
    """`loop_ext4(path, image, size_mb=64, options="")`: a small ext4 on a loop device at
    `path` (root, chattr, mkfs.ext4, losetup); unmounted after the test. Unlike a tmpfs it
    has the immutable and append-only flags, and ext4's own reaction to errors."""
    need_root("a loop mount and chattr")
    for tool in ("chattr", "mkfs.ext4", "losetup"):
        need_tool(tool, "e2fsprogs" if tool != "losetup" else "mount")
    mounted: list[Path] = []

    def mount(path: Path, image: Path, size_mb: int = 64, options: str = "") -> Path:
        mount_ext4(path, image, size_mb, options)
        mounted.append(path)
        return path
    yield mount
    for path in reversed(mounted):
        umount(path)


@pytest.fixture
def dev_shm(tmp_path: Path) -> Path:
    """/dev/shm, where it is another filesystem than the test's folder: a publish there
    copies instead of renaming, without a mount of the test's own."""
    shm = Path("/dev/shm")
    if not shm.is_dir() or os.stat(shm).st_dev == os.stat(tmp_path).st_dev:
        skip_with("needs /dev/shm on another filesystem than the test's folder")
    return shm


# --- privileges and kernel features -----------------------------------------------------------

@pytest.fixture(scope="session")
def as_root() -> None:
    """The tests run as root (to mount, to run as other users, to change sysctls)."""
    need_root("it mounts filesystems, runs processes as other users or changes sysctls")


@pytest.fixture(scope="session")
def user_namespaces(unshare: str) -> str:
    """`unshare`, where it can make a user namespace here (some containers forbid it)."""
    probe = subprocess.run([unshare, "--user", "--map-root-user", "true"],
                           capture_output=True, text=True, timeout=60)
    if probe.returncode != 0:
        skip_with(f"user namespaces are not available here: {probe.stderr.strip()}")
    return unshare


@pytest.fixture(scope="session")
def writable_sysctls() -> None:
    """Sysctls that root may change here (a container may mount /proc/sys read-only):
    rewriting fs.inotify.max_queued_events with its own value tells."""
    path = "/proc/sys/fs/inotify/max_queued_events"
    try:
        with open(path) as f:
            value = f.read()
        with open(path, "w") as f:
            f.write(value)
    except OSError as e:
        skip_with(f"{path} is not writable here: {e}")


# --- tools: each fixture is the tool's path ---------------------------------------------------

def _tool(command: str, package: str, name: str | None = None) -> Any:
    """A session fixture: the path of `command`, or a skip naming its Debian package."""
    def fixture() -> str:
        return need_tool(command, package)
    fixture.__doc__ = f"The path of `{command}` (Debian package {package})."
    return pytest.fixture(scope="session", name=name or command.replace("-", "_"))(fixture)


setpriv = _tool("setpriv", "util-linux")
unshare = _tool("unshare", "util-linux")
prlimit = _tool("prlimit", "util-linux")
promtool = _tool("promtool", "prometheus")
prometheus = _tool("prometheus", "prometheus")
chromium = _tool("chromium", "chromium")
systemd_analyze = _tool("systemd-analyze", "systemd")
sqlite3_shell = _tool("sqlite3", "sqlite3", name="sqlite3_shell")


@pytest.fixture(scope="session")
def systemd_nspawn() -> str:
    """systemd-nspawn, for root (booting a container needs it)."""
    need_root("booting systemd in a container")
    return need_tool("systemd-nspawn", "systemd-container")


@pytest.fixture(scope="session")
def journald() -> Path:
    """systemd-journald's binary, with journalctl, for root: a private journald needs a
    mount namespace and a tmpfs /run."""
    need_root("a private journald (mount namespace, tmpfs /run)")
    binary = Path("/lib/systemd/systemd-journald")
    if not binary.exists() or find_tool("journalctl") is None:
        skip_with("systemd-journald/journalctl are not installed (Debian package systemd)")
    return binary


@pytest.fixture(scope="session")
def console_script() -> str:
    """The installed `contimg-publisher` command beside the test's interpreter."""
    script = os.path.join(os.path.dirname(sys.executable), "contimg-publisher")
    if not os.path.exists(script):
        skip_with(f"console script not installed at {script}")
    return script


@pytest.fixture(scope="session")
def system_python3() -> str:
    """/usr/bin/python3 (Debian's python3), which any user can run."""
    path = "/usr/bin/python3"
    if not Path(path).exists():
        skip_with(f"{path} (Debian's python3) is missing")
    return path


@pytest.fixture(scope="session")
def system_python_of_this_version() -> str:
    """The system's interpreter of the test's Python version (/usr/bin/python3.N): other
    users can reach it, where the test's own may live in root's home."""
    path = f"/usr/bin/python{sys.version_info.major}.{sys.version_info.minor}"
    if not os.access(path, os.X_OK):
        skip_with(f"{path} is not installed: a process of another user runs it")
    return path


@pytest.fixture(scope="session")
def container_python3() -> str:
    """/usr/bin/python3, of the test environment's version: a container runs the daemon
    with it and the test environment's compiled dependencies."""
    path = "/usr/bin/python3"
    if not Path(path).exists():
        skip_with(f"{path} (Debian's python3) is missing; the container runs it")
    version = subprocess.run([path, "-c", "import sys; print(sys.version_info[:2])"],
                             capture_output=True, text=True).stdout.strip()
    if version != str(sys.version_info[:2]):
        skip_with(f"Debian's python3 is {version}, the test environment's is "
                  f"{sys.version_info[:2]}: its compiled dependencies would not load")
    return path


@pytest.fixture(scope="session")
def debian_12() -> None:
    """A Debian 12 machine (dpkg, /usr/bin/python3.11): a package and a container are
    made from this machine's Debian."""
    if find_tool("dpkg") is None or not Path("/usr/bin/python3.11").exists():
        skip_with("not a Debian 12 machine (dpkg and /usr/bin/python3.11): the package and "
                  "the container are made from this machine's Debian")


@pytest.fixture(scope="session")
def git_checkout() -> Path:
    """The checkout, where git can list its tracked files (what a package is built from)."""
    if find_tool("git") is None or not (REPO / ".git").exists():
        skip_with(".ci/dev package builds from the checkout's tracked files (git)")
    return REPO
