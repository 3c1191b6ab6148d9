"""The protocol's named statements, loaded from sql/queries.sql (the protocol in one place).

Two claims are built from claim_batch itself, so that they never drift apart from it:
claim_limited (within flow control's room) and claim_fair (groups in turn)."""

from __future__ import annotations

import re
from functools import cache
from importlib import resources

from conveyor.db import schema_identifier

_HEADER = re.compile(r"^-- ([a-z_]+) --$", re.MULTILINE)
# psycopg keeps what it parsed of a statement up to this many bytes, and parses a longer one at
# every execution (tests/unit/test_queries.py holds every statement under it).
PSYCOPG_CACHED_LENGTH = 4096
# A quoted literal or identifier (kept as written), else a run of white space and comments.
_TOKENS = re.compile(r"('(?:[^']|'')*'|\"(?:[^\"]|\"\")*\")|(?:\s|--[^\n]*)+")


def read_sql(filename: str) -> str:
    return resources.files("conveyor.sql").joinpath(filename).read_text(encoding="utf-8")


def for_schema(text: str, schema: str) -> str:
    return text.replace("@schema@", schema_identifier(schema))


@cache
def load(schema: str) -> dict[str, str]:
    """Named statements of queries.sql, with the schema substituted."""
    text = for_schema(read_sql("queries.sql"), schema)
    parts = _HEADER.split(text)
    statements: dict[str, str] = {}
    for name, body in zip(parts[1::2], parts[2::2], strict=True):
        if name in statements:
            raise ValueError(f"queries.sql names two statements {name!r}")
        lines = [line for line in body.splitlines() if not line.lstrip().startswith("--")]
        statements[name] = "\n".join(lines).strip().rstrip(";")
    claim = statements["claim_batch"]
    statements["claim_limited"] = _limited_claim(claim, schema_identifier(schema))
    statements["claim_fair"] = _fair_claim(claim, statements.pop("fair_candidates"))
    return {name: compact(statement) for name, statement in statements.items()}


def compact(statement: str) -> str:
    """A statement without its comments, each run of white space one space or one line break
    (never inside a quoted literal or identifier): the completion statements, as laid out for
    reading, are longer than PSYCOPG_CACHED_LENGTH."""
    return _TOKENS.sub(_compacted, statement).strip()


def _compacted(match: re.Match[str]) -> str:
    # A line break stays one: two literals on two lines are one literal in SQL.
    kept = match.group(1)
    return kept if kept else "\n" if "\n" in match.group(0) else " "


@cache
def sized(statement: str, batch: int) -> str:
    """A claim with the number of runs it asks for written in place of %(batch)s: PostgreSQL
    keeps one plan per size (a handful of sizes per stage; see claim_batch in queries.sql)."""
    return statement.replace("%(batch)s", str(int(batch)))


def _parts(claim_batch: str) -> tuple[str, str]:
    """claim_batch as its candidates (WITH ... FOR UPDATE SKIP LOCKED) and what follows them
    (the picked CTE and the UPDATE)."""
    head, marker, rest = claim_batch.partition("\n), picked AS (")
    if not marker or not head.startswith("WITH candidates AS (") or "  FROM picked\n" not in rest:
        raise ValueError("claim_batch is not shaped as the claims built from it expect")
    return head, marker + rest


def _fair_claim(claim_batch: str, fair_candidates: str) -> str:
    """claim_batch with the fair candidates (sql/queries.sql, fair_candidates) in place of its
    own."""
    return fair_candidates + _parts(claim_batch)[1]


def _limited_claim(claim_batch: str, schema: str) -> str:
    """claim_batch within the limits' room, as one statement: limit_room() (its keys' locks
    held to the end of the statement) bounds the claim, the `taken` update (limit_take's)
    takes a request per run claimed, and a last row with a NULL id says until when and why
    nothing (or less) may start."""
    head, rest = _parts(claim_batch)
    picked, _, update = rest.partition("\nUPDATE ")
    head = head.replace(
        "WITH candidates AS (",
        "WITH room AS MATERIALIZED"
        f" (SELECT * FROM {schema}.limit_room(%(keys)s::text[], %(batch)s)),\ncandidates AS (",
        1,
    )
    # The candidates keep claim_batch's literal LIMIT (its plan reads the index in order); the
    # room bounds what of them is claimed. A room as large as the claim takes them all, unsorted
    # (the usual case: limits that do not bind); a smaller one, the first of them.
    update = update.replace(
        "  FROM picked\n",
        "  FROM (SELECT * FROM picked WHERE (SELECT room.room FROM room) >= %(batch)s\n"
        "        UNION ALL\n"
        "        (SELECT * FROM picked WHERE (SELECT room.room FROM room) < %(batch)s\n"
        "          ORDER BY priority DESC, run_after\n"
        "          LIMIT (SELECT greatest(room.room, 0) FROM room))) picked\n",
        1,
    )
    # limit_take's request bucket update, written out: a function call per claim costs more
    # than the update. In PostgreSQL's READ COMMITTED, it updates the newest version of each
    # key's row, the one the claim before this one left.
    return (
        f"{head}{picked},\nclaimed AS (\nUPDATE {update}\n),\n"
        f"taken AS (UPDATE {schema}.limits l\n"
        "   SET requests_tat = greatest(l.requests_tat, clock_timestamp())\n"
        "       + make_interval(secs => (SELECT count(*) FROM claimed) * 60.0"
        " / l.requests_per_minute)\n"
        " WHERE l.key = ANY(%(keys)s::text[]) AND l.requests_per_minute IS NOT NULL\n"
        "   AND EXISTS (SELECT FROM claimed))\n"
        "SELECT c.id, c.input, c.outputs, c.attempt, c.waited_seconds, c.rescued,"
        " NULL::float8, NULL::text\n  FROM claimed c\n"
        "UNION ALL\n"
        "SELECT NULL, NULL, NULL, NULL, NULL, NULL,"
        " extract(epoch FROM room.throttled_until - clock_timestamp())::float8,"
        " room.throttled_by\n"
        "  FROM room WHERE room.room < 1 OR room.throttled_until IS NOT NULL"
    )
