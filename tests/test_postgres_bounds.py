"""The bounds of a PostgreSQL registry's waits (registry/pgconn.py), on a real server: how
they follow from the busy timeout and the lease, and that a statement past its bound and
a transaction left idle past its bound each end as RegistryUnavailable, in about that
time. (A link that stops answering: tests/test_postgres_partition.py.)
"""

from __future__ import annotations

import time

import pytest

from contimg_publisher.registry import RegistryBusy, RegistryUnavailable
from contimg_publisher.registry.pgconn import limits
from contimg_publisher.registry.postgres import PostgresRegistry
from tests.pg import Server


def test_the_bounds_follow_the_busy_timeout_and_the_lease() -> None:
    assert limits(10.0, 120.0).call_seconds == 10.0       # the busy timeout is shorter
    assert limits(3.0, 5.0).call_seconds == 1.25          # a quarter of a short lease
    assert limits(0.0).call_seconds == 1.0                # never below a second
    short = limits(3.0, 5.0)
    assert short.statement_seconds > short.call_seconds   # a lock wait is told as busy
    assert short.connect_seconds == 2                     # libpq's least
    assert short.idle_in_transaction_seconds == 5.0
    kwargs = short.connect_kwargs()
    assert kwargs["tcp_user_timeout"] == 1250 and kwargs["keepalives_idle"] == 1
    assert "-c statement_timeout=1750" in kwargs["options"]


@pytest.mark.slow
def test_the_server_enforces_them_on_each_connection(pg_server: Server) -> None:
    with PostgresRegistry(pg_server.uri, busy_timeout_seconds=3.0, lease_seconds=5.0) as reg, \
            reg.read() as conn:
        shown = {name: conn.execute(f"SHOW {name}").fetchone()[name]  # type: ignore[index]
                 for name in ("lock_timeout", "statement_timeout",
                              "idle_in_transaction_session_timeout")}
    assert shown == {"lock_timeout": "1250ms", "statement_timeout": "1750ms",
                     "idle_in_transaction_session_timeout": "5s"}


@pytest.mark.slow
def test_a_statement_past_its_bound_is_registry_unavailable(pg_server: Server) -> None:
    with PostgresRegistry(pg_server.uri, busy_timeout_seconds=1.0) as reg:
        started = time.monotonic()
        with pytest.raises(RegistryUnavailable, match="ran past its bound of 1.5 s") as info, \
                reg.read() as conn:
            conn.execute("SELECT pg_sleep(30)")
        assert not isinstance(info.value, RegistryBusy)
        assert time.monotonic() - started < 5
        assert reg.clock() > 0  # the connection is usable again


@pytest.mark.slow
def test_a_transaction_left_idle_is_ended_by_the_server(pg_server: Server) -> None:
    with PostgresRegistry(pg_server.uri, busy_timeout_seconds=1.0) as reg:
        reg.heartbeat("idle:1:1:1", 1.0, "test")
        with pytest.raises(RegistryUnavailable), reg.write():
            reg.heartbeat("idle:1:1:1", 2.0, "changed")
            time.sleep(reg.limits.idle_in_transaction_seconds + 1.5)
            reg.clock()
        # Nothing of that transaction was kept, and its row lock is gone.
        assert pg_server.psql("SELECT version FROM heartbeats") == "test"
        pg_server.psql("SET lock_timeout = '1s'; UPDATE heartbeats SET version = 'x'")
        assert pg_server.psql("SELECT version FROM heartbeats") == "x"
        deadline = time.monotonic() + 10
        while True:  # the pool replaces the connection the server ended
            try:
                assert reg.clock() > 0
                break
            except RegistryUnavailable:
                assert time.monotonic() < deadline
                time.sleep(0.2)
