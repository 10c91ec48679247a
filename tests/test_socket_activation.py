"""The status port from systemd (socket activation), as contimg-publisher.socket passes it.

The test makes the listening socket and starts a real daemon with it at descriptor 3 and
LISTEN_PID/LISTEN_FDS set, as systemd does. The daemon must answer on that socket, open no
port of its own (the shipped unit would refuse it an Internet socket), keep it across a
reload that restarts the server, and say when [metrics] listen names another address.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import urllib.request
from typing import Any

from tests.helpers import PYTHON, REPO, MakeSandbox, Sandbox, free_port, log_events, stop, wait_for


def _get(port: int, path: str) -> tuple[int, bytes]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as resp:
        return resp.status, resp.read()


def _refused(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(2)
        return s.connect_ex(("127.0.0.1", port)) != 0


def _start_activated(sandbox: Sandbox, listener: socket.socket) -> subprocess.Popen[Any]:
    """`run` with `listener` at descriptor 3, LISTEN_PID being the daemon's own pid."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "LISTEN_PID", "LISTEN_FDS")}
    script = 'exec 3<&"$1"; shift; export LISTEN_PID=$$ LISTEN_FDS=1; exec "$@"'
    log = open(sandbox.root / "daemon.log", "a")  # noqa: SIM115 - closed with the process
    fd = listener.fileno()
    return subprocess.Popen(["bash", "-c", script, "bash", str(fd), PYTHON, "-m",
                             "contimg_publisher", "--config", str(sandbox.config_path), "run"],
                            cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, text=True,
                            pass_fds=(fd,))


def _events(sandbox: Sandbox, name: str) -> list[dict[str, Any]]:
    return [e for e in log_events(sandbox) if e.get("event") == name]


def test_daemon_serves_on_the_socket_systemd_passed(make_sandbox: MakeSandbox) -> None:
    configured = free_port()
    sandbox = make_sandbox(metrics={"listen": f"127.0.0.1:{configured}"})
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    proc = _start_activated(sandbox, listener)
    listener.close()  # the daemon has its own copy now
    try:
        wait_for(lambda: _events(sandbox, "metrics_listening"), 30, what="metrics_listening")
        assert _get(port, "/healthz") == (200, b"ok\n")
        assert _get(port, "/status.json")[0] == 200
        assert _refused(configured), "the daemon bound [metrics] listen as well"
        [listening] = _events(sandbox, "metrics_listening")
        assert listening["from_systemd"] is True
        assert listening["listen"] == f"127.0.0.1:{port}"
        [differs] = _events(sandbox, "metrics_listen_differs")
        assert differs["configured"] == f"127.0.0.1:{configured}"
        # A reload that changes [metrics] restarts the server on the same passed socket.
        sandbox.update(metrics={"listen": f"127.0.0.1:{port}"})
        proc.send_signal(signal.SIGHUP)
        wait_for(lambda: len(_events(sandbox, "metrics_listening")) == 2, 30,
                 what="the server restarted by the reload")
        assert _get(port, "/healthz") == (200, b"ok\n")
        assert len(_events(sandbox, "metrics_listen_differs")) == 1  # they agree now
    finally:
        stop(proc)
    assert proc.returncode == 0
