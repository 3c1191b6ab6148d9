"""A limit's bounds (sql/020_limit_bounds_checked_when_written.sql) are checked when they are
written, by an insert, an upsert or an update of a bounded column, with check_violation and
the name of the bound; not at the buckets' updates, which every claim under a rate makes. No
search_path a writer chooses gets a row past them: a row out of bounds could stop every claim
under its key (a rate of 0 divides by zero, one of 1e-12 per minute overflows the intervals
its bucket computes)."""

from __future__ import annotations

from typing import Any

import psycopg
import pytest

INSERT = (
    "INSERT INTO conveyor.limits (key, max_in_flight, requests_per_minute, tokens_per_minute)"
    " VALUES (%s, %s, %s, %s)"
)
OUT_OF_BOUNDS = [
    (("", None, None, None), "limits_key_length"),
    (("k" * 201, None, None, None), "limits_key_length"),
    (("k", -1, None, None), "limits_max_in_flight"),
    (("k", None, 0, None), "limits_rpm"),
    (("k", None, 1e-12, None), "limits_rpm"),  # its bucket's intervals would overflow
    (("k", None, None, 5e-324), "limits_tpm"),
    (("k", None, 2e9, None), "limits_rpm"),
    (("k", None, None, -5), "limits_tpm"),
    (("k", None, None, 1e13), "limits_tpm"),
]


def _refused(conn: psycopg.Connection[Any], statement: str, params: Any) -> str | None:
    """The bound a statement was refused for (None: not refused)."""
    try:
        with conn.transaction():
            conn.execute(statement, params)
    except psycopg.errors.CheckViolation as exc:
        return exc.diag.constraint_name
    return None


@pytest.mark.parametrize(("row", "bound"), OUT_OF_BOUNDS)
def test_a_limit_out_of_bounds_is_refused_however_it_is_written(
    conn: psycopg.Connection[Any], row: tuple[Any, ...], bound: str
) -> None:
    assert _refused(conn, INSERT, row) == bound
    conn.execute(INSERT, ("kept", 4, 120, 1000))
    key, max_in_flight, rpm, tpm = row
    assert (
        _refused(
            conn,
            "UPDATE conveyor.limits SET key = %s, max_in_flight = coalesce(%s, max_in_flight),"
            " requests_per_minute = coalesce(%s, requests_per_minute),"
            " tokens_per_minute = coalesce(%s, tokens_per_minute) WHERE key = 'kept'",
            (key if bound == "limits_key_length" else "kept", max_in_flight, rpm, tpm),
        )
        == bound
    )
    upsert = INSERT + (
        " ON CONFLICT (key) DO UPDATE SET max_in_flight = %s, requests_per_minute = %s,"
        " tokens_per_minute = %s"
    )
    if bound != "limits_key_length":  # the same key, written out of bounds by an upsert
        assert _refused(conn, upsert, ("kept", 4, 120, 1000, max_in_flight, rpm, tpm)) == bound
    assert conn.execute(
        "SELECT key, max_in_flight, requests_per_minute, tokens_per_minute FROM conveyor.limits"
    ).fetchall() == [("kept", 4, 120.0, 1000.0)]


def test_no_search_path_gets_a_limit_past_its_bounds(conn: psycopg.Connection[Any]) -> None:
    """A writer who puts a schema of its own before pg_catalog, with a `>=` that says yes to
    everything, still meets the bounds as they were written."""
    conn.execute("CREATE SCHEMA sly")
    conn.execute(
        "CREATE FUNCTION sly.yes(integer, integer) RETURNS boolean LANGUAGE sql AS 'SELECT true'"
    )
    conn.execute(
        "CREATE OPERATOR sly.>= (LEFTARG = integer, RIGHTARG = integer, FUNCTION = sly.yes)"
    )
    try:
        conn.execute("SET search_path = sly, pg_catalog")
        assert conn.execute("SELECT -1 >= 0").fetchone() == (True,)  # the operator is in force
        assert _refused(conn, INSERT, ("k", -1, None, None)) == "limits_max_in_flight"
    finally:
        conn.execute("RESET search_path")
        conn.execute("DROP SCHEMA sly CASCADE")


def test_the_message_shows_a_long_key_cut_short(conn: psycopg.Connection[Any]) -> None:
    with pytest.raises(psycopg.errors.CheckViolation) as refused, conn.transaction():
        conn.execute(INSERT, ("k" * 10_000, None, None, None))
    assert len(str(refused.value)) < 400


def test_the_buckets_updates_lock_no_row_for_a_trigger(conn: psycopg.Connection[Any]) -> None:
    """Every claim under a rate updates its key's bucket: a BEFORE UPDATE row trigger would have
    it lock the row first and log the lock."""
    before_update = conn.execute(
        "SELECT tgname FROM pg_trigger WHERE tgrelid = 'conveyor.limits'::regclass"
        " AND tgtype & (1 | 2 | 16) = (1 | 2 | 16)"  # row, before, update
    ).fetchall()
    assert before_update == []
