"""A heartbeat never waits for a run's row: the worker's own completer commits results with the
same rows locked in another order, and a heartbeat that waits for them can deadlock with it (a
second's stall for the whole stage, then an error). A row held elsewhere is skipped and counts
as still held while its lease runs; a run taken away, or held by a rescue, does not."""

from __future__ import annotations

import psycopg

from conveyor import queries

PARAMS = {"pipeline": "chain", "stage": "one", "working": "ONE_RUNNING", "worker": "w"}


def _leased(
    conn: psycopg.Connection[tuple[object, ...]], owner: str = "w", seconds: float = 5
) -> object:
    row = conn.execute(
        "INSERT INTO conveyor.pipeline_runs (pipeline, status, attempt, lease_owner,"
        " lease_expires_at) VALUES ('chain', 'ONE_RUNNING', 1, %s,"
        " now() + make_interval(secs => %s)) RETURNING id",
        (owner, seconds),
    ).fetchone()
    assert row is not None
    return row[0]


def _lease_left(conn: psycopg.Connection[tuple[object, ...]], run_id: object) -> float:
    row = conn.execute(
        "SELECT extract(epoch FROM lease_expires_at - now())::float8"
        "  FROM conveyor.pipeline_runs WHERE id = %s",
        (run_id,),
    ).fetchone()
    assert row is not None
    return float(row[0])


def test_a_heartbeat_skips_rows_held_elsewhere_and_keeps_them(
    conn: psycopg.Connection[tuple[object, ...]], database_url: str
) -> None:
    extend = queries.load("conveyor")["extend_leases"]
    completing, running, taken = _leased(conn), _leased(conn), _leased(conn, owner="other")
    rescuing = _leased(conn, seconds=-1)  # expired: what the leader's rescue takes
    with psycopg.connect(database_url) as completer, psycopg.connect(database_url) as leader:
        # the completer's transaction, its rows locked until it commits
        completer.execute(
            "UPDATE conveyor.pipeline_runs SET updated_at = now() WHERE id = %s", (completing,)
        )
        leader.execute("SELECT 1 FROM conveyor.pipeline_runs WHERE id = %s FOR UPDATE", (rescuing,))
        conn.execute("SET statement_timeout = '3s'")  # waiting would fail the test, not hang it
        held = conn.execute(
            extend, {**PARAMS, "ids": [completing, running, taken, rescuing], "lease_seconds": 60}
        ).fetchall()
        assert {row[0] for row in held} == {completing, running}
        assert _lease_left(conn, running) > 50
        assert _lease_left(conn, completing) < 6  # skipped: extended at the next beat
        completer.rollback()
    held = conn.execute(
        extend, {**PARAMS, "ids": [completing, running], "lease_seconds": 60}
    ).fetchall()
    assert {row[0] for row in held} == {completing, running}
    assert _lease_left(conn, completing) > 50
