"""Log formats outside journald: what an operator reads on a terminal or ships as JSON.

Each case runs in a fresh interpreter, so structlog's global set-up is the one under test.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from tests.helpers import REPO

SNIPPET = """
import sys
from contimg_publisher import logs
fmt = logs.configure(level=sys.argv[1], fmt=sys.argv[2], error_max_chars=20)
print(fmt, flush=True)
log = logs.get_logger()
log.debug("hidden_below_level", data_id="d0")
log.warning("publish_failed", data_id="m1", error_kind="no_space", error="x" * 100,
            stage_path="/stage/a\\nb.fits")
"""


def run(level: str, fmt: str, env: dict[str, str] | None = None,
        stderr_path: Path | None = None) -> tuple[str, str]:
    full_env = {k: v for k, v in os.environ.items() if k != "JOURNAL_STREAM"}
    full_env.update(env or {})
    if stderr_path is None:
        proc = subprocess.run([sys.executable, "-c", SNIPPET, level, fmt], capture_output=True,
                              text=True, env=full_env, cwd=REPO, timeout=60, check=True)
        return proc.stdout.strip(), proc.stderr
    with open(stderr_path, "w") as err:
        proc = subprocess.run([sys.executable, "-c", SNIPPET, level, fmt], stdout=subprocess.PIPE,
                              stderr=err, text=True, env=full_env, cwd=REPO, timeout=60,
                              check=True)
    return proc.stdout.strip(), stderr_path.read_text()


def test_json_lines_carry_every_field():
    fmt, err = run("info", "json")
    assert fmt == "json"
    [line] = err.splitlines()
    event = json.loads(line)
    assert event["event"] == "publish_failed"
    assert event["level"] == "warning"
    assert event["data_id"] == "m1" and event["error_kind"] == "no_space"
    assert event["stage_path"] == "/stage/a\nb.fits"
    assert event["error"] == "x" * 19 + "…"  # error_max_chars=20
    assert "timestamp" in event


def test_console_lines_are_one_per_event_and_respect_the_level():
    fmt, err = run("info", "console")
    assert fmt == "console"
    lines = err.splitlines()
    assert len(lines) == 1, lines  # the newline in the path is escaped, not a line break
    assert "publish_failed" in lines[0] and "data_id=m1" in lines[0]
    assert "error=" + "x" * 19 + "…" in lines[0] and "x" * 20 not in lines[0]
    assert "hidden_below_level" not in err
    _, debug_err = run("debug", "console")
    assert "hidden_below_level" in debug_err


def test_auto_picks_journal_only_when_stderr_is_the_journal_stream(tmp_path):
    fmt, _ = run("info", "auto")
    assert fmt == "console"
    err_file = tmp_path / "stderr"
    err_file.touch()
    st = err_file.stat()
    # The stream systemd would have connected: JOURNAL_STREAM names stderr's device:inode.
    fmt, _ = run("info", "auto", env={"JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino}"},
                 stderr_path=err_file)
    assert fmt == "journal"
    fmt, _ = run("info", "auto", env={"JOURNAL_STREAM": "1:2"}, stderr_path=err_file)
    assert fmt == "console"
