"""A throw-away PostgreSQL server for tests: Debian's postgresql package, run as the
`postgres` user by this (root) process.

`initdb` runs once per test session into a template folder; each test gets a copy of it
(a plain copy: well under a second) started with `pg_ctl` on a unix socket of its own and
no TCP port, stopped and removed in teardown. Outside root, or without the binaries, the
tests that need it are skipped with the reason. tests/conftest.py offers the fixtures
(`pg_server`, `pg_template`) to every test module by name.

The folders live in a directory of their own under /tmp, not in pytest's tmp_path:
pytest makes those 0700 for root, where the postgres user could not reach its socket.
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.helpers import skip_with

DATABASE = "contimg"


def bin_dir() -> Path | None:
    """The newest installed server's binaries (/usr/lib/postgresql/N/bin)."""
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/pg_ctl"),
                   key=lambda p: int(Path(p).parts[-3]) if Path(p).parts[-3].isdigit() else 0)
    return Path(found[-1]).parent if found else None


def unavailable() -> str | None:
    """Why no server can be started here, or None."""
    if os.geteuid() != 0:
        return "starting a PostgreSQL server needs root (to run it as the postgres user)"
    if bin_dir() is None:
        return ("PostgreSQL's server binaries are missing (/usr/lib/postgresql/*/bin; "
                "apt-get install postgresql)")
    try:
        pwd.getpwnam("postgres")
    except KeyError:
        return "there is no postgres user (apt-get install postgresql creates it)"
    return None


def skip_unless_available() -> None:
    reason = unavailable()
    if reason is not None:
        skip_with(reason)


def _as_postgres(*argv: str | Path, check: bool = True, timeout: float = 60
                 ) -> subprocess.CompletedProcess[str]:
    cmd = ["runuser", "-u", "postgres", "--", *map(str, argv)]
    return subprocess.run(cmd, check=check, capture_output=True, text=True, timeout=timeout,
                          cwd="/")


def _own_dir(prefix: str) -> Path:
    path = Path(tempfile.mkdtemp(prefix=prefix))
    pw = pwd.getpwnam("postgres")
    os.chown(path, pw.pw_uid, pw.pw_gid)
    return path


class Server:
    """One running cluster on a unix socket; `uri` reaches its `contimg` database."""

    def __init__(self, template: Path) -> None:
        binaries = bin_dir()
        assert binaries is not None
        self.bin = binaries
        self.top = _own_dir("contimg-pg-")
        self.data = self.top / "data"
        self.socket_dir = self.top
        self.log = self.top / "server.log"
        # cp -a keeps the postgres user's ownership and the 0700 mode initdb gave the folder.
        subprocess.run(["cp", "-a", str(template), str(self.data)], check=True)
        self.uri = f"postgresql:///{DATABASE}?host={self.socket_dir}&user=postgres"
        self.listen = ""  # TCP addresses to listen on as well (see listen_on)
        self.port = 5432

    def pg_ctl(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return _as_postgres(self.bin / "pg_ctl", "-D", self.data, "-l", self.log, *args,
                            check=check)

    def start(self) -> None:
        # fsync=off: a crash of the server (pg_ctl stop -m immediate) loses nothing, since
        # the kernel still has every write; only a crash of this machine would. Commits stay
        # synchronous: an immediate stop must not lose what a client was told is committed.
        options = (f"-k {self.socket_dir} -c listen_addresses='{self.listen}' -p {self.port}"
                   " -c fsync=off")
        result = self.pg_ctl("-w", "-t", "60", "-o", options, "start", check=False)
        if result.returncode != 0:
            log = self.log.read_text() if self.log.exists() else ""
            raise RuntimeError(f"pg_ctl start failed: {result.stderr}\n{log}")

    def listen_on(self, address: str, port: int, clients: str) -> str:
        """Listen on TCP too (restarting), trusting the `clients` network; the URI there."""
        with open(self.data / "pg_hba.conf", "a") as hba:
            hba.write(f"host all all {clients} trust\n")
        self.stop()
        self.listen, self.port = address, port  # the unix socket's name follows the port
        self.uri = (f"postgresql:///{DATABASE}?host={self.socket_dir}&port={port}"
                    "&user=postgres")
        self.start()
        return f"postgresql://postgres@{address}:{port}/{DATABASE}"

    def stop(self, mode: str = "fast") -> None:
        self.pg_ctl("-w", "-m", mode, "stop", check=False)

    def restart(self, mode: str = "immediate") -> None:
        self.stop(mode)
        self.start()

    def running(self) -> bool:
        return self.pg_ctl("status", check=False).returncode == 0

    def psql(self, sql: str, database: str = DATABASE) -> str:
        result = _as_postgres(self.bin / "psql", "-h", self.socket_dir, "-d", database,
                              "-X", "-A", "-t", "-v", "ON_ERROR_STOP=1", "-c", sql)
        return result.stdout.strip()

    def remove(self) -> None:
        if self.running():
            self.stop("immediate")
        shutil.rmtree(self.top, ignore_errors=True)


def make_template() -> Path:
    """initdb into a fresh folder, with the `contimg` database created."""
    binaries = bin_dir()
    assert binaries is not None
    top = _own_dir("contimg-pg-template-")
    data = top / "data"
    _as_postgres(binaries / "initdb", "-D", data, "-U", "postgres", "--auth=trust",
                 "-E", "UTF8", "--locale=C", "--no-sync", timeout=120)
    server = Server.__new__(Server)
    server.bin, server.top, server.data, server.socket_dir = binaries, top, data, top
    server.log = top / "template.log"
    server.listen, server.port = "", 5432
    server.start()
    try:
        _as_postgres(binaries / "createdb", "-h", top, DATABASE)
    finally:
        server.stop()
    return data


@pytest.fixture(scope="session")
def pg_template() -> Iterator[Path]:
    skip_unless_available()
    data = make_template()
    try:
        yield data
    finally:
        shutil.rmtree(data.parent, ignore_errors=True)


@pytest.fixture
def pg_server(pg_template: Path) -> Iterator[Server]:
    """A running server of this test's own, stopped and removed after it."""
    server = Server(pg_template)
    try:
        server.start()
        yield server
    finally:
        server.remove()
