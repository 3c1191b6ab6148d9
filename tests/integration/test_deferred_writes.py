"""Writes a handler hands to the engine (Run.write) commit in the transaction that stores its
output, and only then: a refused result (a lost lease, a stale attempt) leaves nothing behind,
a stored one leaves its writes exactly once, and a write PostgreSQL refuses fails its own run
without holding back the others. Real PostgreSQL, the protocol driven directly."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Coroutine
from contextlib import asynccontextmanager
from typing import Any
from uuid import UUID

import psycopg
import pytest
from psycopg_pool import AsyncConnectionPool

from conveyor import Pipeline, Run, Stage, queries
from conveyor.protocol import StageProtocol
from conveyor.results import Failure, Success
from conveyor.server_json import ClaimedRow
from conveyor.settings import Settings
from conveyor.worker.loop import Worker
from conveyor.worker.runner import run_handler
from tests.helpers import fetch_all, scalar

# A side table the handlers write to; a note 'bad' is refused by PostgreSQL.
_SIDE_TABLE = """
CREATE TABLE conveyor.side_effects (
    run_id uuid NOT NULL,
    attempt int NOT NULL,
    note text NOT NULL CHECK (note <> 'bad')
)
"""


async def _note(run: Run) -> dict[str, Any]:
    note = str(run.input.get("note", "ok"))
    insert = "INSERT INTO conveyor.side_effects (run_id, attempt, note) VALUES (%s, %s, %s)"
    if note == "shape":  # named params for positional placeholders: psycopg refuses them
        run.write(insert, {"run_id": run.id, "attempt": run.attempt, "note": note})
    else:
        run.write(insert, (run.id, run.attempt, note))
    return {"note": note}


PIPELINE = Pipeline("writes", [Stage("only", _note, consumes="NEW", produces="DONE")])
STAGE = PIPELINE.stages[0]


@pytest.fixture
def side_db(database_url: str) -> str:
    with psycopg.connect(database_url, autocommit=True) as conn:
        conn.execute(_SIDE_TABLE)
    return database_url


def _insert(url: str, *inputs: str) -> list[UUID]:
    with psycopg.connect(url, autocommit=True) as conn:
        return [
            conn.execute(
                "INSERT INTO conveyor.pipeline_runs (pipeline, input) VALUES ('writes', %s)"
                " RETURNING id",
                (payload,),
            ).fetchone()[0]  # type: ignore[index]
            for payload in inputs
        ]


def _side_effects(url: str) -> list[tuple[Any, ...]]:
    return fetch_all(url, "SELECT run_id, attempt, note FROM conveyor.side_effects ORDER BY note")


@asynccontextmanager
async def _protocol(url: str, worker: str = "w", lease: float = 30) -> AsyncIterator[StageProtocol]:
    async with AsyncConnectionPool(
        url, min_size=1, max_size=2, kwargs={"autocommit": True}
    ) as pool:
        yield StageProtocol(
            pool,
            schema="conveyor",
            pipeline=PIPELINE,
            stage=STAGE,
            worker_id=worker,
            lease_seconds=lease,
        )


async def _handled(rows: list[ClaimedRow]) -> dict[UUID, Success]:
    """Each claimed run through the stage's handler, as the worker runs it."""
    results: dict[UUID, Success] = {}
    for run_id, run_input, outputs, attempt, _waited, _rescued in rows:
        run = Run(run_id, PIPELINE.name, STAGE.name, run_input, outputs, attempt)
        outcome = await asyncio.create_task(run_handler(STAGE, run))
        assert isinstance(outcome, Success), outcome
        assert len(outcome.writes) == 1
        results[run_id] = outcome
    return results


def _run(scenario: Callable[[], Coroutine[Any, Any, None]]) -> None:
    asyncio.run(scenario())


def test_a_refused_completion_leaves_no_write_and_a_stored_one_leaves_it_once(
    side_db: str,
) -> None:
    lost, kept = _insert(side_db, '{"note": "lost"}', '{"note": "kept"}')

    async def scenario() -> None:
        async with _protocol(side_db) as protocol:
            results = await _handled(await protocol.claim(2))
            # The lease of one run is taken away before its result is applied (another worker
            # took it over after a rescue).
            async with protocol.pool.connection() as conn:
                await conn.execute(
                    "UPDATE conveyor.pipeline_runs SET lease_owner = 'someone-else' WHERE id = %s",
                    (lost,),
                )
            applied = await protocol.apply([results[lost], results[kept]], [])
            assert (applied.completed, applied.refused) == (1, 1)
            # The same result applied again (a flush retried after its commit): refused, and
            # its write is not made twice.
            again = await protocol.apply([results[kept]], [])
            assert (again.completed, again.refused) == (0, 1)

    _run(scenario)
    assert _side_effects(side_db) == [(kept, 1, "kept")]
    statuses = dict(fetch_all(side_db, "SELECT id, status FROM conveyor.pipeline_runs"))
    assert statuses == {lost: "ONLY_RUNNING", kept: "DONE"}


def test_a_write_postgresql_refuses_rolls_back_the_whole_batch(side_db: str) -> None:
    _insert(side_db, '{"note": "first"}', '{"note": "bad"}')

    async def scenario() -> None:
        async with _protocol(side_db) as protocol:
            results = await _handled(await protocol.claim(2))
            with pytest.raises(psycopg.errors.CheckViolation, match="side_effects_note_check"):
                await protocol.apply(list(results.values()), [])

    _run(scenario)
    assert _side_effects(side_db) == []
    assert scalar(side_db, "SELECT count(*) FROM conveyor.run_events") == 0
    assert fetch_all(side_db, "SELECT DISTINCT status FROM conveyor.pipeline_runs") == [
        ("ONLY_RUNNING",)
    ]


def test_the_worker_fails_the_run_whose_write_is_refused_and_stores_the_others(
    side_db: str,
) -> None:
    good = _insert(side_db, '{"note": "one"}', '{"note": "two"}')
    bad, shape = _insert(side_db, '{"note": "bad"}', '{"note": "shape"}')

    async def scenario() -> None:
        worker = Worker(Settings(sweep_interval=0.2, lease=30), PIPELINE, STAGE, side_db)
        task = asyncio.create_task(worker.run())
        for _ in range(400):
            finished = scalar(
                side_db, "SELECT count(*) FROM conveyor.pipeline_runs WHERE finished_at IS NOT NULL"
            )
            if finished == 4:
                break
            await asyncio.sleep(0.05)
        worker.stop()
        await task

    _run(scenario)
    rows = fetch_all(side_db, "SELECT id, status, last_error FROM conveyor.pipeline_runs")
    by_id = {row[0]: row[1:] for row in rows}
    assert all(by_id[run_id] == ("DONE", None) for run_id in good)
    status, error = by_id[bad]
    assert status == "FAILED"
    assert error == (
        "result could not be stored: a write handed over with Run.write failed: new row for"
        ' relation "side_effects" violates check constraint "side_effects_note_check"'
    )
    assert by_id[shape] == (
        "FAILED",
        "result could not be stored: a write handed over with Run.write failed: positional"
        " placeholders (%s) require a sequence of parameters",
    )
    assert sorted(row[0] for row in _side_effects(side_db)) == sorted(good)


def test_a_stale_attempt_of_the_same_worker_is_refused(side_db: str) -> None:
    [run_id] = _insert(side_db, '{"note": "stale"}')
    rescue = queries.load("conveyor")["rescue_expired"]

    async def scenario() -> None:
        async with _protocol(side_db, worker="w", lease=0.2) as protocol:
            [first] = await protocol.claim(1)
            stale = (await _handled([first]))[run_id]
            assert stale.attempt == 1
            await asyncio.sleep(0.3)  # its lease runs out; the run is rescued
            async with protocol.pool.connection() as conn:
                await conn.execute(
                    rescue,
                    {
                        "pipeline": PIPELINE.name,
                        "stage": STAGE.name,
                        "consumes": STAGE.consumes,
                        "working": STAGE.working,
                        "max_rescues": 3,
                        "max_attempts": STAGE.max_attempts,
                    },
                )
            # Claimed again by the same worker: same owner, same working status, attempt 2.
            [second] = await protocol.claim(1, alone=True)
            assert (second[0], second[3]) == (run_id, 2)
            late_failure = Failure(run_id, 1, "late error", 1.0, 0.0, 0.1)
            refused = await protocol.apply([stale], [late_failure])
            assert (refused.completed, refused.retried, refused.refused) == (0, 0, 2)
            assert _side_effects(side_db) == []
            current = (await _handled([second]))[run_id]
            applied = await protocol.apply([current], [])
            assert (applied.completed, applied.refused) == (1, 0)

    _run(scenario)
    assert _side_effects(side_db) == [(run_id, 2, "stale")]
    row = fetch_all(
        side_db, "SELECT status, last_error, outputs->'only' FROM conveyor.pipeline_runs"
    )
    assert row == [("DONE", None, {"note": "stale"})]
    events = fetch_all(
        side_db, "SELECT to_status, attempt, error IS NULL FROM conveyor.run_events ORDER BY id"
    )
    assert events == [("NEW", 1, False), ("DONE", 2, True)]
