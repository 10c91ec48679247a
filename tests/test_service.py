"""The daemon as a real process: sd_notify messages on a test socket, real signals,
real files published, a real registry held by another process."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import apsw
import pytest

from contimg_publisher.registry import Candidate, Identity, Registry
from tests.helpers import REPO, log_events, start_daemon, stop, wait_for, write_fits


class NotifySocket:
    """An AF_UNIX datagram socket standing in for systemd's NOTIFY_SOCKET."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.sock.settimeout(0.1)
        self.messages: list[tuple[float, dict[str, str]]] = []
        self._stop = False
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        while not self._stop:
            try:
                data = self.sock.recv(65536)
            except TimeoutError:
                continue
            except OSError:
                return
            fields = dict(line.split("=", 1) for line in data.decode().splitlines() if "=" in line)
            self.messages.append((time.monotonic(), fields))

    def with_key(self, key: str) -> list[tuple[float, dict[str, str]]]:
        return [(t, m) for t, m in list(self.messages) if key in m]

    def wait(self, key: str, value: str | None = None, timeout: float = 20.0,
             after: float = 0.0) -> tuple[float, dict[str, str]]:
        def found():
            for t, m in self.with_key(key):
                if t >= after and (value is None or m[key] == value):
                    return (t, m)
            return None
        return wait_for(found, timeout=timeout, what=f"{key}={value} on the notify socket")

    def close(self) -> None:
        self._stop = True
        self.sock.close()
        self._thread.join(timeout=2)


@pytest.fixture
def notify(tmp_path):
    sock = NotifySocket(tmp_path / "notify.sock")
    yield sock
    sock.close()


def test_ready_only_after_reconciliation_and_status(make_sandbox, notify):
    sandbox = make_sandbox()
    cfg = sandbox.config()
    path = sandbox.mosaics / "stuck.fits"
    write_fits(path)
    st = path.stat()
    with Registry(cfg.registry) as reg:
        reg.register(Candidate("stuck", "mosaic", str(sandbox.stage), str(path),
                               os.fsencode(str(path)),
                               Identity(st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns,
                                        st.st_ctime_ns), "sha256:" + "0" * 64, {}))
        # A publisher that died mid-publish: its lease names a process that no longer exists.
        assert reg.claim("vm:999999:1:dead-boot", 3600, data_id="stuck")
        # Held, so that once reconciled it stays waiting instead of being published at once.
        assert reg.set_hold("stuck", True)
    proc = start_daemon(sandbox, notify.path)
    try:
        notify.wait("READY", "1")
        with Registry(cfg.registry, migrate=False) as reg:
            row = reg.get("stuck")
            assert row.status == "staging", "READY was sent before reconciliation"
            assert [f.kind for f in reg.history("stuck")] == ["interrupted"]
        _, status = notify.wait("STATUS")
        ready_status = [m["STATUS"] for _t, m in notify.with_key("READY")]
        assert any(f"watching {sandbox.stage}" in s for s in ready_status), ready_status
        assert all("waiting" in s and "failed" in s for s in ready_status)
    finally:
        assert stop(proc) == 0


@pytest.mark.slow
def test_watchdog_cadence_reload_and_stop(make_sandbox, notify):
    sandbox = make_sandbox()
    proc = start_daemon(sandbox, notify.path, watchdog_usec=1_000_000)
    try:
        t_ready, _ = notify.wait("READY", "1")
        time.sleep(3.2)
        pings = [t for t, _m in notify.with_key("WATCHDOG") if t > t_ready]
        gaps = [b - a for a, b in zip(pings, pings[1:], strict=False)]
        assert len(pings) >= 5, pings
        assert max(gaps) < 0.75, gaps  # at least every half of WATCHDOG_USEC (0.5 s) + slack

        sent = time.monotonic()
        proc.send_signal(signal.SIGHUP)
        t_reload, reloading = notify.wait("RELOADING", "1", after=sent)
        usec = int(reloading["MONOTONIC_USEC"])
        now_usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        assert 0 <= now_usec - usec < 10_000_000
        t_ready2, _ = notify.wait("READY", "1", after=t_reload)
        assert t_ready2 >= t_reload

        sent = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        notify.wait("STOPPING", "1", after=sent)
        assert proc.wait(timeout=30) == 0
    finally:
        stop(proc)


@pytest.mark.slow
def test_reload_with_broken_config_keeps_running(make_sandbox, notify):
    sandbox = make_sandbox()
    proc = start_daemon(sandbox, notify.path)
    try:
        notify.wait("READY", "1")
        sandbox.update(detect={"settle_second": 1})  # a typo
        sent = time.monotonic()
        proc.send_signal(signal.SIGHUP)
        t, _ = notify.wait("RELOADING", "1", after=sent)
        _, ready = notify.wait("READY", "1", after=t)
        assert "reload failed" in ready["STATUS"] and "detect.settle_second" in ready["STATUS"]
        assert proc.poll() is None
        failed = wait_for(lambda: [e for e in log_events(sandbox)
                                   if e.get("event") == "reload_failed"], what="reload_failed")
        assert failed[0]["key"] == "detect.settle_second"
        assert failed[0]["config"] == str(sandbox.config_path)
        # Still working on the old configuration: a mosaic is published.
        write_fits(sandbox.mosaics / "after_bad_reload.fits")
        wait_for(lambda: (sandbox.products / "mosaics/after_bad_reload.fits").exists(),
                 what="publish after a failed reload")
    finally:
        assert stop(proc) == 0


@pytest.mark.slow
def test_unreachable_notify_socket_is_logged_once_and_publishing_goes_on(tmp_path, make_sandbox):
    """NOTIFY_SOCKET names a socket nobody listens on: the daemon says so once, and still
    publishes and stops cleanly."""
    sandbox = make_sandbox()
    proc = start_daemon(sandbox, tmp_path / "nobody-listens.sock", watchdog_usec=2_000_000)
    try:
        write_fits(sandbox.mosaics / "published_anyway.fits")
        wait_for(lambda: (sandbox.products / "mosaics/published_anyway.fits").exists(),
                 what="a publish with systemd unreachable")
        time.sleep(2.5)  # watchdog pings (every second) fail too
        assert proc.poll() is None
    finally:
        assert stop(proc) == 0
    failed = [e for e in log_events(sandbox) if e.get("event") == "notify_failed"]
    assert len(failed) == 1, failed
    assert failed[0]["notify_socket"] == str(tmp_path / "nobody-listens.sock")
    assert failed[0]["sent"].startswith("STATUS=")
    assert "notify socket" in failed[0]["error"]


@pytest.mark.slow
def test_reload_applies_new_rules_with_same_pid(make_sandbox, notify):
    sandbox = make_sandbox()
    proc = start_daemon(sandbox, notify.path)
    try:
        notify.wait("READY", "1")
        sandbox.update(products=[{"type": "mosaic", "glob": "mosaics/**/*.fits",
                                  "destination": "mosaics"},
                                 {"type": "survey", "glob": "survey/*.fits",
                                  "destination": "survey"}])
        sent = time.monotonic()
        proc.send_signal(signal.SIGHUP)
        t, _ = notify.wait("RELOADING", "1", after=sent)
        notify.wait("READY", "1", after=t)
        write_fits(sandbox.stage / "survey" / "field1.fits")
        wait_for(lambda: (sandbox.products / "survey/field1.fits").exists(),
                 what="a product of the type added by reload")
        assert proc.poll() is None
        ok = [e for e in log_events(sandbox) if e.get("event") == "reload_ok"]
        assert ok and "products" in ok[-1]["changed"]
    finally:
        assert stop(proc) == 0


def test_second_daemon_refuses_naming_the_holder(make_sandbox, notify):
    sandbox = make_sandbox()
    proc = start_daemon(sandbox, notify.path)
    try:
        notify.wait("READY", "1")
        second = subprocess.run([sys.executable, "-m", "contimg_publisher", "--config",
                                 str(sandbox.config_path), "run"], cwd=REPO,
                                capture_output=True, text=True, timeout=60,
                                env={k: v for k, v in os.environ.items() if k != "NOTIFY_SOCKET"})
        assert second.returncode == 1
        assert f"pid {proc.pid} (daemon)" in second.stderr + second.stdout
    finally:
        assert stop(proc) == 0


@pytest.mark.slow
def test_blocked_loop_stops_pinging(make_sandbox, notify):
    """A main loop stuck on the registry (another process holds its write lock) sends no
    WATCHDOG=1, although the process and its other threads live on."""
    sandbox = make_sandbox()
    sandbox.update(registry={"busy_timeout_seconds": 4.0})
    proc = start_daemon(sandbox, notify.path, watchdog_usec=1_000_000)
    try:
        notify.wait("READY", "1")
        holder = apsw.Connection(str(sandbox.registry))
        holder.set_busy_timeout(5000)
        holder.execute("BEGIN IMMEDIATE")
        try:
            held_at = time.monotonic()
            write_fits(sandbox.mosaics / "needs_a_write.fits")  # registering it needs the lock
            time.sleep(3.0)
            during = [t for t, _m in notify.with_key("WATCHDOG") if held_at + 1.2 < t]
            assert proc.poll() is None
        finally:
            holder.execute("ROLLBACK")
            holder.close()
        assert during == [], f"pinged while its loop was blocked: {during}"
        released = time.monotonic()
        notify.wait("WATCHDOG", "1", after=released, timeout=10)
        wait_for(lambda: (sandbox.products / "mosaics/needs_a_write.fits").exists(),
                 what="publish once the registry is free")
    finally:
        assert stop(proc) == 0


def test_start_up_scan_extends_the_start_timeout_before_ready(make_sandbox, notify):
    sandbox = make_sandbox()
    for i in range(3):
        write_fits(sandbox.mosaics / f"before_start_{i}.fits", seed=i)
    proc = start_daemon(sandbox, notify.path)
    try:
        t_ready, _ = notify.wait("READY", "1")
        extends = [(t, m) for t, m in notify.with_key("EXTEND_TIMEOUT_USEC") if t <= t_ready]
        assert extends, notify.messages
        assert int(extends[0][1]["EXTEND_TIMEOUT_USEC"]) >= 60_000_000
    finally:
        assert stop(proc) == 0


# The products area must be another filesystem for the copy path: /dev/shm is a tmpfs
# wherever these tests run. The copy is slowed by a delay per 8 MiB chunk, read only from
# this environment variable, because no real disk here is slow enough to stop mid-copy.
SLOW_COPY = {"CONTIMG_PUBLISHER_TEST_COPY_DELAY": "1.0"}


@pytest.fixture
def shm_products(dev_shm):
    import tempfile
    folder = Path(tempfile.mkdtemp(prefix="contimg-products-", dir=dev_shm))
    yield folder
    import shutil
    shutil.rmtree(folder, ignore_errors=True)


def _temps(folder: Path) -> list[Path]:
    return [p for p in folder.rglob(".contimg-tmp.*")]


@pytest.mark.slow
def test_stop_lets_the_copy_in_flight_finish(make_sandbox, notify, shm_products):
    sandbox = make_sandbox(products_root=shm_products,
                           service={"stop_timeout_seconds": 30})
    data = write_fits(sandbox.mosaics / "big.fits", pixels=2048, seed=5)  # 3 chunks
    proc = start_daemon(sandbox, notify.path, extra_env=SLOW_COPY)
    try:
        notify.wait("READY", "1")
        wait_for(lambda: _temps(shm_products), timeout=30, what="the copy to start")
        sent = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        notify.wait("STOPPING", "1", after=sent)
        assert proc.wait(timeout=60) == 0
    finally:
        stop(proc)
    assert (shm_products / "mosaics" / "big.fits").read_bytes() == data
    assert _temps(shm_products) == []
    assert not (sandbox.mosaics / "big.fits").exists()
    assert sandbox.row("big")["status"] == "published"


@pytest.mark.slow
def test_stop_aborts_a_long_copy_cleanly_and_it_resumes(make_sandbox, notify, shm_products):
    sandbox = make_sandbox(products_root=shm_products,
                           service={"stop_timeout_seconds": 0.5})
    data = write_fits(sandbox.mosaics / "big.fits", pixels=2048, seed=6)
    proc = start_daemon(sandbox, notify.path, extra_env=SLOW_COPY)
    try:
        notify.wait("READY", "1")
        wait_for(lambda: _temps(shm_products), timeout=30, what="the copy to start")
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=20) == 0
    finally:
        stop(proc)
    assert _temps(shm_products) == [], "the aborted copy left its temporary file"
    assert not (shm_products / "mosaics" / "big.fits").exists()
    assert (sandbox.mosaics / "big.fits").read_bytes() == data
    row = sandbox.row("big")
    assert row["status"] == "staging" and row["publish_attempts"] == 0, row

    proc = start_daemon(sandbox, notify.path)
    try:
        wait_for(lambda: (shm_products / "mosaics" / "big.fits").exists(), timeout=60,
                 what="the publish after restart")
    finally:
        assert stop(proc) == 0
    assert (shm_products / "mosaics" / "big.fits").read_bytes() == data
    assert sandbox.row("big")["status"] == "published"


@pytest.mark.slow
def test_reload_during_a_copy_keeps_the_copy(make_sandbox, notify, shm_products):
    sandbox = make_sandbox(products_root=shm_products)
    data = write_fits(sandbox.mosaics / "big.fits", pixels=2048, seed=7)
    proc = start_daemon(sandbox, notify.path, extra_env=SLOW_COPY)
    try:
        notify.wait("READY", "1")
        wait_for(lambda: _temps(shm_products), timeout=30, what="the copy to start")
        sandbox.update(log={"level": "info"}, publish={"max_attempts": 5})
        sent = time.monotonic()
        proc.send_signal(signal.SIGHUP)
        t, _ = notify.wait("RELOADING", "1", after=sent)
        notify.wait("READY", "1", after=t)
        assert _temps(shm_products), "the reload dropped the copy in flight"
        wait_for(lambda: (shm_products / "mosaics" / "big.fits").exists(), timeout=30,
                 what="the copy to finish after the reload")
        assert proc.poll() is None
    finally:
        assert stop(proc) == 0
    assert (shm_products / "mosaics" / "big.fits").read_bytes() == data
    assert sandbox.row("big")["publish_attempts"] == 0
    ok = [e for e in log_events(sandbox) if e.get("event") == "reload_ok"]
    assert ok and "max_attempts" in str(ok[-1]["changed"]), ok


def test_deadlines_say_what_is_due_and_how_long_to_sleep():
    from contimg_publisher.deadlines import Deadlines, Due

    d = Deadlines()
    assert d.due(100.0) == [] and d.next_timeout(100.0, cap=None) == 1.0
    d.after(Due.RESCAN, 30.0, 100.0)
    d.set(Due.HEARTBEAT, 99.0)
    d.set(Due.STATUS, 98.0)
    assert d.due(100.0) == [Due.STATUS, Due.HEARTBEAT]  # earliest first
    assert d.is_due(Due.HEARTBEAT, 100.0) and not d.is_due(Due.RESCAN, 100.0)
    assert not d.is_due(Due.CLAIM, 100.0)  # never set: never due
    assert d.next_timeout(100.0) == 0.0  # one is past
    d.set(Due.STATUS, None)
    d.set(Due.HEARTBEAT, None)
    assert d.at(Due.STATUS) is None
    assert d.next_timeout(100.0) == 1.0  # the cap
    assert d.next_timeout(100.0, cap=None) == 30.0
    d.set(Due.WATCHDOG, 104.0)
    assert d.next_timeout(100.0, among=frozenset({Due.RESCAN, Due.WATCHDOG}),
                          cap=None) == 4.0
    assert d.next_timeout(100.0, among=frozenset({Due.RESCAN}), cap=None) == 30.0


def test_services_start_in_order_stop_in_reverse_and_report_the_unhealthy():
    from contimg_publisher.services import Services

    calls: list[str] = []

    class Fake:
        def __init__(self, name: str, ok: bool = True) -> None:
            self.name, self.ok = name, ok

        def start(self) -> None:
            calls.append(f"start {self.name}")

        def stop(self) -> None:
            calls.append(f"stop {self.name}")

        def healthy(self) -> bool:
            return self.ok

        def reconfigure(self, config, old) -> None:
            calls.append(f"reconfigure {self.name}")

    services = Services()
    a, b = Fake("a"), Fake("b", ok=False)
    services.start(a)
    services.start(b)
    assert services.unhealthy() == [b]
    services.reconfigure(None, None)  # type: ignore[arg-type]
    services.stop()
    services.stop()  # stopped once
    assert calls == ["start a", "start b", "reconfigure a", "reconfigure b", "stop b", "stop a"]
