"""The registry file shared by a running daemon and other processes.

SQLite's own locks are what tell another process's connection that the database is in
use; if the daemon lost them (a descriptor of the file closed outside SQLite drops every
POSIX lock of the process), the next reader would take the database for unused, checkpoint
it and delete the `-wal` under the daemon, whose later commits would then go nowhere. Here
the operator's commands and the `sqlite3` shell read and write while a real daemon
publishes and scrapes itself, and every commit of each process must be seen by the others.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from contimg_publisher import detect
from contimg_publisher.registry import Registry
from tests.helpers import MakeSandbox, log_events, start_daemon, stop, wait_for, write_fits
from tests.test_observability import free_port

SQLITE3 = shutil.which("sqlite3")


def sql(db: Path, statement: str) -> str:
    """One statement through the sqlite3 shell: a separate process with its own connection,
    opened read-write, closed when the statement is done."""
    assert SQLITE3 is not None
    out = subprocess.run([SQLITE3, "-batch", "-cmd", ".timeout 20000", str(db), statement],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, f"sqlite3 {statement!r}: {out.stderr}"
    return out.stdout.strip()


def registry_descriptors(pid: int, db: Path) -> list[str]:
    """Where the daemon's descriptors of the registry, its -wal and its -shm point."""
    out = []
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except FileNotFoundError:
            continue
        if target.startswith(str(db)):
            out.append(target)
    return out


def posix_locks(pid: int, ino: int) -> list[str]:
    """The POSIX locks `pid` holds on the file with inode `ino` (/proc/locks), without the
    line's ordinal (it shifts as other processes' locks come and go)."""
    with open("/proc/locks") as fh:
        return [line.split(":", 1)[1].strip() for line in fh if "POSIX" in line
                and f" {pid} " in line and line.split()[5].endswith(f":{ino}")]


@pytest.mark.slow
@pytest.mark.usefixtures("sqlite3_shell")  # sql() runs it
def test_other_processes_never_take_the_daemons_wal(make_sandbox: MakeSandbox) -> None:
    port = free_port()
    sandbox = make_sandbox(metrics={"listen": f"127.0.0.1:{port}"})
    db = sandbox.registry
    rounds = 6
    # Registered and held before the daemon starts; each is released by another process
    # (the CLI or the shell) in its round, so the daemon publishing it is the daemon seeing
    # that process's commit.
    for i in range(rounds):
        write_fits(sandbox.mosaics / f"gate_{i}.fits", seed=100 + i)
    with Registry(db) as reg:
        detector = detect.Detector(sandbox.config(), reg)
        detector.scan()
        detector.settle(deadline=time.time() + 30)
        for i in range(rounds):
            assert reg.set_hold(f"gate_{i}", True)
        assert reg.counts()["staging"] == rounds
    for i in range(rounds):
        write_fits(sandbox.mosaics / f"early_{i}.fits", seed=200 + i)
    proc = start_daemon(sandbox)
    try:
        def status_of(data_id: str) -> str:
            return sql(db, f"SELECT status FROM data_registry WHERE data_id = '{data_id}'")

        for i in range(rounds):
            wait_for(lambda i=i: status_of(f"early_{i}") == "published",
                     what=f"early_{i} published")
        # From here on the daemon has its main and its publish connection open.
        wal = Path(f"{db}-wal")
        assert wal.exists(), "the daemon's -wal is gone while it has the registry open"
        wal_ino = wal.stat().st_ino
        db_ino = db.stat().st_ino

        def check_locks_and_wal(when: str) -> None:
            assert wal.exists() and wal.stat().st_ino == wal_ino, \
                f"{when}: the daemon's -wal was deleted or replaced"
            assert not [t for t in registry_descriptors(proc.pid, db) if "(deleted)" in t], \
                f"{when}: the daemon writes into deleted registry files"
            assert posix_locks(proc.pid, db_ino), \
                f"{when}: the daemon holds no POSIX lock on {db}"

        check_locks_and_wal("after the first publishes")
        for i in range(rounds):
            # Readers: the operator's commands, a scrape (a connection inside the daemon's
            # own process), the shell.
            status = json.loads(sandbox.cli("status", "--json").stdout)
            assert status["counts"]["published"] == rounds + 2 * i
            listed = {r["data_id"]: r["status"] for r in sandbox.registry_rows()}
            assert listed[f"gate_{i}"] == "staging"
            urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read()
            assert int(sql(db, "SELECT COUNT(*) FROM data_registry")) == 2 * rounds + i
            check_locks_and_wal(f"round {i}, after the readers")
            # Writers: the shell, then the operator's commands.
            sql(db, f"INSERT INTO data_tags (data_id, tag) VALUES ('early_0', 'tag_{i}')")
            sandbox.cli("hold", "early_0", check=True)
            sandbox.cli("release", "early_0", check=True)
            sandbox.cli("retry", "--all-failed")
            check_locks_and_wal(f"round {i}, after the writers")
            # The release, by another process; the daemon acts on it.
            if i % 2:
                sql(db, f"UPDATE data_registry SET auto_publish_enabled = 1"
                        f" WHERE data_id = 'gate_{i}'")
            else:
                sandbox.cli("release", f"gate_{i}", check=True)
            # A new file: the daemon's registration and publish commits follow the others'.
            write_fits(sandbox.mosaics / f"round_{i}.fits", seed=300 + i)
            for name in (f"gate_{i}", f"round_{i}"):
                wait_for(lambda name=name: status_of(name) == "published",
                         what=f"{name} published, as the shell sees it")
            assert sql(db, f"SELECT tag FROM data_tags WHERE tag = 'tag_{i}'") == f"tag_{i}"
            check_locks_and_wal(f"round {i}, after its publishes")
    finally:
        assert stop(proc) == 0
    # After the daemon closed its connections, everything every process committed is there.
    with Registry(db, migrate=False) as reg:
        rows = {p.data_id: p for p in reg.products()}
        tags = [t for (t,) in reg.conn.execute(
            "SELECT tag FROM data_tags WHERE data_id = 'early_0' ORDER BY tag")]
    expected = {f"{kind}_{i}" for kind in ("gate", "early", "round") for i in range(rounds)}
    assert set(rows) == expected
    assert all(p.status == "published" for p in rows.values()), \
        {k: p.status for k, p in rows.items() if p.status != "published"}
    assert all(p.auto_publish_enabled for p in rows.values())
    assert tags == [f"tag_{i}" for i in range(rounds)]
    archived = sorted(p.name for p in (sandbox.products / "mosaics").iterdir())
    assert archived == sorted(f"{name}.fits" for name in expected)
    assert sorted(p.published_path for p in rows.values()) == \
        sorted(str(sandbox.products / "mosaics" / n) for n in archived)
    published = [e["data_id"] for e in log_events(sandbox) if e.get("event") == "published"]
    assert sorted(published) == sorted(expected), \
        "the daemon published something twice, or missed something"


@pytest.mark.usefixtures("sqlite3_shell")  # sql() runs it
def test_opening_a_second_connection_keeps_the_first_ones_locks(tmp_path: Path) -> None:
    """What the daemon does when its publish thread, or a scrape, opens the registry."""
    db = tmp_path / "registry.sqlite3"
    first = Registry(db)
    try:
        with first.write() as cur:
            cur.execute("INSERT INTO data_tags (data_id, tag) VALUES ('a', 'by the first')")
        held = posix_locks(os.getpid(), db.stat().st_ino)
        for _ in range(3):
            Registry(db, migrate=False).close()
        assert posix_locks(os.getpid(), db.stat().st_ino) == held != []
        assert sql(db, "SELECT tag FROM data_tags") == "by the first"
        assert Path(f"{db}-wal").exists(), "another process's read deleted the -wal"
        with first.write() as cur:
            cur.execute("INSERT INTO data_tags (data_id, tag) VALUES ('b', 'after the read')")
        assert sql(db, "SELECT COUNT(*) FROM data_tags") == "2"
    finally:
        first.close()



_OPEN_EACH = """
import sys, time
from contimg_publisher.registry import Registry
folder, count, start = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
while time.time() < start:
    pass
for i in range(count):
    try:
        Registry(f"{folder}/registry-{i}.sqlite3").close()
        print("opened")
    except Exception as exc:
        print(f"{type(exc).__name__}: {exc}")
"""


@pytest.mark.slow
def test_processes_creating_one_new_registry_at_once_all_open_it(tmp_path: Path) -> None:
    """A new file is in rollback mode until the first switch to WAL; two processes
    switching at once deadlock on the exclusive lock and SQLite answers one of them BUSY
    at once, without its busy handler. A daemon and an `events --follow` started beside it
    meet exactly this. Four processes open the same 100 new files in the same order."""
    count = 100
    start = time.time() + 2.0
    procs = [subprocess.Popen([sys.executable, "-c", _OPEN_EACH, str(tmp_path), str(count),
                               str(start)], stdout=subprocess.PIPE, text=True)
             for _ in range(4)]
    outcomes = [line for p in procs for line in p.communicate(timeout=300)[0].splitlines()]
    assert len(outcomes) == 4 * count
    assert outcomes == ["opened"] * len(outcomes), sorted(set(outcomes) - {"opened"})
    for i in range(count):
        with Registry(tmp_path / f"registry-{i}.sqlite3") as registry:
            assert registry.version() == Registry.schema_version
