"""The command sink: a program run once per event, judged by its exit status alone.

What the program starts may outlive it and keep its pipes open, write without end, or
ignore its input; none of that may hold the daemon. So the attempt waits for the program's
own exit (not for its pipes to close) within the timeout, reads its stderr in chunks and
keeps only the last ANSWER_MAX_BYTES, kills its whole process group at the deadline, and
runs it with an environment made here rather than the daemon's own (which holds the
registry's credentials and systemd's notification socket).
"""

from __future__ import annotations

import contextlib
import os
import selectors
import signal
import subprocess
import time
from collections.abc import Iterable, Mapping

from contimg_publisher import redact
from contimg_publisher.registry import Event
from contimg_publisher.sinks import ANSWER_MAX_BYTES, Outcome, body
from contimg_publisher.states import Sink

CHUNK_BYTES = 65536  # one read or write of a pipe
DRAIN_MAX_BYTES = 1 << 20  # read after the exit: what the pipe held, not what a child adds
KILL_WAIT_SECONDS = 5.0  # for a killed program to be reaped
POLL_SECONDS = 0.05  # how often the exit is looked for where pidfd_open is missing
LEFTOVERS_MAX = 64  # killed programs not reaped yet, polled at each later attempt
# Passed on from the daemon's environment when set: the program finds its tools, its
# locale and its home. Everything else is left out unless [notify] command_environment
# names it.
BASE_ENVIRONMENT = ("PATH", "LANG", "LC_ALL", "HOME")


def environment(event: Event, names: Iterable[str] = (),
                source: Mapping[str, str] | None = None) -> dict[str, str]:
    """The program's whole environment: BASE_ENVIRONMENT and the `names` the config passes
    on (those set in the daemon's), then the event's CONTIMG_* variables."""
    source = os.environ if source is None else source
    env = {name: source[name] for name in (*BASE_ENVIRONMENT, *names) if name in source}
    env.setdefault("PATH", os.defpath)
    env.update(CONTIMG_EVENT_ID=event.event_id, CONTIMG_EVENT_TYPE=event.type,
               CONTIMG_DATA_ID=event.data_id)
    return env


class Tail:
    """The last `size` bytes of a stream, whatever its length."""

    def __init__(self, size: int = ANSWER_MAX_BYTES) -> None:
        self.size = size
        self.data = bytearray()

    def add(self, chunk: bytes) -> None:
        self.data += chunk[-self.size:]
        del self.data[:-self.size]

    def text(self) -> str:
        return self.data.decode("utf-8", "replace").strip().replace("\n", " ")


class Command:
    """The event's JSON on the program's standard input; exit status 0 within the timeout
    is delivery. Run without a shell, in a session (and process group) of its own, so a
    timeout kills what it started too; what it leaves running after a clean exit is not
    waited for."""

    name = Sink.COMMAND

    def __init__(self, argv: tuple[str, ...], timeout: float,
                 passed: tuple[str, ...] = ()) -> None:
        self.argv = argv
        self.timeout = timeout
        self.passed = passed
        self._proc: subprocess.Popen[bytes] | None = None
        self._leftovers: list[subprocess.Popen[bytes]] = []

    def describe(self) -> str:
        return redact.text(" ".join(self.argv))

    def deliver(self, event: Event) -> Outcome:
        self._reap()
        try:
            proc = subprocess.Popen(self.argv, stdin=subprocess.PIPE,
                                    stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                    env=environment(event, self.passed),
                                    start_new_session=True, close_fds=True)
        except OSError as exc:
            return Outcome(False, f"cannot run {self.argv[0]}: {exc.strerror or exc}")
        self._proc = proc
        err = Tail()
        try:
            finished = self._run(proc, body(event), err)
        finally:
            self._proc = None
            for pipe in (proc.stdin, proc.stderr):
                if pipe is not None:
                    with contextlib.suppress(OSError):
                        pipe.close()
        if not finished:
            self._kill(proc)
            try:
                proc.wait(KILL_WAIT_SECONDS)
            except subprocess.TimeoutExpired:
                if len(self._leftovers) < LEFTOVERS_MAX:
                    self._leftovers.append(proc)
            tail = err.text()
            return Outcome(False, f"still running after {self.timeout:g} s ([notify] "
                                  "command_timeout_seconds); its process group killed"
                                  + (f": {tail[-300:]}" if tail else ""))
        code = proc.returncode
        if code == 0:
            return Outcome(True)
        tail = err.text()
        how = f"killed by signal {-code}" if code < 0 else f"exit status {code}"
        return Outcome(False, how + (f": {tail[-300:]}" if tail else ""))

    def _run(self, proc: subprocess.Popen[bytes], data: bytes, err: Tail) -> bool:
        """Feed stdin and read stderr until the program itself exits (True) or the
        timeout passes (False). Pipes a child still holds open are not waited for."""
        assert proc.stdin is not None and proc.stderr is not None
        deadline = time.monotonic() + self.timeout
        stdin, stderr = proc.stdin.fileno(), proc.stderr.fileno()
        os.set_blocking(stdin, False)
        os.set_blocking(stderr, False)
        exited = pidfd(proc.pid)
        sent = 0
        with selectors.DefaultSelector() as sel:
            sel.register(stderr, selectors.EVENT_READ)
            if data:
                sel.register(stdin, selectors.EVENT_WRITE)
            else:
                proc.stdin.close()
            if exited is not None:
                sel.register(exited, selectors.EVENT_READ)
            try:
                while proc.poll() is None:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        return False
                    wait = left if exited is not None else min(left, POLL_SECONDS)
                    for key, _mask in sel.select(wait):
                        if key.fd == stdin:
                            sent = self._feed(sel, proc, data, sent)
                        elif key.fd == stderr and not read_some(stderr, err):
                            sel.unregister(stderr)  # end of file: only the exit matters
            finally:
                if exited is not None:
                    os.close(exited)
        drain(stderr, err)
        return True

    @staticmethod
    def _feed(sel: selectors.BaseSelector, proc: subprocess.Popen[bytes], data: bytes,
              sent: int) -> int:
        """Write what the pipe takes now; close stdin once all is sent or the program
        stopped reading."""
        assert proc.stdin is not None
        try:
            sent += os.write(proc.stdin.fileno(), data[sent:sent + CHUNK_BYTES])
        except BlockingIOError:
            return sent
        except OSError:  # EPIPE: it does not read its input; its exit status decides
            sent = len(data)
        if sent >= len(data):
            sel.unregister(proc.stdin.fileno())
            proc.stdin.close()
        return sent

    @staticmethod
    def _kill(proc: subprocess.Popen[bytes]) -> None:
        with contextlib.suppress(OSError):
            os.killpg(proc.pid, signal.SIGKILL)

    def _reap(self) -> None:
        self._leftovers = [p for p in self._leftovers if p.poll() is None]

    def cancel(self) -> None:
        proc = self._proc
        if proc is not None:
            self._kill(proc)


def pidfd(pid: int) -> int | None:
    """A descriptor readable once `pid` exits (Linux 5.3); None where there is none."""
    try:
        return os.pidfd_open(pid)
    except (AttributeError, OSError):
        return None


def read_some(fd: int, tail: Tail) -> bool:
    """One chunk into the tail; False at end of file."""
    try:
        chunk = os.read(fd, CHUNK_BYTES)
    except BlockingIOError:
        return True
    except OSError:
        return False
    if chunk:
        tail.add(chunk)
    return bool(chunk)


def drain(fd: int, tail: Tail) -> None:
    """What the pipe already holds after the exit (the program's last words), without
    waiting for anything a child still writes."""
    for _ in range(DRAIN_MAX_BYTES // CHUNK_BYTES):
        try:
            chunk = os.read(fd, CHUNK_BYTES)
        except OSError:  # BlockingIOError: nothing more for now
            return
        if not chunk:
            return
        tail.add(chunk)
