"""The SQL that differs between the two backends, as fragments the shared operations
(operations.py) put into their one text of each statement.

Statements are written with named parameters (`:name`), which SQLite takes as they are and
`pg()` turns into psycopg's `%(name)s`. Anything else that differs is a field here.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass

from contimg_publisher.states import Move, Status, sql, sql_in

# What the server's clock reads, in the epoch seconds every time column holds.
PG_NOW = "extract(epoch from now())::float8"


@dataclass(frozen=True)
class Dialect:
    name: str
    #: Rows have a `node` (a server shared by several nodes): each node acts on its own.
    nodes: bool
    #: A given time (`:now`), else the clock leases are measured by.
    at: str
    #: The clock a lease's end is measured by, whatever `:now` says.
    lease_clock: str
    #: SQL's quote() of a value, NULL included.
    quote: str
    #: What a claim's reading of due rows adds: skip rows another transaction holds.
    skip_locked: str
    #: What a read that decides a write adds: lock the rows it read.
    for_update: str
    #: The claim's fence: the row still publishing under this owner (and this claim).
    fence: str
    #: What ending a claim clears.
    claim_cleared: str
    #: What a claim sets besides its lease (a new token, on a server).
    claim_sets: str
    #: Rows not `published`, as the dialect's planner finds them through the status index.
    unpublished: str

    def index(self, name: str) -> str:
        """A named index the query must use (SQLite: a plan without it is an error)."""
        return f" INDEXED BY {name}" if self.name == "sqlite" else ""

    def mine(self, alias: str = "") -> str:
        """`AND` this node's rows (nothing without nodes)."""
        return f" AND {alias}node = :node" if self.nodes else ""

    def json_set(self, column: str, key: str, param: str) -> str:
        if self.name == "sqlite":
            return f"json_set({column}, '$.{key}', :{param})"
        return (f"jsonb_set({column}::jsonb, '{{{key}}}', to_jsonb(CAST(:{param} AS TEXT)))"
                "::text")


_PUBLISHING = sql(Status.PUBLISHING)
_CLEARED = ("lease_owner = NULL, lease_expires_at = NULL, publish_target = NULL,"
            " publish_temp = NULL, publish_step = NULL")

SQLITE = Dialect(
    name="sqlite", nodes=False, at=":now", lease_clock=":now", quote="quote",
    skip_locked="", for_update="",
    fence=f"status = {_PUBLISHING} AND lease_owner = :owner",
    claim_cleared=_CLEARED, claim_sets="",
    # two ranges of the status index, without the published rows
    unpublished=(f"(status < {sql(Status.PUBLISHED)} OR status > {sql(Status.PUBLISHED)}"
                 " OR status IS NULL)"))

def pg_fence(token: str = ":token") -> str:
    """A server's claim fence, the claim's token read from `token` (a parameter, or a
    column of the rows a batch's statement joins)."""
    return (f"status = {_PUBLISHING} AND lease_owner = :owner"
            f" AND (CAST({token} AS TEXT) IS NULL OR claim_token = {token})")


POSTGRES = Dialect(
    name="postgresql", nodes=True,
    at=f"COALESCE(CAST(:now AS DOUBLE PRECISION), {PG_NOW})", lease_clock=PG_NOW,
    quote="quote_nullable", skip_locked=" FOR UPDATE SKIP LOCKED", for_update=" FOR UPDATE",
    fence=pg_fence(),
    claim_cleared=_CLEARED + ", claim_token = NULL",
    claim_sets=", claim_token = gen_random_uuid()::text",
    unpublished=f"status IS DISTINCT FROM {sql(Status.PUBLISHED)}")

# Rows the daemon may claim: waiting, described, and either published automatically or asked
# for. Each half has a partial index holding only its rows, ordered as claims take them; the
# same text is in the index and in the queries, as SQLite requires to match a partial index.
DUE_AUTO = (f"{sql_in(Move.CLAIM)} AND checksum IS NOT NULL"
            " AND COALESCE(auto_publish_enabled, 1) = 1")
DUE_REQUESTED = (f"{sql_in(Move.CLAIM)} AND checksum IS NOT NULL"
                 " AND publish_requested_at IS NOT NULL")
DUE_ORDER = "COALESCE(next_attempt_at, 0), staged_at, id"

_TOKENS = re.compile(r"'(?:[^']|'')*'|\"(?:[^\"]|\"\")*\"|::|:([A-Za-z_]\w*)|%")


@functools.lru_cache(maxsize=4096)
def pg(statement: str) -> str:
    """A statement's `:name` parameters as psycopg's `%(name)s`; a literal % doubled."""
    def one(m: re.Match[str]) -> str:
        text = m.group(0)
        if text == "%":
            return "%%"
        if m.group(1) is not None:
            return f"%({m.group(1)})s"
        return text.replace("%", "%%") if text[0] in "'\"" else text
    return _TOKENS.sub(one, statement)
