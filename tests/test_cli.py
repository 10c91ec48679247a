"""The operator command, run as a real process against a real registry file."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys

import pytest

from contimg_publisher.registry import SCHEMA_VERSION, Candidate, Identity, Published, Registry
from tests.helpers import REPO, Sandbox


def _candidate(sandbox: Sandbox, data_id: str, n: int) -> Candidate:
    path = str(sandbox.mosaics / f"{data_id}.fits")
    return Candidate(data_id=data_id, data_type="mosaic", base_path=str(sandbox.stage),
                     stage_path=path, stage_path_bytes=os.fsencode(path),
                     identity=Identity(1, 1000 + n, 2880 * n, n, n), checksum=f"sha256:{n:064x}",
                     metadata={"OBJECT": f"obj{n}", "NIMAGES": n})


@pytest.fixture
def filled(make_sandbox):
    """Registry with one product in each status, made through the registry's own operations."""
    sandbox = make_sandbox()
    cfg = sandbox.config()
    with Registry(cfg.registry) as reg:
        for n, data_id in enumerate(["waiting", "done", "broken", "bad", "busy"], start=1):
            reg.register(_candidate(sandbox, data_id, n))
        reg.claim("tester", 60, data_id="done")
        reg.mark_published(Published("done", str(sandbox.products / "mosaics/done.fits"),
                                     "auto"), "tester")
        for _ in range(cfg.max_attempts):
            reg.claim("tester", 60, data_id="broken")
            reg.record_failure("broken", "tester", "no_space", "No space left on device",
                               cfg.max_attempts, 1, 10, cfg.error_max_chars)
        reg.reject("bad", "mosaic", str(sandbox.stage), str(sandbox.mosaics / "bad.fits"),
                   os.fsencode(str(sandbox.mosaics / "bad.fits")), "invalid FITS: truncated",
                   None, cfg.error_max_chars)
        reg.claim("tester", 60, data_id="busy")
    return sandbox


def test_status_json_counts_every_status(filled):
    out = filled.cli("status", "--json")
    assert out.returncode == 1, "a failed product and no daemon need an operator"
    data = json.loads(out.stdout)
    assert data["counts"] == {"staging": 1, "publishing": 1, "published": 1, "failed": 1,
                              "rejected": 1}
    assert data["oldest_waiting"]["data_id"] == "waiting"
    assert data["failures_last_hour"] == 3
    assert data["daemon_running"] is False
    assert data["last_published"]["data_id"] == "done"


def test_status_text_is_readable(filled):
    proc = filled.cli("status")
    assert proc.returncode == 1
    out = proc.stdout
    assert "1 staging, 1 publishing, 1 published, 1 failed, 1 rejected" in out
    assert "oldest waiting  waiting" in out
    assert "not running" in out


def test_list_json_objects_carry_the_stable_fields(filled):
    rows = json.loads(filled.cli("list", "--json", check=True).stdout)
    assert {r["data_id"] for r in rows} == {"waiting", "done", "broken", "bad", "busy"}
    for row in rows:
        for key in ("data_id", "data_type", "status", "stage_path", "published_path",
                    "publish_attempts", "publish_error", "size_bytes", "checksum", "metadata"):
            assert key in row, key
        assert isinstance(row["metadata"], dict)
    by_id = {r["data_id"]: r for r in rows}
    assert by_id["done"]["published_path"].endswith("mosaics/done.fits")
    assert by_id["bad"]["publish_error"] == "invalid FITS: truncated"
    assert by_id["waiting"]["metadata"] == {"NIMAGES": 1, "OBJECT": "obj1"}


@pytest.mark.slow
def test_list_filters_and_limit(filled):
    failed = json.loads(filled.cli("list", "--status", "failed", "--json", check=True).stdout)
    assert [r["data_id"] for r in failed] == ["broken"]
    assert json.loads(filled.cli("list", "--type", "image", "--json", check=True).stdout) == []
    assert len(json.loads(filled.cli("list", "--limit", "2", "--json", check=True).stdout)) == 2
    table = filled.cli("list", check=True).stdout.splitlines()
    assert table[0].split()[:3] == ["DATA_ID", "TYPE", "STATUS"]
    assert len(table) == 6


def test_show_includes_failure_history(filled):
    data = json.loads(filled.cli("show", "broken", "--json", check=True).stdout)
    assert data["status"] == "failed"
    assert data["publish_attempts"] == 3
    assert [f["attempt"] for f in data["failures"]] == [1, 2, 3]
    assert {f["kind"] for f in data["failures"]} == {"no_space"}
    text = filled.cli("show", "broken", check=True).stdout
    assert "failure history" in text and "no_space" in text
    missing = filled.cli("show", "nope")
    assert missing.returncode == 1 and "nope" in missing.stderr


@pytest.mark.slow
def test_retry_hold_release(filled):
    out = filled.cli("retry", "broken")
    assert out.returncode == 0, out.stderr
    row = filled.row("broken")
    assert row["status"] == "staging" and row["publish_attempts"] == 0
    assert len(row["failures"]) == 3  # history survives
    assert filled.cli("retry", "nope").returncode == 1
    assert filled.cli("retry").returncode == 2
    assert filled.cli("hold", "waiting").returncode == 0
    assert filled.row("waiting")["held"] is True
    assert filled.cli("release", "waiting").returncode == 0
    assert filled.row("waiting")["held"] is False
    assert filled.cli("hold", "nope").returncode == 1


def test_retry_all_failed(filled):
    assert filled.cli("retry", "--all-failed").returncode == 0
    assert json.loads(filled.cli("status", "--json").stdout)["counts"]["failed"] == 0


def test_migrate_twice_reports_nothing_to_do(make_sandbox):
    sandbox = make_sandbox()
    first = sandbox.cli("migrate", check=True).stdout
    assert f"migrated from schema version 0 to {SCHEMA_VERSION}" in first
    second = sandbox.cli("migrate", check=True).stdout
    assert f"already at schema version {SCHEMA_VERSION}" in second


def test_read_commands_do_not_migrate_an_older_file(make_sandbox):
    sandbox = make_sandbox()
    sandbox.registry.parent.mkdir(parents=True)
    import sqlite3
    with sqlite3.connect(sandbox.registry) as db:
        from contimg_publisher.registry import LEGACY_DDL
        db.executescript(LEGACY_DDL)
    out = sandbox.cli("status")
    assert out.returncode == 1
    assert "run `contimg-publisher migrate`" in out.stderr
    with sqlite3.connect(sandbox.registry) as db:
        assert db.execute("PRAGMA user_version").fetchone()[0] == 0


def test_a_read_command_waits_for_a_migration_in_progress(make_sandbox):
    """A daemon's first start migrates step by step while an operator's `list` opens the
    file: the command waits for the steps (the version moves) instead of refusing."""
    import sqlite3
    import time

    from contimg_publisher.registry import LEGACY_DDL
    sandbox = make_sandbox()
    sandbox.registry.parent.mkdir(parents=True)
    with sqlite3.connect(sandbox.registry) as db:
        db.executescript(LEGACY_DDL)
    proc = subprocess.Popen([sys.executable, "-m", "contimg_publisher", "--config",
                             str(sandbox.config_path), "list", "--json"], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    fds = f"/proc/{proc.pid}/fd"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and proc.poll() is None:
        with contextlib.suppress(OSError):
            if any(os.readlink(os.path.join(fds, fd)) == str(sandbox.registry)
                   for fd in os.listdir(fds)):
                break
        time.sleep(0.005)
    Registry(sandbox.registry).close()  # what the daemon's start does: every step
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    assert json.loads(out) == []


def test_check_config_prints_effective_values(make_sandbox):
    sandbox = make_sandbox()
    out = sandbox.cli("check-config", check=True).stdout
    assert "valid" in out.splitlines()[0]
    assert f'stage_root = "{sandbox.stage}"' in out
    assert "max_attempts = 3" in out


def test_bad_config_exit_2_one_line(make_sandbox):
    sandbox = make_sandbox()
    sandbox.update(publish={"max_attempts": -1})
    out = sandbox.cli("status")
    assert out.returncode == 2
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1
    assert str(sandbox.config_path) in lines[0] and "publish.max_attempts" in lines[0]


def test_bad_usage_exit_2(make_sandbox):
    sandbox = make_sandbox()
    assert sandbox.cli("frobnicate").returncode == 2
    assert sandbox.cli("list", "--status", "bogus").returncode == 2
    assert sandbox.cli("list", "--limit", "-1").returncode == 2


def test_console_script_and_module_agree(make_sandbox, console_script):
    sandbox = make_sandbox()
    a = subprocess.run([console_script, "--config", str(sandbox.config_path), "status", "--json"],
                       capture_output=True, text=True, cwd=REPO)
    b = sandbox.cli("status", "--json")
    assert a.returncode == b.returncode == 1  # no daemon holds the lock
    assert json.loads(a.stdout)["counts"] == json.loads(b.stdout)["counts"]


def test_config_from_environment(make_sandbox):
    sandbox = make_sandbox()
    env = dict(os.environ, CONTIMG_PUBLISHER_CONFIG=str(sandbox.config_path))
    out = subprocess.run([sys.executable, "-m", "contimg_publisher", "check-config"],
                         capture_output=True, text=True, env=env, cwd=REPO)
    assert out.returncode == 0, out.stderr
    assert str(sandbox.config_path) in out.stdout


@pytest.mark.slow
def test_retry_of_a_product_registered_under_another_stage_root_is_refused(tmp_path, make_sandbox):
    """stage_root A -> B leaves A's waiting product `failed`, naming the change; `retry`
    must not make it wait again where nothing looks at it: it is refused with both roots
    and what to do, and the row keeps its operator state. Under B, retry works as ever."""
    from tests.helpers import write_fits
    from tests.test_publish import register_only

    sandbox = make_sandbox()
    root_a, root_b = sandbox.stage, tmp_path / "stage-b"
    (root_b / "mosaics").mkdir(parents=True)
    write_fits(root_a / "mosaics" / "in_a.fits", seed=1)
    assert register_only(sandbox) == ["in_a"]
    sandbox.cli("hold", "in_a", check=True)
    sandbox.update(paths={"stage_root": str(root_b)})
    sandbox.cli("scan", check=True)
    parked = sandbox.row("in_a")
    assert parked["status"] == "failed" and f"stage_root is now {root_b}" in \
        parked["publish_error"]
    cfg = sandbox.config()
    with Registry(cfg.registry) as reg:  # a product that failed under B, the current root
        path = str(root_b / "mosaics" / "in_b.fits")
        reg.register(Candidate(data_id="in_b", data_type="mosaic", base_path=str(root_b),
                               stage_path=path, stage_path_bytes=os.fsencode(path),
                               identity=Identity(1, 7, 2880, 1, 1), checksum="sha256:" + "0" * 64,
                               metadata={}))
        for _ in range(cfg.max_attempts):
            reg.claim("tester", 60, data_id="in_b")
            reg.record_failure("in_b", "tester", "no_space", "No space left on device",
                               cfg.max_attempts, 1, 10, cfg.error_max_chars)

    out = sandbox.cli("retry", "in_a")
    assert out.returncode == 1, out.stdout + out.stderr
    assert "in_a: not retried" in out.stderr
    assert str(root_a) in out.stderr and str(root_b) in out.stderr, out.stderr
    assert "stage_root" in out.stderr and "Move the file" in out.stderr
    assert "due again" not in out.stdout
    row = sandbox.row("in_a")
    assert (row["status"], row["publish_error"]) == ("failed", parked["publish_error"])
    assert len(row["failures"]) == len(parked["failures"])

    every = sandbox.cli("retry", "--all-failed")
    assert every.returncode == 1, every.stdout + every.stderr
    assert every.stdout.strip() == "in_b: due again"
    assert "in_a: not retried" in every.stderr
    assert sandbox.row("in_a")["status"] == "failed"
    assert sandbox.row("in_b")["status"] == "staging"

    sandbox.update(paths={"stage_root": str(root_a)})  # the root set back: retry works
    back = sandbox.cli("retry", "in_a")
    assert back.returncode == 0 and back.stdout.strip() == "in_a: due again", back.stderr
    assert sandbox.row("in_a")["status"] == "staging"


@pytest.mark.slow
def test_a_publish_after_failures_resets_the_legacy_columns_and_show_keeps_them(make_sandbox):
    """Fail, fail, then succeed: the legacy columns read as after the legacy code's success
    (publish_attempts 0, publish_error NULL), and `show` still lists both failures."""
    import sqlite3

    from tests.helpers import write_fits
    sandbox = make_sandbox()
    data = write_fits(sandbox.mosaics / "m.fits")
    sandbox.cli("migrate", check=True)
    (sandbox.products / "mosaics").write_text("a file where the folder goes")
    assert sandbox.cli("scan").returncode == 1
    assert sandbox.cli("publish", "m").returncode == 1
    failing = sandbox.row("m")
    assert (failing["status"], failing["publish_attempts"]) == ("staging", 2)
    assert "not a folder" in failing["publish_error"]

    (sandbox.products / "mosaics").unlink()
    sandbox.cli("publish", "m", check=True)
    assert (sandbox.products / "mosaics" / "m.fits").read_bytes() == data
    with sqlite3.connect(sandbox.registry) as db:
        legacy = db.execute("SELECT status, publish_attempts, publish_error FROM data_registry"
                            " WHERE data_id = 'm'").fetchone()
    assert legacy == ("published", 0, None)
    shown = sandbox.row("m")
    assert (shown["publish_attempts"], shown["publish_error"]) == (0, None)
    assert [(f["attempt"], f["kind"]) for f in shown["failures"]] == [(1, "other"),
                                                                      (2, "other")]
    assert all("not a folder" in f["error"] for f in shown["failures"])
    text = sandbox.cli("show", "m", check=True).stdout
    assert "  attempts    0\n" in text and "  last error  -" in text
    history = text.split("failure history:\n", 1)[1].splitlines()[1:]
    assert [line.split()[2:4] for line in history] == [["1", "other"], ["2", "other"]]


@pytest.mark.slow
def test_five_publish_commands_at_once_publish_one_product_once(make_sandbox):
    """Five `publish DATA_ID` processes started together on one product: exactly one
    publishes it, the others say it is published; one copy, no version, no failure."""
    from tests.helpers import PYTHON, write_fits
    from tests.test_publish import register_only
    sandbox = make_sandbox(publish={"lock_wait_seconds": 120})
    data = write_fits(sandbox.mosaics / "m.fits", seed=5)
    assert register_only(sandbox) == ["m"]
    env = {k: v for k, v in os.environ.items() if k not in ("NOTIFY_SOCKET", "WATCHDOG_USEC")}
    assert sandbox.row("m")["status"] == "staging"
    procs = [subprocess.Popen([PYTHON, "-m", "contimg_publisher", "--config",
                               str(sandbox.config_path), "publish", "m"], cwd=REPO, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(5)]
    outputs = [p.communicate(timeout=300) for p in procs]
    codes = [p.returncode for p in procs]
    assert sorted(codes) == [0, 1, 1, 1, 1], outputs
    for code, (out, err) in zip(codes, outputs, strict=True):
        if code:
            assert "already published" in err + out, (out, err)
    assert [p.name for p in (sandbox.products / "mosaics").iterdir()] == ["m.fits"]
    assert (sandbox.products / "mosaics" / "m.fits").read_bytes() == data
    row = sandbox.row("m")
    assert (row["status"], row["publish_attempts"], row["failures"]) == ("published", 0, [])


def test_a_row_whose_staged_path_climbs_out_of_staging_is_never_published(tmp_path, make_sandbox):
    """A row another writer registered at `<stage>/mosaics/../../secret.fits` (a file that
    exists, outside the staging area): neither `scan` nor `publish` copies a byte of it;
    a `..` inside a name (`nightly..v1.fits`) is an ordinary name and publishes."""
    import sqlite3
    import time

    from tests.helpers import write_fits
    sandbox = make_sandbox()
    secret = tmp_path / "secret.fits"
    secret_bytes = write_fits(secret, seed=9)
    dotted = write_fits(sandbox.mosaics / "nightly..v1.fits", seed=10)
    sandbox.cli("migrate", check=True)
    climbing = str(sandbox.mosaics / ".." / ".." / "secret.fits")
    with sqlite3.connect(sandbox.registry) as db:
        db.execute("INSERT INTO data_registry (data_type, data_id, base_path, status,"
                   " stage_path, created_at, staged_at) VALUES ('mosaic', 'climber', ?,"
                   " 'staging', ?, ?, ?)", (str(sandbox.stage), climbing, time.time(),
                                             time.time()))
    sandbox.cli("scan", check=True)
    refused = sandbox.cli("publish", "climber")
    assert refused.returncode == 1 and "climber" in refused.stderr, refused.stderr
    archived = {p.read_bytes() for p in sandbox.products.rglob("*") if p.is_file()}
    assert archived == {dotted}
    assert secret.read_bytes() == secret_bytes
    assert (sandbox.products / "mosaics" / "nightly..v1.fits").read_bytes() == dotted
    row = sandbox.row("climber")
    assert row["status"] == "staging" and row["published_path"] is None and not row["owned"]
