"""Metrics, the status page, the alert rules and `status` health, against real processes.

A real daemon serves /metrics and the page on a free loopback port; a real Prometheus
scrapes it; headless Chromium renders the page; promtool checks and unit-tests the rules.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import apsw
import pytest
from prometheus_client.parser import text_string_to_metric_families

from contimg_publisher import lock
from contimg_publisher.config import ConfigError, from_mapping
from contimg_publisher.registry import Candidate, Identity, Published, Registry
from tests.helpers import (
    REPO,
    MakeSandbox,
    Sandbox,
    free_port,
    is_root,
    log_events,
    mount_tmpfs,
    start_daemon,
    stop,
    umount,
    wait_for,
    write_fits,
)

RULES = REPO / "etc" / "prometheus" / "contimg-publisher-rules.yml"
DASHBOARD = REPO / "etc" / "grafana" / "contimg-publisher-dashboard.json"
SCRIPT_NAME = "evil<script>alert(1)"
METRIC_RE = re.compile(r"\bcontimg_publisher_[a-z0-9_]+")



def fetch(url: str, timeout: float = 10) -> tuple[int, str, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            return resp.status, resp.headers.get("Content-Type", ""), resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.headers.get("Content-Type", ""), exc.read()


def reachable(url: str) -> bool:
    try:
        return fetch(url, timeout=2)[0] == 200
    except OSError:
        return False


def rows(sandbox: Sandbox) -> dict[str, Any]:
    if not sandbox.registry.exists():
        return {}
    with Registry(sandbox.registry, migrate=False) as reg:
        try:
            return {p.data_id: p for p in reg.products()}
        except apsw.SQLError:  # the daemon has created the file but not yet migrated it
            return {}


def exported(text: str) -> dict[str, list[tuple[dict[str, str], float]]]:
    """Sample name -> [(labels, value)], parsed with prometheus_client's own parser."""
    out: dict[str, list[tuple[dict[str, str], float]]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out.setdefault(sample.name, []).append((dict(sample.labels), sample.value))
    return out


def value(samples: dict[str, list[tuple[dict[str, str], float]]], name: str,
          **labels: str) -> float:
    matches = [v for lab, v in samples.get(name, [])
               if all(lab.get(k) == want for k, want in labels.items())]
    assert len(matches) == 1, (name, labels, samples.get(name))
    return matches[0]


class Page(HTMLParser):
    """The rendered page as elements and text, grouped by <h2> section."""

    def __init__(self, text: str) -> None:
        super().__init__(convert_charrefs=True)
        self.tags: list[str] = []
        self.sections: dict[str, str] = {"": ""}
        self._current = ""
        self._in_h2 = False
        self._heading = ""
        self.feed(text)
        self.close()

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append(tag)
        if tag == "h2":
            self._in_h2, self._heading = True, ""

    def handle_endtag(self, tag: str) -> None:
        if tag == "h2":
            self._in_h2 = False
            self._current = self._heading.strip()
            self.sections.setdefault(self._current, "")
        elif tag in ("td", "th", "li", "p", "h1"):
            self.sections[self._current] += " "

    def handle_data(self, data: str) -> None:
        if self._in_h2:
            self._heading += data
        else:
            self.sections[self._current] += data

    @property
    def text(self) -> str:
        return " ".join(self.sections.values())


# --- a daemon with one product in each interesting state ------------------------------------

RULES_TWO_TYPES = [
    {"type": "mosaic", "glob": "mosaics/**/*.fits", "destination": "mosaics"},
    {"type": "big", "glob": "big/**/*.fits", "destination": "big"},
]


class Site:
    def __init__(self, sandbox: Sandbox, port: int, proc: subprocess.Popen[str],
                 daemon_failed: bool) -> None:
        self.daemon_failed = daemon_failed  # the daemon itself saw the failure
        self.sandbox = sandbox
        self.port = port
        self.proc = proc
        self.url = f"http://127.0.0.1:{port}"


def _fail_through_the_registry(sandbox: Sandbox) -> None:
    """Without root (no tmpfs), the failed product is made by the registry's own
    operations before the daemon starts: claim, then one counted failure. The staged file
    exists and is described as it is, so the daemon's scan finds it unchanged."""
    import hashlib
    path = sandbox.stage / "big" / "stuck.fits"
    data = write_fits(path, pixels=8, seed=2)
    st = path.stat()
    with Registry(sandbox.registry) as reg:
        reg.register(Candidate(data_id="stuck", data_type="big", base_path=str(sandbox.stage),
                               stage_path=str(path), stage_path_bytes=os.fsencode(path),
                               identity=Identity(st.st_dev, st.st_ino, st.st_size,
                                                 st.st_mtime_ns, st.st_ctime_ns),
                               checksum="sha256:" + hashlib.sha256(data).hexdigest(),
                               metadata={}))
        reg.claim("tester", 60, data_id="stuck")
        reg.record_failure("stuck", "tester", "no_space", "No space left on device", 1, 0, 0,
                           500)


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Site]:
    """One running daemon that has published one mosaic, failed one product for good
    (a full products disk, on a small tmpfs), rejected one file, and rejected one whose
    name holds a <script> tag."""
    root = tmp_path_factory.mktemp("site")
    port = free_port()
    products = root / "products"
    mounted = is_root()
    if mounted:
        # Full by inodes, not bytes: statvfs shows room for the copy, so the daemon starts
        # it (a product larger than the free bytes would wait instead), and the kernel
        # refuses the new folder with ENOSPC. Three inodes: the root, mosaics/, good.fits.
        mount_tmpfs(products, "8m,nr_inodes=3")
    else:
        print("SKIP part: not root, so no tmpfs; the failed product is made through the "
              "registry instead of by a full disk")
    # A command sink, so the outbox's per-sink series exist (the rules name them).
    sandbox = Sandbox(root, products_root=products, metrics={"listen": f"127.0.0.1:{port}"},
                      publish={"max_attempts": 1}, products=RULES_TWO_TYPES,
                      notify={"command": ["/bin/true"]})
    write_fits(sandbox.mosaics / "good.fits", pixels=8, seed=1)
    if not mounted:
        _fail_through_the_registry(sandbox)
    (sandbox.mosaics / "bad.fits").write_bytes(b"this is not FITS\n" * 200)
    (sandbox.mosaics / f"{SCRIPT_NAME}.fits").write_bytes(b"<script>alert(2)</script>" * 10)
    proc = start_daemon(sandbox)
    try:
        wait_for(lambda: reachable(f"http://127.0.0.1:{port}/healthz"), 30,
                 what="the metrics server")
        if mounted:  # after good.fits took the last inode
            wait_for(lambda: (r := rows(sandbox).get("good")) is not None
                     and r.status == "published", 30, what="good.fits published")
            write_fits(sandbox.stage / "big" / "stuck.fits", pixels=256, seed=2)

        def settled() -> bool:
            r = rows(sandbox)
            return (r.get("good") is not None and r["good"].status == "published"
                    and r.get("stuck") is not None and r["stuck"].status == "failed"
                    and r.get("bad") is not None and r["bad"].status == "rejected"
                    and r.get(SCRIPT_NAME) is not None
                    and r[SCRIPT_NAME].status == "rejected")
        wait_for(settled, 30, what="one published, one failed, two rejected")
        yield Site(sandbox, port, proc, daemon_failed=mounted)
    finally:
        stop(proc)
        if mounted:
            umount(products)


def test_metrics_report_the_registry_and_the_daemons_events(site: Site) -> None:
    status, ctype, body = fetch(f"{site.url}/metrics")
    assert status == 200 and ctype.startswith("text/plain")
    samples = exported(body.decode())
    products = "contimg_publisher_products"
    assert value(samples, products, type="mosaic", status="published") == 1
    assert value(samples, products, type="mosaic", status="rejected") == 2
    assert value(samples, products, type="big", status="failed") == 1
    assert value(samples, products, type="big", status="staging") == 0
    assert value(samples, "contimg_publisher_published_total", type="mosaic") == 1
    assert value(samples, "contimg_publisher_published_total", type="big") == 0
    good_size = (site.sandbox.products / "mosaics" / "good.fits").stat().st_size
    assert value(samples, "contimg_publisher_published_bytes_total", type="mosaic") == good_size
    failures = {lab["kind"]: v for lab, v in samples["contimg_publisher_failures_total"]}
    if site.daemon_failed:
        assert failures.pop("no_space") == 1
    assert set(failures.values()) == {0}, failures
    assert value(samples, "contimg_publisher_rejected_total", type="mosaic") == 2
    assert value(samples, "contimg_publisher_publish_duration_seconds_count", type="mosaic") == 1
    assert value(samples, "contimg_publisher_detection_latency_seconds_count",
                 type="mosaic") == 1
    with Registry(site.sandbox.registry, migrate=False) as reg:
        published_at = reg.get("good").published_at
        size = reg.size_bytes()
    assert value(samples, "contimg_publisher_last_publish_timestamp_seconds") == \
        pytest.approx(published_at)
    assert value(samples, "contimg_publisher_registry_size_bytes") == size
    assert value(samples, "contimg_publisher_registry_readable") == 1
    assert value(samples, "contimg_publisher_oldest_waiting_age_seconds") == 0
    started = value(samples, "contimg_publisher_start_time_seconds")
    assert started <= published_at
    assert value(samples, "contimg_publisher_config_last_reload_successful") == 1
    assert not [n for n in samples if n.endswith("_created")]


def test_status_page_lists_each_state_and_escapes_names(site: Site) -> None:
    status, ctype, body = fetch(f"{site.url}/")
    assert status == 200 and ctype == "text/html; charset=utf-8"
    text = body.decode()
    assert "<script" not in text.lower()
    assert re.search(r'<meta http-equiv="refresh" content="\d+">', text)
    assert not re.search(r"(src|href)=\"(https?:)?//", text), "an external asset"
    page = Page(text)
    assert "script" not in page.tags
    assert "good" in page.sections["Last publishes"]
    assert str(site.sandbox.products / "mosaics" / "good.fits") in page.sections["Last publishes"]
    stuck = rows(site.sandbox)["stuck"]
    assert "stuck" in page.sections["Failed"]
    assert stuck.publish_error and stuck.publish_error[:40] in page.sections["Failed"]
    assert "bad" in page.sections["Rejected"] and "not a FITS file" in page.sections["Rejected"]
    assert SCRIPT_NAME in page.sections["Rejected"]
    assert "Needs attention" in page.sections
    assert "1 failed product" in page.sections["Needs attention"]
    assert "100.0%" not in page.sections["Success rate"]  # one publish, one failed attempt
    assert "50.0%" in page.sections["Success rate"]


@pytest.mark.slow
def test_status_page_in_headless_chromium(site: Site, tmp_path: Path, chromium: str) -> None:
    base = [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
            f"--user-data-dir={tmp_path / 'profile'}", "--no-first-run"]
    dump = subprocess.run([*base, "--dump-dom", f"{site.url}/"], capture_output=True,
                          text=True, timeout=120)
    assert dump.returncode == 0, dump.stderr[-2000:]
    page = Page(dump.stdout)
    assert "script" not in page.tags, "a product name became an element"
    assert SCRIPT_NAME in page.sections["Rejected"]
    assert "good" in page.sections["Last publishes"]
    assert "stuck" in page.sections["Failed"]
    assert "bad" in page.sections["Rejected"]
    shot = tmp_path / "status-page.png"
    out = subprocess.run([*base, f"--screenshot={shot}", "--window-size=412,1600",
                          "--hide-scrollbars", f"{site.url}/"], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    data = shot.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000
    print(f"status page screenshot: {shot}")


def test_dashboard_and_rules_name_only_exported_metrics(site: Site) -> None:
    samples = exported(fetch(f"{site.url}/metrics")[2].decode())
    dashboard = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    assert len(exprs) >= 10
    named = {m for e in exprs for m in METRIC_RE.findall(e)}
    rules_named = set(METRIC_RE.findall(RULES.read_text()))
    missing = sorted(n for n in named | rules_named if n not in samples)
    assert not missing, f"named but not exported: {missing}"
    assert "contimg_publisher_published_total" in named
    assert "contimg_publisher_oldest_waiting_age_seconds" in rules_named


# --- Prometheus -----------------------------------------------------------------------------

def test_promtool_checks_the_rules(promtool: str) -> None:
    out = subprocess.run([promtool, "check", "rules", str(RULES)], capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "SUCCESS" in out.stdout + out.stderr


def test_promtool_unit_tests_the_alerts(tmp_path: Path, promtool: str) -> None:
    """Each alert fires on the series it is about, and stays quiet on healthy ones."""
    job = 'job="contimg-publisher", instance="pub:9465"'
    tests = {
        "rule_files": [str(RULES)],
        "evaluation_interval": "1m",
        "tests": [{
            "interval": "1m",
            "input_series": [
                {"series": f"up{{{job}}}", "values": "1 1 1 0x20"},
                {"series": f'contimg_publisher_products{{{job}, type="mosaic", '
                           'status="failed"}', "values": "0x10 2x20"},
                {"series": f"contimg_publisher_oldest_waiting_age_seconds{{{job}}}",
                 "values": "0+60x90"},
                {"series": f'contimg_publisher_failures_total{{{job}, kind="no_space"}}',
                 "values": "0+1x90"},
                {"series": f'contimg_publisher_published_total{{{job}, type="mosaic"}}',
                 "values": "0+1x90"},
                {"series": f'contimg_publisher_audit_findings{{{job}, kind="checksum_changed"}}',
                 "values": "0x20 1x70"},
            ],
            "alert_rule_test": [
                {"eval_time": "2m", "alertname": "ContimgPublisherDown", "exp_alerts": []},
                {"eval_time": "10m", "alertname": "ContimgPublisherDown", "exp_alerts": [
                    {"exp_labels": {"severity": "critical", "job": "contimg-publisher",
                                    "instance": "pub:9465"},
                     "exp_annotations": {
                         "summary": "contimg-publisher on pub:9465 is down",
                         "description": "Prometheus has not been able to scrape the publisher "
                         "for 5 minutes: mosaics stay in staging. Check `systemctl status "
                         "contimg-publisher` and `journalctl -u contimg-publisher`."}}]},
                {"eval_time": "5m", "alertname": "ContimgPublisherProductsAtMaxAttempts",
                 "exp_alerts": []},
                {"eval_time": "15m", "alertname": "ContimgPublisherProductsAtMaxAttempts",
                 "exp_alerts": [{"exp_labels": {"severity": "warning", "type": "mosaic",
                                                "instance": "pub:9465"},
                                 "exp_annotations": {
                                     "summary": "2 mosaic product(s) on pub:9465 used up "
                                     "their publish attempts",
                                     "description": "They wait for an operator: "
                                     "`contimg-publisher list --status failed`, fix the cause, "
                                     "then `contimg-publisher retry --all-failed`."}}]},
                {"eval_time": "30m", "alertname": "ContimgPublisherOldestWaitingTooOld",
                 "exp_alerts": []},
                {"eval_time": "75m", "alertname": "ContimgPublisherOldestWaitingTooOld",
                 "exp_alerts": [{"exp_labels": {"severity": "warning", "job": "contimg-publisher",
                                                "instance": "pub:9465"},
                                 "exp_annotations": {
                                     "summary": "A product on pub:9465 has waited 1h 15m 0s "
                                     "to be published",
                                     "description": "The oldest waiting product (held ones "
                                     "excepted) has waited over an hour. See `contimg-publisher "
                                     "status` and the status page."}}]},
                {"eval_time": "90m", "alertname": "ContimgPublisherFailureRateHigh",
                 "exp_alerts": [{"exp_labels": {"severity": "warning",
                                                "instance": "pub:9465"},
                                 "exp_annotations": {
                                     "summary": "50% of publish attempts on pub:9465 failed "
                                     "over the last hour",
                                     "description": "Failures by kind: "
                                     "contimg_publisher_failures_total. A full archive shows as "
                                     "kind=\"no_space\", permissions as kind=\"permission\"."
                                 }}]},
                {"eval_time": "90m", "alertname": "ContimgPublisherReloadFailed",
                 "exp_alerts": []},
                {"eval_time": "10m", "alertname": "ContimgPublisherArchiveFindings",
                 "exp_alerts": []},
                {"eval_time": "30m", "alertname": "ContimgPublisherArchiveFindings",
                 "exp_alerts": [{"exp_labels": {"severity": "warning",
                                                "kind": "checksum_changed",
                                                "instance": "pub:9465"},
                                 "exp_annotations": {
                                     "summary": "The archive audit on pub:9465 has 1 open "
                                     "checksum_changed finding(s)",
                                     "description": "A published product is missing or no "
                                     "longer reads back as recorded, or the products area "
                                     "holds something no row records. `contimg-publisher "
                                     "audit` lists them; `contimg-publisher status` shows the "
                                     "daemon's findings."}}]},
            ],
        }],
    }
    path = tmp_path / "rules-test.yml"
    path.write_text(json.dumps(tests))  # JSON is YAML
    out = subprocess.run([promtool, "test", "rules", str(path)], capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "SUCCESS" in out.stdout + out.stderr


def _query(base: str, expr: str) -> list[dict[str, Any]]:
    url = f"{base}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
    status, _, body = fetch(url)
    data = json.loads(body)
    assert status == 200 and data["status"] == "success", data
    return data["data"]["result"]


@pytest.mark.slow
def test_prometheus_scrapes_the_published_total(
        tmp_path: Path, make_sandbox: MakeSandbox, prometheus: str) -> None:
    port, prom_port = free_port(), free_port()
    sandbox = make_sandbox("site", metrics={"listen": f"127.0.0.1:{port}"})
    daemon = start_daemon(sandbox)
    prom: subprocess.Popen[bytes] | None = None
    try:
        wait_for(lambda: reachable(f"http://127.0.0.1:{port}/healthz"), 30,
                 what="the metrics server")
        config = tmp_path / "prometheus.yml"
        config.write_text(json.dumps({
            "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
            "rule_files": [str(RULES)],
            "scrape_configs": [{"job_name": "contimg-publisher", "scrape_interval": "1s",
                                "static_configs": [{"targets": [f"127.0.0.1:{port}"]}]}],
        }))
        prom_log = open(tmp_path / "prometheus.log", "wb")  # noqa: SIM115 - closed below
        prom = subprocess.Popen([prometheus, f"--config.file={config}",
                                 f"--storage.tsdb.path={tmp_path / 'tsdb'}",
                                 f"--web.listen-address=127.0.0.1:{prom_port}",
                                 "--log.level=warn"], stdout=prom_log, stderr=prom_log)
        base = f"http://127.0.0.1:{prom_port}"
        expr = 'contimg_publisher_published_total{job="contimg-publisher",type="mosaic"}'

        def published() -> float | None:
            if prom.poll() is not None:
                raise AssertionError((tmp_path / "prometheus.log").read_text()[-3000:])
            if not reachable(f"{base}/-/ready"):
                return None
            result = _query(base, expr)
            return float(result[0]["value"][1]) if result else None

        wait_for(lambda: published() == 0, 60, interval=0.5,
                 what="Prometheus to see published_total at 0")
        write_fits(sandbox.mosaics / "first.fits", seed=3)
        wait_for(lambda: published() == 1, 60, interval=0.5,
                 what="Prometheus to see published_total at 1")
        assert (sandbox.products / "mosaics" / "first.fits").exists()
        up = _query(base, 'up{job="contimg-publisher"}')
        assert [float(r["value"][1]) for r in up] == [1.0]
        status, _, body = fetch(f"{base}/api/v1/rules")
        groups = json.loads(body)["data"]["groups"]
        loaded = {r["name"]: r["health"] for g in groups for r in g["rules"]}
        assert "ContimgPublisherDown" in loaded and "ContimgPublisherFailureRateHigh" in loaded
        assert set(loaded.values()) <= {"ok", "unknown"}, loaded
    finally:
        if prom is not None:
            prom.kill()
            prom.wait()
        stop(daemon)


# --- the server's address -------------------------------------------------------------------

def test_metrics_config_is_validated() -> None:
    cfg = from_mapping({"metrics": {"listen": "[::1]:9999", "enabled": False},
                        "status": {"max_waiting_age_seconds": 120}})
    assert (cfg.metrics_listen, cfg.metrics_enabled) == ("[::1]:9999", False)
    assert cfg.status_max_waiting_age_seconds == 120
    assert from_mapping({}).metrics_listen == "127.0.0.1:9465"
    for table, bad, key in (("metrics", {"port": 1}, "metrics.port"),
                            ("metrics", {"listen": "9465"}, "metrics.listen"),
                            ("metrics", {"listen": "::1:9465"}, "metrics.listen"),
                            ("metrics", {"listen": "host:99999"}, "metrics.listen"),
                            ("metrics", {"enabled": "yes"}, "metrics.enabled"),
                            ("status", {"max_age": 1}, "status.max_age"),
                            ("status", {"max_waiting_age_seconds": 0},
                             "status.max_waiting_age_seconds")):
        with pytest.raises(ConfigError) as info:
            from_mapping({table: bad})
        assert info.value.key == key


@pytest.mark.slow
def test_taken_port_and_exposed_address_are_logged_and_publishing_goes_on(
        make_sandbox: MakeSandbox) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        sandbox = make_sandbox("a", metrics={"listen": f"127.0.0.1:{port}"})
        write_fits(sandbox.mosaics / "m.fits")
        proc = start_daemon(sandbox)
        try:
            wait_for(lambda: (sandbox.products / "mosaics" / "m.fits").exists(), 30,
                     what="the publish")
            events = wait_for(lambda: [e for e in log_events(sandbox)
                                       if e.get("event") == "metrics_unavailable"], 10,
                              what="metrics_unavailable")
            assert events[0]["listen"] == f"127.0.0.1:{port}"
            assert proc.poll() is None
        finally:
            stop(proc)
    open_port = free_port()
    exposed = make_sandbox("b", metrics={"listen": f"0.0.0.0:{open_port}"})
    proc = start_daemon(exposed)
    try:
        wait_for(lambda: reachable(f"http://127.0.0.1:{open_port}/healthz"), 30,
                 what="the metrics server on 0.0.0.0")
        warned = [e for e in log_events(exposed) if e.get("event") == "metrics_exposed"]
        assert warned and warned[0]["level"] == "warning"
    finally:
        stop(proc)
    quiet = make_sandbox("c", metrics={"listen": f"127.0.0.1:{open_port}",
                                       "enabled": False})
    proc = start_daemon(quiet)
    try:
        wait_for(lambda: any(e.get("event") == "started" for e in log_events(quiet)), 30,
                 what="start")
        assert not reachable(f"http://127.0.0.1:{open_port}/healthz")
        assert not [e for e in log_events(quiet) if e.get("event", "").startswith("metrics_")]
    finally:
        stop(proc)


# --- `status` exit statuses -----------------------------------------------------------------

def _candidate(sandbox: Sandbox, data_id: str, n: int) -> Candidate:
    path = str(sandbox.mosaics / f"{data_id}.fits")
    return Candidate(data_id=data_id, data_type="mosaic", base_path=str(sandbox.stage),
                     stage_path=path, stage_path_bytes=os.fsencode(path),
                     identity=Identity(1, 1000 + n, 2880 * n, n, n), checksum=f"sha256:{n:064x}",
                     metadata={})


@pytest.fixture
def quiet_site(make_sandbox: MakeSandbox) -> Sandbox:
    """A registry with one fresh waiting product and one published; no daemon."""
    sandbox = make_sandbox(status={"max_waiting_age_seconds": 600})
    with Registry(sandbox.registry) as reg:
        reg.register(_candidate(sandbox, "fresh", 1))
        reg.register(_candidate(sandbox, "done", 2))
        reg.claim("tester", 60, data_id="done")
        reg.mark_published(Published("done", str(sandbox.products / "mosaics/done.fits"),
                                     "auto"), "tester")
    return sandbox


def test_status_exit_1_without_a_daemon(quiet_site: Sandbox) -> None:
    out = quiet_site.cli("status")
    assert out.returncode == 1, out.stdout + out.stderr
    assert "NEEDS ATTENTION" in out.stdout and "no daemon holds the lock" in out.stdout
    data = json.loads(quiet_site.cli("status", "--json").stdout)
    assert data["ok"] is False and len(data["problems"]) == 1
    assert "no daemon" in data["problems"][0]
    with lock.acquire(str(quiet_site.config().lock_path), "daemon"):
        out = quiet_site.cli("status")
        assert out.returncode == 0, out.stdout + out.stderr
        assert "ok: nothing needs an operator" in out.stdout
        data = json.loads(quiet_site.cli("status", "--json").stdout)
        assert data["ok"] is True and data["problems"] == []
    with lock.acquire(str(quiet_site.config().lock_path), "scan"):
        out = quiet_site.cli("status")
        assert out.returncode == 1 and "lock held by pid" in out.stdout


def test_status_exit_1_with_a_failed_product(quiet_site: Sandbox) -> None:
    cfg = quiet_site.config()
    with Registry(cfg.registry) as reg:
        reg.register(_candidate(quiet_site, "broken", 3))
        for _ in range(cfg.max_attempts):
            reg.claim("tester", 60, data_id="broken")
            reg.record_failure("broken", "tester", "no_space", "No space left on device",
                               cfg.max_attempts, 0, 0, cfg.error_max_chars)
        assert reg.get("broken").status == "failed"
    with lock.acquire(str(cfg.lock_path), "daemon"):
        out = quiet_site.cli("status")
        assert out.returncode == 1, out.stdout
        problems = out.stdout.split("NEEDS ATTENTION", 1)[1]
        assert "1 failed product wait" in problems and "no daemon" not in problems
        data = json.loads(quiet_site.cli("status", "--json").stdout)
        assert len(data["problems"]) == 1 and data["counts"]["failed"] == 1
        assert data["success_rate"]["last_hour"] == {"published": 1, "failures": 3,
                                                     "rate": 0.25}
        assert quiet_site.cli("retry", "--all-failed").returncode == 0
        assert quiet_site.cli("status").returncode == 0


def test_status_exit_1_when_the_oldest_waiting_is_too_old(quiet_site: Sandbox) -> None:
    cfg = quiet_site.config()
    with Registry(cfg.registry) as reg:
        reg.register(_candidate(quiet_site, "ancient", 4), now=time.time() - 7200)
    with lock.acquire(str(cfg.lock_path), "daemon"):
        out = quiet_site.cli("status")
        assert out.returncode == 1, out.stdout
        problems = out.stdout.split("NEEDS ATTENTION", 1)[1]
        assert "oldest waiting product ancient has waited 2h00m (limit 10m00s)" in problems
        assert "failed" not in problems and "no daemon" not in problems
        # A held product waits on purpose: it does not count.
        assert quiet_site.cli("hold", "ancient").returncode == 0
        assert quiet_site.cli("status").returncode == 0
        assert quiet_site.cli("release", "ancient").returncode == 0
        # The configured age decides.
        quiet_site.update(status={"max_waiting_age_seconds": 3 * 3600})
        assert quiet_site.cli("status").returncode == 0


def test_page_escapes_error_text_from_the_registry(make_sandbox: MakeSandbox) -> None:
    """Error texts come from exceptions and file contents: markup in them stays text."""
    from contimg_publisher import statuspage
    sandbox = make_sandbox()
    reason = 'bad header <img src=x onerror="alert(1)"> & </td></table><h2>Fake</h2>'
    path = sandbox.mosaics / "a&b\"<i>.fits"
    with Registry(sandbox.registry) as reg:
        reg.reject("a&b\"<i>", "mosaic", str(sandbox.stage), str(path), os.fsencode(path),
                   reason, None, 500)
        text = statuspage.render(statuspage.snapshot(reg))
    page = Page(text)
    assert not {"img", "i", "script"} & set(page.tags)
    assert "Fake" not in page.sections
    assert reason in page.sections["Rejected"]
    assert str(path) in page.sections["Rejected"]
    assert 'a&b"<i>' in page.sections["Rejected"]


def test_destination_that_is_not_a_folder_ends_in_failed(make_sandbox: MakeSandbox) -> None:
    port = free_port()
    sandbox = make_sandbox(metrics={"listen": f"127.0.0.1:{port}"},
                           publish={"max_attempts": 1})
    (sandbox.products / "mosaics").write_bytes(b"a file where a folder belongs\n")
    write_fits(sandbox.mosaics / "m.fits")
    # A products area that already holds something needs its registry made on purpose.
    sandbox.cli("migrate", check=True)
    proc = start_daemon(sandbox)
    try:
        wait_for(lambda: (r := rows(sandbox).get("m")) is not None and r.status == "failed",
                 8, what="the product to be failed after its one attempt")
    finally:
        stop(proc)
    attempts = [e for e in log_events(sandbox) if e.get("event") == "publish_failed"]
    assert len(attempts) == 1, f"{len(attempts)} publish_failed events for one attempt"
    assert attempts[0]["error_kind"] == "other"
    assert "destination" in attempts[0]["error"] and "not a folder" in attempts[0]["error"] \
        or "folder" in attempts[0]["error"], attempts[0]["error"]
    assert (sandbox.mosaics / "m.fits").exists(), "the staged file was kept"


def test_reload_results_are_counted_and_a_new_listen_address_applies(
        make_sandbox: MakeSandbox) -> None:
    port, new_port = free_port(), free_port()
    sandbox = make_sandbox(metrics={"listen": f"127.0.0.1:{port}"})
    proc = start_daemon(sandbox)

    def reloads(url: str) -> tuple[float, float, float]:
        samples = exported(fetch(f"{url}/metrics")[2].decode())
        return (value(samples, "contimg_publisher_config_reloads_total", result="ok"),
                value(samples, "contimg_publisher_config_reloads_total", result="failed"),
                value(samples, "contimg_publisher_config_last_reload_successful"))

    def events(name: str) -> int:
        return sum(e.get("event") == name for e in log_events(sandbox))

    try:
        url = f"http://127.0.0.1:{port}"
        wait_for(lambda: reachable(f"{url}/healthz"), 30, what="the metrics server")
        assert reloads(url) == (0, 0, 1)
        sandbox.update(publish={"max_attempts": -1})
        proc.send_signal(signal.SIGHUP)
        wait_for(lambda: events("reload_failed") == 1, 20, what="reload_failed")
        assert reloads(url) == (0, 1, 0)
        sandbox.update(publish={"max_attempts": 3},
                       metrics={"listen": f"127.0.0.1:{new_port}"})
        proc.send_signal(signal.SIGHUP)
        wait_for(lambda: events("reload_ok") == 1, 20, what="reload_ok")
        new_url = f"http://127.0.0.1:{new_port}"
        wait_for(lambda: reachable(f"{new_url}/healthz"), 20, what="the new address")
        assert reloads(new_url) == (1, 1, 1)
        assert not reachable(f"{url}/healthz")
    finally:
        stop(proc)
