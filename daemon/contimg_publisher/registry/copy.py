"""Moving a site: an SQLite registry copied into an empty PostgreSQL one, every row and
value as it is (legacy columns, ids, times, byte paths), in one transaction.

The SQLite file is opened read-only and left as it was; a file at an older schema is
copied as it is (columns it lacks stay NULL, as the SQLite migration would leave them).
Its products belong to the node whose staging area they were registered from: `node`,
which is also the node of its outbox events and quarantine records. The outbox keeps its
ids and each sink its cursor, so a sink resumes on the server exactly where it stood; the
audit's findings and progress come along, audit_state's untyped values as JSON of the same
Python value.
"""

from __future__ import annotations

import itertools
import os
from dataclasses import dataclass

import apsw
from psycopg.types.json import Jsonb

from contimg_publisher.registry.model import RegistryError
from contimg_publisher.registry.postgres import PostgresRegistry
from contimg_publisher.registry.schema import TABLES

# The tables a node's rows carry `node` in.
NODE_TABLES = ("data_registry", "unclaimed_files", "publish_log", "outbox", "quarantine_log")
# Columns SQLite leaves untyped that the server keeps as JSONB.
JSON_COLUMNS = {("audit_state", "value")}
BATCH = 1000


@dataclass(frozen=True)
class Copied:
    table: str
    rows: int
    columns: tuple[str, ...]
    left_out: tuple[str, ...]  # columns of the file the server's table has no place for


def _sqlite_columns(conn: apsw.Connection, table: str) -> list[str]:
    return [row[1] for row in conn.execute(f"PRAGMA table_info({table})")]


def copy_sqlite(path: str | os.PathLike[str], target: PostgresRegistry, node: str
                ) -> list[Copied]:
    """Copy the registry file at `path` into `target` (migrated, with no products yet).
    RegistryError when the file cannot be read or the server's registry is not empty."""
    path = os.fspath(path)
    try:
        source = apsw.Connection(path, flags=apsw.SQLITE_OPEN_READONLY)
    except apsw.Error as exc:
        raise RegistryError(f"registry {path}: cannot open it to copy ({exc})") from None
    out: list[Copied] = []
    try:
        present = {r[0] for r in source.execute(
            "SELECT name FROM sqlite_master WHERE type = 'table'")}
        if "data_registry" not in present:
            raise RegistryError(f"registry {path}: has no data_registry table to copy")
        with target.write() as conn:
            if conn.execute("SELECT EXISTS (SELECT 1 FROM data_registry) AS there"
                            ).fetchone() == {"there": True}:
                raise RegistryError(
                    f"registry {target.location}: already holds products; a site is copied "
                    "into an empty registry only")
            for table in TABLES:
                if table not in present:
                    continue
                have = _sqlite_columns(source, table)
                server = [r["column_name"] for r in conn.execute(
                    "SELECT column_name FROM information_schema.columns"
                    " WHERE table_name = %s AND table_schema = current_schema()", (table,))]
                columns = [c for c in have if c in server and c != "node"]
                with_node = table in NODE_TABLES
                names = columns + (["node"] if with_node else [])
                sql = (f"INSERT INTO {table} ({', '.join(names)}) VALUES"
                       f" ({', '.join(['%s'] * len(names))})")
                rows = 0
                as_json = [i for i, c in enumerate(columns) if (table, c) in JSON_COLUMNS]
                cursor = source.execute(f"SELECT {', '.join(columns)} FROM {table} ORDER BY 1")
                with conn.cursor() as cur:
                    while batch := list(itertools.islice(cursor, BATCH)):
                        values = [list(row) + ([node] if with_node else []) for row in batch]
                        for row in values:
                            for i in as_json:
                                row[i] = None if row[i] is None else Jsonb(row[i])
                        cur.executemany(sql, [tuple(row) for row in values])
                        rows += len(batch)
                if "id" in columns:
                    conn.execute(f"SELECT setval(pg_get_serial_sequence('{table}', 'id'),"
                                 f" GREATEST((SELECT MAX(id) FROM {table}), 1))")
                out.append(Copied(table, rows, tuple(columns),
                                  tuple(c for c in have if c not in server)))
    finally:
        source.close()
    return out
