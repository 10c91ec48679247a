"""Sinks that cannot hold the daemon: real commands that leave children behind, write
gigabytes or outlive their timeout; a real webhook on 127.0.0.1 that answers a byte a second;
the real daemon process. What is asserted is what the commands and the server saw, what the
registry holds and what the daemon's own /proc says of its memory."""

from __future__ import annotations

import contextlib
import json
import os
import select
import shutil
import signal
import socket
import textwrap
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from contimg_publisher import config as config_mod
from contimg_publisher.config import ConfigError
from tests.helpers import PYTHON, log_events, start_daemon, stop, wait_for
from tests.test_events import BASE, all_events, publish, sandbox_with
from tests.test_service import NotifySocket

SLEEP = shutil.which("sleep") or "/bin/sleep"


class DripServer:
    """A webhook on 127.0.0.1 that reads the request, then answers one byte a second. Each
    connection's record says how many bytes of ANSWER it sent before the client closed it
    (`cut`), so a client that waits for the whole answer is told apart from one that ends
    the attempt at its deadline."""

    ANSWER = (b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nX-Padding: " + b"." * 60 +
              b"\r\n\r\nok")

    def __init__(self, interval: float = 1.0) -> None:
        self.interval = interval
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.sock.settimeout(0.2)
        self.port = self.sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}/hooks/slow"
        self.connections: list[dict[str, Any]] = []
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._accept = threading.Thread(target=self._run, daemon=True)
        self._accept.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _addr = self.sock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            record: dict[str, Any] = {"opened": time.monotonic(), "sent": 0, "cut": False,
                                      "ended": None, "key": None}
            self.connections.append(record)
            thread = threading.Thread(target=self._serve, args=(conn, record), daemon=True)
            self._threads.append(thread)
            thread.start()

    def _serve(self, conn: socket.socket, record: dict[str, Any]) -> None:
        with conn:
            conn.settimeout(5)
            data = b""
            with contextlib.suppress(OSError):
                while b"\r\n\r\n" not in data and len(data) < 65536:
                    chunk = conn.recv(4096)
                    if not chunk:
                        break
                    data += chunk
                head, _, rest = data.partition(b"\r\n\r\n")
                headers = dict(line.split(b": ", 1) for line in head.split(b"\r\n")[1:]
                               if b": " in line)
                length = int(headers.get(b"Content-Length", b"0"))
                while len(rest) < length:
                    chunk = conn.recv(4096)
                    if not chunk:
                        break
                    rest += chunk
                record["key"] = headers.get(b"Idempotency-Key", b"").decode()
            for byte in self.ANSWER:
                if self._stop.is_set():
                    break
                try:
                    conn.sendall(bytes([byte]))
                except OSError:
                    record["cut"] = True
                    break
                record["sent"] += 1
                readable, _, _ = select.select([conn], [], [], self.interval)
                if readable:  # the client never sends more: this is its close
                    with contextlib.suppress(OSError):
                        if conn.recv(1):
                            continue
                    record["cut"] = True
                    break
            record["ended"] = time.monotonic()

    def close(self) -> None:
        self._stop.set()
        self.sock.close()
        self._accept.join(timeout=5)
        for thread in self._threads:
            thread.join(timeout=5)


@pytest.fixture
def drip() -> Iterator[DripServer]:
    server = DripServer()
    yield server
    server.close()


def runs(path: Path) -> list[str]:
    return path.read_text().split() if path.exists() else []


def kill_pids(path: Path) -> None:
    """The children a sink command left running, ended by the test that made them."""
    for pid in runs(path):
        with contextlib.suppress(ProcessLookupError):
            os.kill(int(pid), signal.SIGKILL)


def gone(pid: int) -> bool:
    """Not running: no such process, or a zombie waiting for its reaper."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return True
    return stat.rsplit(")", 1)[1].split()[0] == "Z"


def memory_kib(pid: int) -> dict[str, int]:
    """VmHWM (peak resident) and VmRSS of a process, in KiB, from /proc."""
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmHWM", "VmRSS"):
            out[key] = int(value.split()[0])
    return out


def undelivered(box: Any) -> list[dict[str, Any]]:
    return json.loads(box.cli("events", "--json", check=True).stdout)


# --- a command that leaves a child behind ---------------------------------------------------

LEAVES_A_CHILD = textwrap.dedent("""\
    import json, os, subprocess, sys
    out, pids, own_session = sys.argv[1], sys.argv[2], sys.argv[3] == "setsid"
    event = json.load(sys.stdin)
    with open(out, "a") as fh:
        fh.write(event["event_id"] + "\\n")
    # The child inherits stdout and stderr and holds them for a minute.
    child = subprocess.Popen([sys.argv[4], "60"], start_new_session=own_session)
    with open(pids, "a") as fh:
        fh.write(f"{child.pid}\\n")
    print("handed to the queue", file=sys.stderr)
    sys.exit(0)
    """)


@pytest.mark.slow
@pytest.mark.parametrize("session", ["same", "setsid"])
def test_a_command_that_leaves_a_child_holding_its_pipes_is_judged_by_its_exit(
        tmp_path, session):
    """The command exits 0 at once but its child (in its process group, or in a session of
    its own) holds stdout and stderr for a minute: each event is delivered when the command
    exits, the command runs exactly once per event, and nothing waits for the child."""
    script = tmp_path / "sink.py"
    script.write_text(LEAVES_A_CHILD)
    got, pids = tmp_path / "got.txt", tmp_path / "pids.txt"
    box = sandbox_with(tmp_path, {"command": [PYTHON, str(script), str(got), str(pids),
                                             session, SLEEP],
                                  "command_timeout_seconds": 10})
    proc = start_daemon(box)
    names = ["child_1", "child_2", "child_3"]
    try:
        publish(box, names)
        # Three events, each well inside one command timeout: no attempt timed out.
        wait_for(lambda: len(runs(got)) >= 3 and not undelivered(box), timeout=30,
                 what="every event delivered to the command")
        time.sleep(1.0)  # a repeated run would show here
    finally:
        code = stop(proc)
        kill_pids(pids)
    assert code == 0
    events = all_events(box)
    assert [e["data_id"] for e in events] == names
    assert runs(got) == [e["event_id"] for e in events]  # once each, in order
    assert {e["deliveries"]["command"]["state"] for e in events} == {"delivered"}
    logged = log_events(box)
    assert not [e for e in logged if e.get("event") == "event_delivery_failed"]
    delivered = [e for e in logged if e.get("event") == "event_delivered"]
    assert [(e["event_id"], e["attempts"]) for e in delivered] == [
        (e["event_id"], 1) for e in events]
    assert len(runs(pids)) == 3


# --- a command that writes without end ------------------------------------------------------

TALKATIVE = textwrap.dedent("""\
    cat > /dev/null
    if [ "$CONTIMG_DATA_ID" = big ]; then
        head -c 1610612736 /dev/zero || exit 3
        head -c 1610612736 /dev/zero >&2 || exit 4  # all of it read by the daemon
    fi
    echo "$CONTIMG_EVENT_ID" >> "$1"
    """)


@pytest.mark.slow
def test_a_command_writing_gigabytes_does_not_grow_the_daemon(tmp_path):
    """1.5 GiB on stdout and 1.5 GiB on stderr: the event is delivered and the daemon's
    peak and resident memory (its own /proc) grow by far less than what was written."""
    got = tmp_path / "got.txt"
    box = sandbox_with(tmp_path, {"command": ["/bin/sh", "-c", TALKATIVE, "sink", str(got)],
                                  "command_timeout_seconds": 600})
    proc = start_daemon(box)
    try:
        publish(box, ["small"])
        wait_for(lambda: len(runs(got)) == 1 and not undelivered(box), timeout=30,
                 what="the first event delivered")
        before = memory_kib(proc.pid)
        publish(box, ["big"], seed=3)
        wait_for(lambda: len(runs(got)) == 2 and not undelivered(box), timeout=600,
                 interval=0.5, what="the big one delivered")
        after = memory_kib(proc.pid)
        print("daemon memory (KiB) before", before, "after", after)
    finally:
        assert stop(proc) == 0
    grown = {k: (after[k] - before[k]) // 1024 for k in before}
    assert grown["VmHWM"] < 200 and grown["VmRSS"] < 200, (before, after)
    # Written in full (a pipe closed early would have ended `head` with exit 3 or 4).
    assert runs(got) == [e["event_id"] for e in all_events(box)]
    assert not [e for e in log_events(box) if e.get("event") == "event_delivery_failed"]


# --- a command past its timeout -------------------------------------------------------------

@pytest.mark.slow
def test_a_command_past_its_timeout_is_killed_with_its_process_group(tmp_path):
    """The command and the child it started (in its group) are both killed at the timeout;
    the failure names the timeout."""
    pids = tmp_path / "pids.txt"
    script = f'cat > /dev/null; {SLEEP} 120 & echo $! >> "$1"; {SLEEP} 120'
    box = sandbox_with(tmp_path, {"command": ["/bin/sh", "-c", script, "sink", str(pids)],
                                  "command_timeout_seconds": 1,
                                  "retry_initial_seconds": 60, "retry_max_seconds": 60})
    proc = start_daemon(box)
    try:
        publish(box, ["late"])
        failed = wait_for(lambda: [e for e in log_events(box)
                                   if e.get("event") == "event_delivery_failed"], timeout=30,
                          what="the timed-out attempt")
        (child,) = map(int, runs(pids))
        wait_for(lambda: gone(child), timeout=10, what="the command's child killed")
    finally:
        code = stop(proc)
        kill_pids(pids)
    assert code == 0
    assert "still running after 1 s ([notify] command_timeout_seconds)" in failed[0]["error"]
    (pending,) = undelivered(box)
    assert pending["deliveries"]["command"]["attempts"] == 1


# --- a webhook that answers a byte a second -------------------------------------------------

@pytest.mark.slow
def test_a_webhook_answering_a_byte_a_second_is_cut_at_its_deadline(tmp_path, drip):
    """read_timeout_seconds bounds the whole answer, not each read: the attempt ends about
    3 s in (a handful of bytes sent), not after the whole 90-byte answer."""
    box = sandbox_with(tmp_path, {"url": drip.url, "read_timeout_seconds": 3,
                                  "retry_initial_seconds": 60, "retry_max_seconds": 60})
    proc = start_daemon(box)
    try:
        publish(box, ["dripping"])
        failed = wait_for(lambda: [e for e in log_events(box)
                                   if e.get("event") == "event_delivery_failed"], timeout=30,
                          what="the attempt cut at its deadline")
        wait_for(lambda: drip.connections and drip.connections[0]["ended"], timeout=10,
                 what="the server seeing the close")
    finally:
        assert stop(proc) == 0
    first = drip.connections[0]
    assert first["cut"] and first["key"] == failed[0]["event_id"]
    assert first["sent"] <= 8 < len(DripServer.ANSWER), first
    assert "no answer within 3 s ([notify] read_timeout_seconds)" in failed[0]["error"]
    (pending,) = undelivered(box)
    assert pending["deliveries"]["webhook"]["attempts"] == 1


@pytest.mark.slow
def test_a_command_beside_a_slow_webhook_gets_its_event_at_once(tmp_path, drip):
    """Each sink has its own delivery thread: while the webhook's first attempt is still
    being answered a byte a second (its deadline 30 s away), the command has taken the
    event."""
    got = tmp_path / "got.txt"
    box = sandbox_with(tmp_path, {"url": drip.url, "read_timeout_seconds": 30,
                                  "command": ["/bin/sh", "-c", 'cat >/dev/null; echo '
                                              '"$CONTIMG_EVENT_ID" >> "$1"', "sink",
                                              str(got)]})
    proc = start_daemon(box)
    try:
        publish(box, ["beside"])
        wait_for(lambda: runs(got), timeout=20, what="the command's run")
        wait_for(lambda: undelivered(box)[0]["deliveries"]["command"]["state"] ==
                 "delivered", timeout=10, what="the command's delivery recorded")
        wait_for(lambda: drip.connections and drip.connections[0]["key"], timeout=10,
                 what="the webhook's request")
        (event,) = undelivered(box)
        webhook = event["deliveries"]["webhook"]
        first = drip.connections[0]
        # The webhook's one attempt is still under way: no failure recorded, still open.
        assert (webhook["state"], webhook["attempts"]) == ("pending", 0), webhook
        assert first["ended"] is None and first["key"] == event["event_id"]
        assert len(drip.connections) == 1
    finally:
        assert stop(proc) == 0
    assert runs(got) == [event["event_id"]]


# --- the command's environment --------------------------------------------------------------

def env_of(path: Path) -> dict[str, str]:
    return dict(line.split("=", 1) for line in path.read_text().splitlines() if "=" in line)


@pytest.mark.slow
def test_a_command_gets_a_minimal_environment_not_the_daemons(tmp_path):
    """The daemon runs with PGPASSWORD, NOTIFY_SOCKET and another secret in its
    environment; the command's `env` shows none of them: only PATH and the like, and the
    event's variables."""
    out = tmp_path / "env.txt"
    notify = NotifySocket(tmp_path / "notify.sock")
    box = sandbox_with(tmp_path, {"command": ["/bin/sh", "-c", 'cat >/dev/null; env > "$1"',
                                              "sink", str(out)]})
    proc = start_daemon(box, notify_path=notify.path,
                        extra_env={"PGPASSWORD": "secret", "PGUSER": "contimg",
                                   "SINK_QUEUE": "photometry", "API_TOKEN": "hush",
                                   "LANG": "C.UTF-8", "HOME": str(tmp_path)})
    try:
        notify.wait("READY", "1", timeout=60)
        publish(box, ["env_1"])
        wait_for(lambda: out.exists() and not undelivered(box), timeout=30,
                 what="the command's run")
    finally:
        code = stop(proc)
        notify.close()
    assert code == 0
    env = env_of(out)
    (event,) = all_events(box)
    assert not [k for k in env if k.startswith("PG")], env
    assert "NOTIFY_SOCKET" not in env and "API_TOKEN" not in env and "SINK_QUEUE" not in env
    assert "secret" not in out.read_text() and "hush" not in out.read_text()
    assert (env["CONTIMG_EVENT_ID"], env["CONTIMG_EVENT_TYPE"], env["CONTIMG_DATA_ID"]) == (
        event["event_id"], "published", "env_1")
    assert env["PATH"] == os.environ["PATH"]
    assert (env["LANG"], env["HOME"]) == ("C.UTF-8", str(tmp_path))
    # What the shell adds itself aside, nothing else.
    assert set(env) - {"PWD", "SHLVL", "_", "OLDPWD"} <= {
        "PATH", "LANG", "HOME", "CONTIMG_EVENT_ID", "CONTIMG_EVENT_TYPE", "CONTIMG_DATA_ID"}


def test_command_environment_passes_only_the_names_it_lists(tmp_path):
    out = tmp_path / "env.txt"
    box = sandbox_with(tmp_path, {"command": ["/bin/sh", "-c", 'cat >/dev/null; env > "$1"',
                                              "sink", str(out)],
                                  "command_environment": ["SINK_QUEUE", "UNSET_HERE"]})
    proc = start_daemon(box, extra_env={"SINK_QUEUE": "photometry", "API_TOKEN": "hush",
                                        "PGPASSWORD": "secret"})
    try:
        publish(box, ["env_2"])
        wait_for(lambda: out.exists() and not undelivered(box), timeout=30,
                 what="the command's run")
    finally:
        assert stop(proc) == 0
    env = env_of(out)
    assert env["SINK_QUEUE"] == "photometry"
    assert "UNSET_HERE" not in env and "API_TOKEN" not in env and "PGPASSWORD" not in env


@pytest.mark.parametrize(("names", "reason"), [
    (["PGPASSWORD"], "PGPASSWORD cannot be passed to the command"),
    (["OK", "NOTIFY_SOCKET"], "NOTIFY_SOCKET cannot be passed"),
    (["CONTIMG_EVENT_ID"], "CONTIMG_EVENT_ID cannot be passed"),
    (["A B"], "must be a list of environment variable names"),
    ("SINK_QUEUE", "must be a list of environment variable names"),
])
def test_command_environment_refuses_what_must_not_be_passed(names, reason):
    with pytest.raises(ConfigError) as info:
        config_mod.from_mapping({**BASE, "notify": {"command": ["/bin/true"],
                                                    "command_environment": names}})
    assert info.value.key == "notify.command_environment" and reason in info.value.reason
