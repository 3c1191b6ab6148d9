"""Which completions wait for their WAL flush: those that end runs (DONE, FAILED). Moves to the
next stage and retries commit without waiting; a server crash can only lose the newest of them,
and the rescue then runs that stage again."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import psycopg
from psycopg_pool import AsyncConnectionPool

from conveyor.pipeline import Pipeline, Stage
from conveyor.protocol import StageProtocol
from conveyor.results import Failure, Success


async def _noop(run: Any) -> dict[str, Any]:
    return {}


PIPELINE = Pipeline(
    "durability",
    [
        Stage("first", _noop, consumes="NEW", produces="FIRST_DONE"),
        Stage("last", _noop, consumes="FIRST_DONE", produces="DONE"),
    ],
)

# Fires just before each commit that wrote a run_events row, and records the commit's mode.
_RECORD_COMMIT_MODE = """
CREATE TABLE commit_modes (run_id uuid, to_status text, mode text);
CREATE FUNCTION record_commit_mode() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO commit_modes VALUES (NEW.run_id, NEW.to_status,
                                     current_setting('synchronous_commit'));
    RETURN NULL;
END $$;
CREATE CONSTRAINT TRIGGER record_commit_mode AFTER INSERT ON conveyor.run_events
    DEFERRABLE INITIALLY DEFERRED FOR EACH ROW EXECUTE FUNCTION record_commit_mode();
"""


def _success(row: Any) -> Success:
    return Success(row[0], row[3], "{}", time.time(), 0.001)


def _failure(row: Any, retry_in: float | None) -> Failure:
    return Failure(row[0], row[3], "boom", retry_in, time.time(), 0.001)


async def _scenario(url: str) -> None:
    async with AsyncConnectionPool(url, kwargs={"autocommit": True}, min_size=1) as pool:
        first, last = (
            StageProtocol(
                pool,
                schema="conveyor",
                pipeline=PIPELINE,
                stage=stage,
                worker_id=f"w-{stage.name}",
                lease_seconds=30,
            )
            for stage in PIPELINE.stages
        )
        claimed = await first.claim(4)
        assert len(claimed) == 4
        # a move to the next stage, a retry, a retry beside a FAILED, a FAILED
        await first.apply([_success(claimed[0])], [])
        await first.apply([], [_failure(claimed[1], 60.0)])
        await first.apply([_success(claimed[2])], [_failure(claimed[3], None)])
        moved = await last.claim(4)
        assert {row[0] for row in moved} == {claimed[0][0], claimed[2][0]}
        await last.apply([_success(row) for row in moved], [])


def test_only_commits_that_end_runs_wait_for_their_flush(database_url: str) -> None:
    with psycopg.connect(database_url, autocommit=True) as conn:
        conn.execute(_RECORD_COMMIT_MODE)
        ids = [
            row[0]
            for row in conn.execute(
                "INSERT INTO conveyor.pipeline_runs (pipeline, priority)"
                " SELECT 'durability', 10 - n FROM generate_series(1, 4) n RETURNING id"
            ).fetchall()
        ]
        asyncio.run(_scenario(database_url))
        modes = conn.execute(
            "SELECT run_id, to_status, mode FROM commit_modes ORDER BY to_status, run_id"
        ).fetchall()
    by_run = {(run_id, to_status): mode for run_id, to_status, mode in modes}
    assert by_run == {
        (ids[0], "FIRST_DONE"): "off",  # on to the next stage
        (ids[1], "NEW"): "off",  # a retry alone
        (ids[2], "FIRST_DONE"): "on",  # committed together with a FAILED
        (ids[3], "FAILED"): "on",
        (ids[0], "DONE"): "on",
        (ids[2], "DONE"): "on",
    }
