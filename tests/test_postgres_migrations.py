"""The PostgreSQL schema, step by step (postgres.MIGRATIONS): each step recorded in
contimg_schema as it is applied, a database left at any older version brought forward
with its rows kept, to the very schema a new database gets, and two nodes starting at
once applying each step once. Read from the server's catalogue, not from the program.
"""

from __future__ import annotations

import threading

import pytest

from contimg_publisher.registry.postgres import MIGRATIONS, SCHEMA_VERSION, PostgresRegistry
from tests.pg import DATABASE, Server

LEGACY_ROW = ("INSERT INTO data_registry (data_type, data_id, base_path, status, stage_path,"
              " published_path, created_at, staged_at, published_at, metadata_json) VALUES"
              " ('mosaic', 'old_1', '/stage', 'published', '/stage/mosaics/old_1.fits',"
              " '/products/mosaics/old_1.fits', 1.0, 2.0, 3.0, '{\"legacy\": 1}'),"
              " ('mosaic', 'old_2', '/stage', 'staging', '/stage/mosaics/old_2.fits',"
              " NULL, 4.0, 5.0, NULL, NULL)")


def _schema(server: Server, database: str = DATABASE) -> dict[str, list[str]]:
    """Every column (with its type and default) and every index, as the server has them."""
    columns = server.psql(
        "SELECT table_name || '.' || column_name || ' ' || data_type || ' '"
        " || COALESCE(column_default, '-') || ' ' || is_nullable FROM information_schema.columns"
        " WHERE table_schema = 'public' ORDER BY 1", database)
    indexes = server.psql("SELECT indexdef FROM pg_indexes WHERE schemaname = 'public'"
                          " ORDER BY indexname", database)
    return {"columns": columns.splitlines(), "indexes": indexes.splitlines()}


@pytest.mark.slow
def test_steps_are_ordered_and_each_is_recorded(pg_server: Server) -> None:
    assert [v for v, _ in MIGRATIONS] == list(range(1, SCHEMA_VERSION + 1))
    with PostgresRegistry(pg_server.uri, migrate=False) as reg:
        assert reg.version() == 0
        assert reg.migrate(to=3) == [1, 2, 3]
        assert pg_server.psql("SELECT version FROM contimg_schema") == "3"
        assert reg.migrate() == list(range(4, SCHEMA_VERSION + 1))
        assert pg_server.psql("SELECT version, application FROM contimg_schema") == \
            f"{SCHEMA_VERSION}|contimg-publisher"
        assert reg.migrate() == []


@pytest.mark.slow
@pytest.mark.parametrize("older", sorted({1, 2, 5, SCHEMA_VERSION - 1}))
def test_a_database_at_an_older_version_is_brought_forward_and_keeps_its_rows(
        pg_server: Server, older: int) -> None:
    with PostgresRegistry(pg_server.uri, migrate=False) as reg:
        assert reg.migrate(to=older) == list(range(1, older + 1))
    pg_server.psql(LEGACY_ROW)
    if older >= 2:  # described and published by this program: it has a checksum
        pg_server.psql("UPDATE data_registry SET checksum = 'sha256:' || repeat('ab', 32),"
                       " size_bytes = 2880, node = 'node-a' WHERE data_id = 'old_1'")
    before = pg_server.psql("SELECT id, data_id, status, stage_path, published_path,"
                            " created_at, staged_at, metadata_json FROM data_registry"
                            " ORDER BY id")
    # What a daemon does at start: open, which migrates.
    with PostgresRegistry(pg_server.uri, node="node-a") as reg:
        assert reg.version() == SCHEMA_VERSION
        assert reg.migrate() == []
        assert reg.get("old_2") is not None and reg.get("old_2").status == "staging"
    assert pg_server.psql("SELECT version FROM contimg_schema") == str(SCHEMA_VERSION)
    assert pg_server.psql("SELECT id, data_id, status, stage_path, published_path,"
                          " created_at, staged_at, metadata_json FROM data_registry"
                          " ORDER BY id") == before
    # Version 6 records what was already published by this program (with its checksum);
    # a row that gained its checksum after step 6 is not this program's publish.
    assert pg_server.psql("SELECT data_id, published_path, node FROM publish_log") == (
        "old_1|/products/mosaics/old_1.fits|node-a" if 2 <= older < 6 else "")
    # The same schema as a database made at once.
    pg_server.psql("CREATE DATABASE fresh")
    PostgresRegistry(pg_server.uri.replace(f"/{DATABASE}?", "/fresh?")).close()
    assert _schema(pg_server) == _schema(pg_server, "fresh")


def test_two_nodes_starting_at_once_apply_each_step_once(pg_server: Server) -> None:
    applied: list[list[int]] = []
    errors: list[BaseException] = []

    def start(node: str) -> None:
        try:
            with PostgresRegistry(pg_server.uri, node=node, migrate=False) as reg:
                applied.append(reg.migrate())
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=start, args=(f"node-{n}",)) for n in "ab"]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors, errors
    assert sorted(v for steps in applied for v in steps) == list(range(1, SCHEMA_VERSION + 1))
    assert pg_server.psql("SELECT version FROM contimg_schema") == str(SCHEMA_VERSION)
