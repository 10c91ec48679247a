"""The SQL of `[products.record]`: the pipeline's own record of each product, a row of a
table of its own in the registry database, read by the QA gate and pointed at the archive by
the publish (qa.Record says what is configured).

Pure builders shared by both backends (no connection): the gate's CASE branches over a
data_registry row, and the UPDATE the publish's commit makes. Every identifier is checked
against config.SQL_IDENTIFIER again here and double-quoted (standard SQL: SQLite and
PostgreSQL alike); every value is an SQL literal. Rows outside `data_registry` are matched
by the row's `stage_path`, qualified, so a record table's own column of that name is never
taken for it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from contimg_publisher.config import SQL_IDENTIFIER
from contimg_publisher.qa import Record

# What a backend found of a record's table: its columns, or None when it does not exist.
Found = Mapping[str, frozenset[str] | None]


def ident(name: str) -> str:
    """A quoted SQL identifier; ValueError for anything but a plain identifier."""
    if not SQL_IDENTIFIER.fullmatch(name):
        raise ValueError(f"not an SQL identifier: {name!r}")
    return f'"{name}"'


def literal(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


def problems(records: Sequence[Record], found: Found, own_tables: Sequence[str]
             ) -> list[str]:
    """What makes a record unusable whatever the pipeline does next: a table of this
    program's own, or a table that exists without a column the rule names. A table that
    does not exist yet is not one (its products wait; see gate_whens)."""
    out = []
    for r in records:
        if r.table.lower() in (t.lower() for t in own_tables):
            out.append(f"[products.record] of type {r.data_type!r}: table {r.table!r} is one "
                       "of this program's own tables, not the pipeline's record")
            continue
        columns = found.get(r.table)
        if columns is None:
            continue
        lost = [c for c in r.columns if c not in columns]
        if lost:
            out.append(f"[products.record] of type {r.data_type!r}: table {r.table!r} has no "
                       f"column {', '.join(map(repr, lost))} (it has: "
                       f"{', '.join(sorted(columns))})")
    return out


def _row(r: Record, column: str) -> str:
    """The record's `column` for the data_registry row at hand (NULL: no record)."""
    t = ident(r.table)
    return (f"(SELECT {t}.{ident(column)} FROM {t}"
            f" WHERE {t}.{ident(r.path_column)} = data_registry.stage_path LIMIT 1)")


def _exists(r: Record, where: str = "") -> str:
    t = ident(r.table)
    return (f"EXISTS (SELECT 1 FROM {t} WHERE {t}.{ident(r.path_column)}"
            f" = data_registry.stage_path{where})")


def _values(values: Sequence[str]) -> str:
    return ", ".join(literal(v) for v in values)


def gate_whens(r: Record, found: Found, quote: str) -> list[str]:
    """CASE branches (WHEN ... THEN reason) over a data_registry row for one record: the
    reason the row waits or is held, naming the table, the column and the value.
    Explicit holds first, then a missing record, then what is required."""
    is_type = f"data_type = {literal(r.data_type)}"
    columns = found.get(r.table)
    if columns is None:
        return [f"WHEN {is_type} THEN " + literal(
            f"record: waits for table {r.table} (not in the registry database yet: the "
            "pipeline creates it when it first runs)")]
    lost = [c for c in r.columns if c not in columns]
    if lost:  # created since start-up without them (problems() refuses it at start-up)
        return [f"WHEN {is_type} THEN " + literal(
            f"record: table {r.table} has no column {', '.join(lost)}")]
    out = []
    t = ident(r.table)
    for column, values in r.hold:
        c = f"{t}.{ident(column)}"
        out.append(f"WHEN {is_type} AND {_exists(r, f' AND {c} IN ({_values(values)})')}"
                   f" THEN {literal(f'record: {r.table}.{column} is ')}"
                   f" || {quote}({_row(r, column)})")
    if r.missing == "wait":
        out.append(f"WHEN {is_type} AND NOT {_exists(r)} THEN "
                   f"{literal(f'record: waits for a row of {r.table} with {r.path_column} = ')}"
                   f" || {quote}(data_registry.stage_path)")
    for column, values in r.require:
        c = f"{t}.{ident(column)}"
        wanted = _values(values) if len(values) == 1 else f"one of {_values(values)}"
        test = f"{c} IS NOT NULL AND {c} IN ({_values(values)})"
        out.append(f"WHEN {is_type} AND {_exists(r)} AND NOT {_exists(r, f' AND {test}')}"
                   f" THEN {literal(f'record: waits for {r.table}.{column} {wanted} (now ')}"
                   f" || {quote}({_row(r, column)}) || ')'")
    return out


def update_sql(r: Record) -> str:
    """The publish's UPDATE of the record (`:published`, `:staged`: the paths). A row of
    the table that already names the published path (a stale row of the pipeline's, whose
    file had left that name) leaves the record as it is: a unique path column would
    otherwise fail the commit of the publish, every time it is tried."""
    t, p = ident(r.table), ident(r.path_column)
    return (f"UPDATE {t} SET {p} = :published WHERE {p} = :staged"
            f" AND NOT EXISTS (SELECT 1 FROM {t} AS other WHERE other.{p} = :published)")
