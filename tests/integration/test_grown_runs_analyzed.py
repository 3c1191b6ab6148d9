"""A worker's completion, planned while pipeline_runs held a few runs, reads the whole table
for every batch; once the table has grown past twice what PostgreSQL last counted, the
maintenance leader's tick analyzes it, and the same prepared statement finds its runs by the
primary key again. The leader leaves a table that has not grown alone."""

from __future__ import annotations

import asyncio
import time
import uuid
from typing import Any

import psycopg

from conveyor import queries
from conveyor.batch_arrays import (
    NOT_ROUTED,
    microseconds_array,
    number_array,
    text_array,
    uuid_array,
)
from conveyor.maintenance import ANALYZE_LEAST_ROWS, Maintenance
from conveyor.settings import Settings
from tests.pipelines import chain

WORKER = "w-grown"


def _completion(run_id: uuid.UUID | None) -> dict[str, Any]:
    """complete_if_leased's parameters for stage one of `chain`, for one run (or none)."""
    ids = [run_id] if run_id else []
    return {
        "pipeline": "chain",
        "stage": "one",
        "consumes": "NEW",
        "working": "ONE_RUNNING",
        "produces": "ONE_DONE",
        "worker": WORKER,
        "terminal": False,
        "durable": False,
        "ids": uuid_array(ids),
        "outputs": text_array(["{}"] * len(ids)),
        "attempts": number_array([1] * len(ids)),
        "started_us": microseconds_array([time.time()] * len(ids)),
        "durations_us": microseconds_array([0.0] * len(ids)),
        "models": text_array([None] * len(ids)),
        "prompt_tokens": number_array([None] * len(ids)),
        "completion_tokens": number_array([None] * len(ids)),
        **NOT_ROUTED,
        "lock_ids": "{}",
    }


def _leased_run(conn: psycopg.Connection[Any]) -> uuid.UUID:
    row = conn.execute(
        "INSERT INTO conveyor.pipeline_runs (pipeline, status, attempt, lease_owner,"
        " lease_expires_at) VALUES ('chain', 'ONE_RUNNING', 1, %s, now() + interval '1 minute')"
        " RETURNING id",
        (WORKER,),
    ).fetchone()
    assert row is not None
    return row[0]  # type: ignore[no-any-return]


def _scans_of_one_completion(worker: psycopg.Connection[Any], run_id: uuid.UUID) -> tuple[int, int]:
    """(sequential scans, index scans) of pipeline_runs by one completion, prepared: what the
    session's counts not yet flushed to the statistics grow by."""
    statement = queries.load("conveyor")["complete_if_leased"]
    counts = (
        "SELECT seq_scan, idx_scan FROM pg_stat_xact_user_tables"
        " WHERE relid = 'conveyor.pipeline_runs'::regclass"
    )
    with worker.transaction():
        before = worker.execute(counts).fetchone()
        moved = worker.execute(statement, _completion(run_id), prepare=True).fetchall()
        after = worker.execute(counts).fetchone()
    assert [r[0] for r in moved] == [run_id]
    assert before is not None and after is not None
    return after[0] - before[0], after[1] - before[1]


def _insert(conn: psycopg.Connection[Any], runs: int) -> None:
    """`runs` finished runs of `chain`, counted in the statistics at once (a session's counts
    otherwise reach them within a second or, idle, ten)."""
    with conn.transaction():
        conn.execute(
            "INSERT INTO conveyor.pipeline_runs (pipeline, status)"
            " SELECT 'chain', 'ONE_DONE' FROM generate_series(1, %s)",
            (runs,),
        )
        conn.execute("SELECT pg_stat_force_next_flush()")


def _analyzed(conn: psycopg.Connection[Any]) -> int:
    row = conn.execute(
        "SELECT analyze_count FROM pg_stat_user_tables"
        " WHERE relid = 'conveyor.pipeline_runs'::regclass"
    ).fetchone()
    assert row is not None
    return int(row[0])


def test_a_plan_made_for_a_small_table_is_made_again_once_the_table_grows(
    conn: psycopg.Connection[Any], database_url: str
) -> None:
    conn.execute("ALTER TABLE conveyor.pipeline_runs SET (autovacuum_enabled = false)")
    leader = Maintenance(Settings(), chain, database_url, "leader-under-test")
    with psycopg.connect(database_url, autocommit=True) as worker:
        # A worker starting on an empty table: its statement is prepared and, after a few
        # executions, runs with the generic plan made then.
        statement = queries.load("conveyor")["complete_if_leased"]
        for _ in range(8):
            worker.execute(statement, _completion(None), prepare=True).fetchall()

        _insert(conn, 20 * ANALYZE_LEAST_ROWS)
        seq, _ = _scans_of_one_completion(worker, _leased_run(conn))
        assert seq > 0, "planned on an empty table, the completion reads the whole table"

        asyncio.run(_tick(leader, database_url))
        assert _analyzed(conn) == 1

        seq, idx = _scans_of_one_completion(worker, _leased_run(conn))
        assert (seq, idx) == (0, 1), "planned again: by the primary key"

        # Not grown since: no second ANALYZE.
        asyncio.run(_tick(leader, database_url))
        assert _analyzed(conn) == 1


def test_a_table_below_the_least_rows_is_not_analyzed(
    conn: psycopg.Connection[Any], database_url: str
) -> None:
    conn.execute("ALTER TABLE conveyor.pipeline_runs SET (autovacuum_enabled = false)")
    _insert(conn, 2 * ANALYZE_LEAST_ROWS)  # twice the least: not more
    asyncio.run(_tick(Maintenance(Settings(), chain, database_url, "leader"), database_url))
    assert _analyzed(conn) == 0


async def _tick(leader: Maintenance, url: str) -> None:
    async with await psycopg.AsyncConnection.connect(url, autocommit=True) as conn:
        await leader.tick(conn)
