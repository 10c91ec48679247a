"""A small HTTP/1.1 server with bounds, for /metrics and the status page.

The status port is reachable by every local user, so nothing a client does may cost the
daemon more than a fixed share of its descriptors, memory or CPU:

- one thread (the selector loop) accepts connections and reads request headers, without
  blocking; a connection costs a thread only once its whole request head is in hand, and
  then one of a fixed pool of WORKERS;
- at most `max_connections` are open at once; a new one beyond that evicts the oldest
  connection that is only waiting (for its request or idle between requests), or, when
  every one is being served, gets a 503 written without blocking and is closed;
- a request head (request line and headers) must arrive whole within `request_seconds`
  of its first byte, and a kept-alive connection may stay idle `idle_seconds`: a
  slowloris is cut off at the deadline, however slowly it trickles bytes;
- a request head is at most HEAD_MAX_BYTES (414 or 431 beyond); an answer is written
  within `request_seconds` or the connection is closed;
- `accept` failing for lack of descriptors (EMFILE, ENFILE) pauses accepting for a
  growing, bounded interval, said once, rather than spinning on a listening socket that
  stays readable.

The answers come from a BaseHTTPRequestHandler subclass that reads the buffered head and
writes into memory; this module sends those bytes.
"""

from __future__ import annotations

import contextlib
import enum
import errno
import io
import queue
import select
import selectors
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler
from typing import Any

MAX_CONNECTIONS = 128
BACKLOG = 128
WORKERS = 4
REQUEST_SECONDS = 10.0
IDLE_SECONDS = 15.0
HEAD_MAX_BYTES = 32 * 1024
RECV_BYTES = 8192
ACCEPTS_PER_TURN = 64
ACCEPT_PAUSE_INITIAL = 0.1
ACCEPT_PAUSE_MAX = 5.0
# Errors of accept() that say the process or the system is out of descriptors.
OUT_OF_DESCRIPTORS = (errno.EMFILE, errno.ENFILE)

_BUSY_ANSWER = (b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: text/plain\r\n"
                b"Content-Length: 30\r\nConnection: close\r\nRetry-After: 1\r\n\r\n"
                b"too many connections; retry\r\n\r\n")


def _error_answer(status: int, reason: str) -> bytes:
    text = f"{status} {reason}\n".encode()
    return (f"HTTP/1.1 {status} {reason}\r\nContent-Type: text/plain\r\n"
            f"Content-Length: {len(text)}\r\nConnection: close\r\n\r\n").encode() + text


class Phase(enum.Enum):
    """Where one connection is: only READING and IDLE ones are waiting on the client."""

    READING = "reading"   # accepted or first byte of a request seen: the request deadline
    IDLE = "idle"         # kept alive after an answer: the idle deadline
    SERVING = "serving"   # its head is complete; a worker has it


@dataclass(eq=False)
class Connection:
    sock: socket.socket
    address: Any
    opened: float
    deadline: float
    phase: Phase = Phase.READING
    buffer: bytearray = field(default_factory=bytearray)


def head_end(buffer: bytes | bytearray) -> int:
    """The offset just past the blank line that ends a request head, or -1."""
    ends = [i + n for i, n in ((buffer.find(b"\r\n\r\n"), 4), (buffer.find(b"\n\n"), 2))
            if i >= 0]
    return min(ends) if ends else -1


class BufferedHandler(BaseHTTPRequestHandler):
    """A handler that answers one request whose head is already read: `request` is a
    Request (the bytes), the answer goes into memory (`wfile`)."""

    protocol_version = "HTTP/1.1"

    def setup(self) -> None:
        exchange: Request = self.request
        self.rfile = io.BytesIO(exchange.head)
        self.answer = io.BytesIO()
        self.wfile = self.answer

    def handle(self) -> None:
        self.close_connection = True
        self.handle_one_request()

    def finish(self) -> None:
        """Nothing to flush: the server sends what is in wfile."""


@dataclass(frozen=True)
class Request:
    head: bytes


class BoundedServer:
    """Serve `handler` on `address` with the bounds above, from one thread plus WORKERS.

    `listener`: a listening socket made by someone else (systemd's socket activation), used
    instead of binding `address`; it is closed at stop like one of our own.
    `on_event(name, **fields)` hears what an operator should see (descriptors ran out,
    accepting resumed); it is called from the server's thread."""

    def __init__(self, address: tuple[str, int], handler: type[BufferedHandler], *,
                 max_connections: int = MAX_CONNECTIONS, backlog: int = BACKLOG,
                 workers: int = WORKERS, request_seconds: float = REQUEST_SECONDS,
                 idle_seconds: float = IDLE_SECONDS,
                 on_event: Callable[..., None] | None = None,
                 listener: socket.socket | None = None) -> None:
        if listener is None:
            host, port = address
            family = socket.AF_INET6 if ":" in host else socket.AF_INET
            listener = socket.create_server((host, port), family=family, backlog=backlog)
        self.listener = listener
        self.listener.setblocking(False)
        self.server_address: tuple[Any, ...] = self.listener.getsockname()
        self.handler = handler
        self.max_connections = max_connections
        self.request_seconds = request_seconds
        self.idle_seconds = idle_seconds
        self.on_event = on_event or (lambda *_a, **_k: None)
        self._selector = selectors.DefaultSelector()
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._selector.register(self.listener, selectors.EVENT_READ, None)
        self._selector.register(self._wake_r, selectors.EVENT_READ, None)
        self._open: dict[int, Connection] = {}  # by descriptor; the cap counts these
        self._jobs: queue.SimpleQueue[Connection | None] = queue.SimpleQueue()
        self._done: queue.SimpleQueue[tuple[Connection, bool]] = queue.SimpleQueue()
        self._stopping = threading.Event()
        self._accept_paused_until: float | None = None
        self._accept_pause = ACCEPT_PAUSE_INITIAL
        self._threads = [threading.Thread(target=self._work, name=f"contimg-http-{i}",
                                          daemon=True) for i in range(workers)]
        self._loop = threading.Thread(target=self._serve, name="contimg-metrics", daemon=True)
        self.evicted = 0  # connections closed to make room (for tests and the curious)
        self.refused = 0

    # --- life -------------------------------------------------------------------------------

    def start(self) -> None:
        for t in self._threads:
            t.start()
        self._loop.start()

    def stop(self, timeout: float = 5.0) -> None:
        self._stopping.set()
        self._wake()
        for _ in self._threads:
            self._jobs.put(None)
        deadline = time.monotonic() + timeout
        for t in (self._loop, *self._threads):
            if t.is_alive():
                t.join(max(0.0, deadline - time.monotonic()))
        self._close_all()

    def _close_all(self) -> None:
        for conn in list(self._open.values()):
            self._close(conn)
        for sock in (self.listener, self._wake_r, self._wake_w):
            with contextlib.suppress(OSError):
                sock.close()
        with contextlib.suppress(OSError, RuntimeError):
            self._selector.close()

    def _wake(self) -> None:
        with contextlib.suppress(OSError):
            self._wake_w.send(b"x")

    # --- the selector loop ------------------------------------------------------------------

    def _serve(self) -> None:
        while not self._stopping.is_set():
            now = time.monotonic()
            self._resume_accepting(now)
            timeout = self._next_timeout(now)
            try:
                ready = self._selector.select(timeout)
            except OSError:  # pragma: no cover - a closed selector at stop
                return
            for key, _mask in ready:
                if key.fileobj is self.listener:
                    self._accept()
                elif key.fileobj is self._wake_r:
                    with contextlib.suppress(OSError):
                        while self._wake_r.recv(4096):
                            pass
                else:
                    self._read(key.data)
            self._take_back()
            self._expire(time.monotonic())

    def _next_timeout(self, now: float) -> float:
        deadlines = [c.deadline for c in self._open.values() if c.phase is not Phase.SERVING]
        if self._accept_paused_until is not None:
            deadlines.append(self._accept_paused_until)
        if not deadlines:
            return 1.0
        return min(1.0, max(0.0, min(deadlines) - now))

    def _accept(self) -> None:
        for _ in range(ACCEPTS_PER_TURN):
            try:
                sock, address = self.listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                if exc.errno in OUT_OF_DESCRIPTORS:
                    self._pause_accepting(exc)
                return  # ECONNABORTED and kin: the client left; the next turn goes on
            if self._accept_paused_until is None and self._accept_pause > ACCEPT_PAUSE_INITIAL:
                self._accept_pause = ACCEPT_PAUSE_INITIAL
                self.on_event("status_server_accepting")
            self._admit(sock, address)

    def _pause_accepting(self, exc: OSError) -> None:
        """The listening socket stays readable while accept() fails: stop asking for a
        while (said once per episode), so the thread sleeps instead of spinning."""
        if self._accept_pause == ACCEPT_PAUSE_INITIAL:
            self.on_event("status_server_out_of_descriptors", error=f"OSError: {exc}",
                          open_connections=len(self._open))
        with contextlib.suppress(KeyError, ValueError):
            self._selector.unregister(self.listener)
        self._accept_paused_until = time.monotonic() + self._accept_pause
        self._accept_pause = min(ACCEPT_PAUSE_MAX, self._accept_pause * 2)

    def _resume_accepting(self, now: float) -> None:
        if self._accept_paused_until is not None and now >= self._accept_paused_until:
            self._accept_paused_until = None
            self._selector.register(self.listener, selectors.EVENT_READ, None)

    def _admit(self, sock: socket.socket, address: Any) -> None:
        if len(self._open) >= self.max_connections and not self._evict_one():
            self.refused += 1
            with contextlib.suppress(OSError):
                sock.setblocking(False)
                sock.send(_BUSY_ANSWER)
            with contextlib.suppress(OSError):
                sock.close()
            return
        sock.setblocking(False)
        now = time.monotonic()
        conn = Connection(sock, address, opened=now, deadline=now + self.request_seconds)
        self._open[sock.fileno()] = conn
        self._selector.register(sock, selectors.EVENT_READ, conn)

    def _evict_one(self) -> bool:
        """Make room by closing the oldest connection that only waits on its client."""
        waiting = [c for c in self._open.values() if c.phase is not Phase.SERVING]
        if not waiting:
            return False
        self._close(min(waiting, key=lambda c: c.opened))
        self.evicted += 1
        return True

    def _read(self, conn: Connection) -> None:
        try:
            data = conn.sock.recv(RECV_BYTES)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self._close(conn)
            return
        if not data:
            self._close(conn)
            return
        if conn.phase is Phase.IDLE:
            conn.phase = Phase.READING
            conn.deadline = time.monotonic() + self.request_seconds
        conn.buffer += data
        self._dispatch_if_complete(conn)

    def _dispatch_if_complete(self, conn: Connection) -> None:
        end = head_end(conn.buffer)
        if end < 0 and len(conn.buffer) <= HEAD_MAX_BYTES:
            return
        if end < 0 or end > HEAD_MAX_BYTES:
            first_line_ends = conn.buffer.find(b"\n")
            answer = (_error_answer(414, "URI Too Long") if first_line_ends < 0
                      or first_line_ends > HEAD_MAX_BYTES
                      else _error_answer(431, "Request Header Fields Too Large"))
            with contextlib.suppress(OSError):
                conn.sock.send(answer)
            self._close(conn)
            return
        with contextlib.suppress(KeyError, ValueError):
            self._selector.unregister(conn.sock)
        conn.phase = Phase.SERVING
        self._jobs.put(conn)

    def _take_back(self) -> None:
        """Connections the workers answered: kept alive (idle deadline) or closed."""
        while True:
            try:
                conn, keep = self._done.get_nowait()
            except queue.Empty:
                return
            if not keep or self._stopping.is_set():
                self._close(conn)
                continue
            conn.phase = Phase.IDLE
            conn.deadline = time.monotonic() + self.idle_seconds
            try:
                self._selector.register(conn.sock, selectors.EVENT_READ, conn)
            except (OSError, ValueError, KeyError):
                self._close(conn)
                continue
            if conn.buffer:  # a pipelined request already in hand
                conn.phase = Phase.READING
                conn.deadline = time.monotonic() + self.request_seconds
                self._dispatch_if_complete(conn)

    def _expire(self, now: float) -> None:
        for conn in [c for c in self._open.values()
                     if c.phase is not Phase.SERVING and c.deadline <= now]:
            self._close(conn)

    def _close(self, conn: Connection) -> None:
        with contextlib.suppress(KeyError, ValueError, OSError):
            self._selector.unregister(conn.sock)
        with contextlib.suppress(OSError):
            fd = conn.sock.fileno()
            if self._open.get(fd) is conn:
                del self._open[fd]
        with contextlib.suppress(OSError):
            conn.sock.close()

    # --- workers ----------------------------------------------------------------------------

    def _work(self) -> None:
        while (conn := self._jobs.get()) is not None:
            keep = False
            try:
                keep = self._answer(conn)
            except Exception:  # noqa: BLE001 - one bad request never ends a worker
                keep = False
            self._done.put((conn, keep))
            self._wake()

    def _answer(self, conn: Connection) -> bool:
        """Answer the head in conn.buffer; True when the connection stays open."""
        end = head_end(conn.buffer)
        head = bytes(conn.buffer[:end])
        del conn.buffer[:end]
        handler = self.handler(Request(head), conn.address, self)  # type: ignore[arg-type]
        answer = handler.answer.getvalue()
        sent = self._send_all(conn.sock, answer, time.monotonic() + self.request_seconds)
        return sent and not handler.close_connection

    @staticmethod
    def _send_all(sock: socket.socket, data: bytes, deadline: float) -> bool:
        """Write the answer before the deadline, however slowly the client reads."""
        view = memoryview(data)
        poller = select.poll()  # no descriptor of its own, unlike a selector
        poller.register(sock, select.POLLOUT)
        while view:
            left = deadline - time.monotonic()
            if left <= 0 or not poller.poll(max(1, int(left * 1000))):
                return False
            try:
                n = sock.send(view)
            except (BlockingIOError, InterruptedError):
                continue
            except OSError:
                return False
            view = view[n:]
        return True
