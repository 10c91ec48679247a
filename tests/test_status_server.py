"""The status port against hostile local users, and the daemon out of descriptors.

A real daemon serves the port; real sockets attack it (from the `nobody` user where the
test can switch to it). What must hold: publishing goes on, /healthz answers a fresh
connection, the daemon does not spin, and the server's share of descriptors and threads
stays bounded.
"""

from __future__ import annotations

import os
import resource
import select
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from contimg_publisher import statusserver
from tests.helpers import (
    REPO,
    MakeSandbox,
    Sandbox,
    free_port,
    log_events,
    start_daemon,
    stop,
    wait_for,
    write_fits,
)

SLOWLORIS = REPO / "tests" / "support" / "slowloris.py"
SYSTEM_PYTHON = "/usr/bin/python3"



def healthz(port: int, timeout: float = 5.0) -> bool:
    """A fresh connection's GET /healthz answered 200 within `timeout`."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=timeout) as r:
            return r.status == 200 and r.read() == b"ok\n"
    except (urllib.error.URLError, OSError):
        return False


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process (all its threads), from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def threads(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("Threads:"):
            return int(line.split()[1])
    raise AssertionError("no Threads: line")


def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def settled_fds(pid: int, timeout: float = 10.0) -> int:
    """The daemon's open descriptors once the count holds still for a second: right after
    start a /healthz connection or a registry handle may still be open for a moment, and
    a limit set to that count would leave a descriptor free later."""
    deadline = time.monotonic() + timeout
    seen = [open_fds(pid)]
    while time.monotonic() < deadline:
        time.sleep(0.25)
        seen.append(open_fds(pid))
        if len(seen) >= 5 and len(set(seen[-5:])) == 1:
            break
    return min(seen)


def started(sandbox: Sandbox, port: int, prefix: tuple[str, ...] = ()
            ) -> subprocess.Popen[str]:
    proc = start_daemon(sandbox, prefix=prefix)
    try:
        wait_for(lambda: healthz(port, 2), 30, what="the status port")
        wait_for(lambda: any(e.get("event") == "started" for e in log_events(sandbox)), 30,
                 what="the daemon's start")
    except BaseException:
        stop(proc)
        raise
    return proc


def published(sandbox: Sandbox, names: list[str]) -> bool:
    rows = {r["data_id"]: r for r in sandbox.registry_rows()}
    return all(rows.get(n, {}).get("status") == "published" for n in names)


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Sandbox, int, int]]:
    """One daemon for the deadline and cap tests: (sandbox, port, pid)."""
    root = tmp_path_factory.mktemp("status")
    port = free_port()
    sandbox = Sandbox(root, metrics={"listen": f"127.0.0.1:{port}"})
    proc = started(sandbox, port)
    try:
        yield sandbox, port, proc.pid
    finally:
        stop(proc)


@pytest.mark.slow
def test_a_partial_request_line_is_cut_off_at_the_request_deadline(
        daemon: tuple[Sandbox, int, int]) -> None:
    """Half a request line, then one byte a second: each byte would restart a per-read
    timeout; the deadline for the whole head does not restart."""
    _sandbox, port, _pid = daemon
    slack = 5.0
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        s.sendall(b"GET /metr")
        opened = time.monotonic()
        closed_at = None
        while time.monotonic() - opened < statusserver.REQUEST_SECONDS + slack:
            ready, _, _ = select.select([s], [], [], 1.0)
            if ready:
                try:
                    data = s.recv(4096)
                except OSError:
                    data = b""
                if not data:
                    closed_at = time.monotonic() - opened
                    break
            try:
                s.send(b"i")
            except OSError:
                closed_at = time.monotonic() - opened
                break
        assert closed_at is not None, (
            f"a request head trickled for {statusserver.REQUEST_SECONDS + slack} s, and the "
            "server still held the connection")
        assert closed_at >= statusserver.REQUEST_SECONDS - 1, closed_at


@pytest.mark.slow
def test_an_idle_kept_alive_connection_is_closed_after_the_idle_deadline(
        daemon: tuple[Sandbox, int, int]) -> None:
    _sandbox, port, _pid = daemon
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        s.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        answer = s.recv(4096)
        assert answer.startswith(b"HTTP/1.1 200") and answer.endswith(b"ok\n"), answer
        # Kept alive: a second request on the same connection is answered too.
        s.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        assert s.recv(4096).startswith(b"HTTP/1.1 200")
        s.settimeout(statusserver.IDLE_SECONDS + 5)
        t0 = time.monotonic()
        assert s.recv(4096) == b"", "an idle kept-alive connection was not closed"
        assert time.monotonic() - t0 >= statusserver.IDLE_SECONDS - 1


def test_connections_beyond_the_cap_cost_no_descriptor_or_thread(
        daemon: tuple[Sandbox, int, int]) -> None:
    """Three times the cap of idle connections: the server keeps at most the cap open, no
    thread each, and a fresh /healthz still gets its answer."""
    _sandbox, port, pid = daemon
    cap = statusserver.MAX_CONNECTIONS
    base_fds, base_threads = open_fds(pid), threads(pid)
    socks: list[socket.socket] = []
    try:
        for _ in range(3 * cap):
            s = socket.socket()
            s.settimeout(5)
            s.connect(("127.0.0.1", port))
            s.sendall(b"GET /he")
            socks.append(s)

        def server_side_open() -> int:
            ready, _, _ = select.select(socks, [], [], 0.5)
            for s in ready:
                try:
                    if s.recv(4096, socket.MSG_PEEK) == b"":
                        socks.remove(s)
                        s.close()
                except OSError:
                    socks.remove(s)
                    s.close()
            return len(socks)
        wait_for(lambda: server_side_open() <= cap, 10,
                 what=f"the server to keep at most {cap} of {3 * cap} connections")
        assert open_fds(pid) <= base_fds + cap + 8, (open_fds(pid), base_fds)
        assert threads(pid) <= base_threads + 2, (threads(pid), base_threads)
        assert healthz(port, 5), "/healthz did not answer while the cap was full"
    finally:
        for s in socks:
            s.close()


@pytest.mark.slow
@pytest.mark.root("the attack runs as the user nobody (setpriv), apart from the daemon's "
                  "user, as on a real host")
def test_a_thousand_idle_connections_from_another_user_stop_nothing(
        make_sandbox: MakeSandbox, setpriv: str, system_python3: str) -> None:
    port = free_port()
    sandbox = make_sandbox(metrics={"listen": f"127.0.0.1:{port}"})
    # systemd's default for a unit without LimitNOFILE: soft 1024, a high hard limit.
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    hard = 524288 if hard == resource.RLIM_INFINITY else min(hard, 524288)
    proc = started(sandbox, port, prefix=("prlimit", f"--nofile=1024:{hard}", "--"))
    attacker = subprocess.Popen(
        ["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups", SYSTEM_PYTHON,
         str(SLOWLORIS), str(port), "1100"], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
        text=True, cwd="/")
    try:
        assert attacker.stdout is not None and attacker.stdin is not None
        ready, _, _ = select.select([attacker.stdout], [], [], 270)
        assert ready, "the attacker did not set up its connections within 270 s"
        line = attacker.stdout.readline().split()
        assert line and line[0] == "ready", line
        opened = int(line[1])
        # The daemon does not spin while the connections are held.
        cpu0, t0 = cpu_seconds(proc.pid), time.monotonic()
        time.sleep(5)
        share = (cpu_seconds(proc.pid) - cpu0) / (time.monotonic() - t0)
        assert share < 0.5, f"the daemon used {share:.0%} of a core while attacked " \
                            f"({opened} connections)"
        assert healthz(port, 5), "/healthz did not answer a fresh connection while attacked"
        names = [f"nightly_2025010{i}" for i in range(1, 4)]
        staged = {n: write_fits(sandbox.mosaics / f"{n}.fits", pixels=16, seed=i)
                  for i, n in enumerate(names)}
        wait_for(lambda: published(sandbox, names), 60,
                 what="3 mosaics published while the status port is attacked")
        for n, data in staged.items():
            assert (sandbox.products / "mosaics" / f"{n}.fits").read_bytes() == data
        assert healthz(port, 5), "/healthz did not answer a fresh connection while attacked"
        assert attacker.poll() is None, "the attacker gave up: nothing was held"
        assert proc.poll() is None, "the daemon exited"
        limit = [e for e in log_events(sandbox) if e.get("event") == "descriptor_limit"]
        assert limit and limit[0]["soft_before"] == 1024 and limit[0]["soft"] == hard, limit
    finally:
        if attacker.poll() is None:
            attacker.stdin.close()  # type: ignore[union-attr]
            try:
                attacker.wait(timeout=10)
            except subprocess.TimeoutExpired:
                attacker.kill()
                attacker.wait(timeout=10)
        stop(proc)


@pytest.mark.slow
def test_out_of_descriptors_is_said_once_waited_out_and_publishing_resumes(
        make_sandbox: MakeSandbox, prlimit: str) -> None:
    """The daemon's limit lowered from outside to what it has open: its turns fail with
    EMFILE. Said once, no spinning; when the limit comes back, the mosaic is published."""
    port = free_port()
    sandbox = make_sandbox(metrics={"listen": f"127.0.0.1:{port}"})
    proc = started(sandbox, port)
    try:
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        tight = settled_fds(proc.pid)
        subprocess.run(["prlimit", f"--pid={proc.pid}", f"--nofile={tight}:{hard}"],
                       check=True)
        data = write_fits(sandbox.mosaics / "starved.fits", pixels=16, seed=7)
        wait_for(lambda: any(e.get("event") == "descriptors_exhausted"
                             for e in log_events(sandbox)), 30,
                 what="descriptors_exhausted in the log")
        cpu0, t0 = cpu_seconds(proc.pid), time.monotonic()
        time.sleep(5)
        share = (cpu_seconds(proc.pid) - cpu0) / (time.monotonic() - t0)
        assert share < 0.5, f"the daemon used {share:.0%} of a core without descriptors"
        said = [e for e in log_events(sandbox) if e.get("event") in
                ("descriptors_exhausted", "loop_error")]
        assert len(said) == 1 and said[0]["event"] == "descriptors_exhausted", said
        subprocess.run(["prlimit", f"--pid={proc.pid}", f"--nofile={soft}:{hard}"],
                       check=True)
        wait_for(lambda: published(sandbox, ["starved"]), 60,
                 what="the mosaic published once descriptors came back")
        assert (sandbox.products / "mosaics" / "starved.fits").read_bytes() == data
        assert any(e.get("event") == "descriptors_available" for e in log_events(sandbox))
        assert proc.poll() is None
    finally:
        stop(proc)
