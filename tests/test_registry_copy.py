"""Moving a site: `migrate --from FILE` copies an SQLite registry (legacy rows of every
status, this program's rows, their failure history and publish log, the outbox with each
sink's place in it, the audit's findings and progress, the quarantine log) into a real
PostgreSQL server, and every row and value is found there as it was; the file is left
byte for byte unchanged."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import apsw
import psycopg
import pytest
from psycopg.rows import dict_row

from contimg_publisher.registry import Finding, Published, Quarantined, Registry, open_registry
from contimg_publisher.states import FailureKind
from tests.helpers import MakeSandbox
from tests.pg import Server
from tests.test_registry import _build_legacy, candidate

TABLES = ("data_registry", "data_relationships", "data_tags", "publish_failures",
          "unclaimed_files", "publish_log", "outbox", "outbox_sinks", "outbox_deliveries",
          "audit_findings", "audit_state", "quarantine_log")


def _sqlite_rows(path: Path, table: str) -> list[dict[str, Any]]:
    conn = apsw.Connection(str(path), flags=apsw.SQLITE_OPEN_READONLY)
    try:
        cur = conn.execute(f"SELECT * FROM {table} ORDER BY 1")
        try:
            names = [d[0] for d in cur.getdescription()]
        except apsw.ExecutionCompleteError:
            return []
        return [dict(zip(names, row, strict=True)) for row in cur]
    finally:
        conn.close()


@pytest.mark.slow
def test_migrate_from_copies_every_row_and_value(tmp_path: Path, make_sandbox: MakeSandbox,
                                                 pg_server: Server) -> None:
    source = tmp_path / "site" / "data_registry.db"
    _build_legacy(source, with_optional=True)
    with Registry(source) as reg:  # this program's own rows and history on top
        assert reg.add_sinks(["webhook", "command"], now=10.5) == ["webhook", "command"]
        reg.register(candidate(1))
        reg.register(candidate(2))
        (one, two) = reg.claim("host:1:1:1", 600, limit=2)
        assert reg.mark_published(Published(one.data_id, "/p/m1.fits", "auto", ("a.png",),
                                            supersedes="legacy_001_publishing"), "host:1:1:1")
        reg.record_failure(two.data_id, "host:1:1:1", FailureKind.NO_SPACE, "disk full é",
                           3, 60, 3600, 500)
        reg.replace_unclaimed([("/stage/mosaics/x.txt", b"/stage/mosaics/x.txt",
                                "matches no product rule", 1.5, 12)])
        reg.conn.execute("INSERT INTO data_tags (data_id, tag) VALUES ('legacy_000_staging',"
                         " 'nightly')")
        (event,) = reg.events_for(one.data_id)
        assert reg.record_delivered("webhook", event.seq, now=20.25) == 1
        assert reg.record_delivery_failure("command", event.seq, "exit status 1", 500,
                                           now=21.0) == (1, False)
        reg.observe_findings([Finding("missing", "/p/gone.fits", "its folder is gone", "g"),
                              Finding("dark_file", "/p/stray.fits", "no row records it")],
                             now=30.0, state={"pass_started": 29.5, "cursor": 3})
        reg.observe_findings([Finding("missing", "/p/gone.fits", "still gone", "g")],
                             now=31.5)  # seen again by the next pass; the stray was not
        reg.resolve_findings(31.0, now=32.0, state={"last_pass_bytes": 4096,
                                                     "pass_started": None, "note": "é"})
        reg.record_quarantine(Quarantined("unclaimed", None, "/stage/mosaics/y.txt",
                                          "/q/x.txt", "stale", 12, "rename", 40.5),
                              b"/stage/mosaics/y.txt")
    before = source.read_bytes()
    expected = {table: _sqlite_rows(source, table) for table in TABLES}
    assert len(expected["data_registry"]) == 18 and expected["publish_failures"]
    assert all(expected[t] for t in TABLES)  # each has rows to copy

    box = make_sandbox("box", paths={"registry": pg_server.uri,
                                     "lock_file": str(tmp_path / "l.lock")},
                       node={"name": "node-old"})
    out = box.cli("migrate", "--from", str(source))
    assert out.returncode == 0, out.stderr
    assert "data_registry: 18 rows copied" in out.stdout
    assert source.read_bytes() == before, "the SQLite file was changed"

    with psycopg.connect(pg_server.uri, row_factory=dict_row) as conn:
        for table, rows in expected.items():
            got = conn.execute(f"SELECT * FROM {table} ORDER BY 1").fetchall()
            assert len(got) == len(rows), table
            for want, have in zip(rows, got, strict=True):
                for column, value in want.items():
                    assert have[column] == value, (table, want.get("id"), column)
                    assert type(have[column]) is type(value) or value is None or \
                        isinstance(value, int | float) and isinstance(have[column], int | float)
                if "node" in have:
                    assert have["node"] == "node-old"
        next_id = conn.execute("INSERT INTO data_tags (data_id, tag) VALUES ('x', 'y')"
                               " RETURNING id").fetchone()
        assert next_id is not None and next_id["id"] > max(r["id"] for r in expected["data_tags"])

    # The copy is a working registry: each sink resumes where it stood, the audit too.
    with open_registry(pg_server.uri, node="node-old") as reg:
        assert reg.outbox_head("webhook") is None
        head = reg.outbox_head("command")
        assert head is not None and head.event_id == event.event_id
        assert head.payload == event.payload
        (command,) = reg.sink_states(["command"])
        assert (command.attempts, command.last_error) == (1, "exit status 1")
        assert [f.path for f in reg.findings()] == ["/p/gone.fits"]
        assert reg.audit_state() == {"pass_started": None, "cursor": 3,
                                     "last_pass_bytes": 4096, "note": "é"}
        assert [q.quarantine_path for q in reg.quarantined()] == ["/q/x.txt"]
    # The node's rows are its own.
    status = box.cli("list", "--json", "--limit", "0")
    assert status.returncode == 0, status.stderr
    again = box.cli("migrate", "--from", str(source))
    assert again.returncode == 1 and "already holds products" in again.stderr
    assert os.path.exists(source)
