"""What a handler records with Run.record_usage reaches its run's event, in the run_events
columns operators query (model, prompt_tokens, completion_tokens), through the worker's path:
the handler runner, then one batched completion."""

from __future__ import annotations

import asyncio
from typing import Any

import psycopg
from psycopg_pool import AsyncConnectionPool

from conveyor import Pipeline, Run, Stage
from conveyor.protocol import StageProtocol
from conveyor.results import Failure, Success
from conveyor.worker.runner import run_handler
from tests.helpers import fetch_all


def price(run: Run) -> dict[str, Any]:
    calls = run.input.get("calls", [])
    for service, sent, received in calls:
        run.record_usage(service, input_units=sent, output_units=received)
    if run.input.get("fail"):
        raise RuntimeError("the call answered, then the handler failed")
    return {"calls": len(calls)}


PIPELINE = Pipeline("priced", [Stage("price", price, consumes="NEW", produces="DONE")])
STAGE = PIPELINE.stages[0]


async def _complete_batch(url: str, inputs: list[str]) -> int:
    pool: AsyncConnectionPool[psycopg.AsyncConnection[tuple[object, ...]]] = AsyncConnectionPool(
        url, min_size=1, max_size=2, open=False, kwargs={"autocommit": True}
    )
    await pool.open()
    try:
        protocol = StageProtocol(
            pool,
            schema="conveyor",
            pipeline=PIPELINE,
            stage=STAGE,
            worker_id="usage-test",
            lease_seconds=30,
        )
        async with pool.connection() as conn:
            for text in inputs:
                await conn.execute(
                    "INSERT INTO conveyor.pipeline_runs (pipeline, input) VALUES ('priced', %s)",
                    (text,),
                )
        claimed = await protocol.claim(len(inputs))
        successes: list[Success] = []
        failures: list[Failure] = []
        for run_id, run_input, outputs, attempt, _waited, _rescued in claimed:
            run = Run(run_id, PIPELINE.name, STAGE.name, run_input, outputs, attempt)
            result = await asyncio.create_task(run_handler(STAGE, run))
            (successes if isinstance(result, Success) else failures).append(result)  # type: ignore[arg-type]
        applied = await protocol.apply(successes, failures)
        return applied.completed + applied.retried
    finally:
        await pool.close()


def _events(url: str) -> list[tuple[Any, ...]]:
    return fetch_all(
        url,
        "SELECT r.input->>'n', e.model, e.prompt_tokens, e.completion_tokens"
        "  FROM conveyor.run_events e JOIN conveyor.pipeline_runs r ON r.id = e.run_id"
        " WHERE e.stage = 'price' ORDER BY 1",
    )


def test_recorded_usage_reaches_the_event_columns_and_none_stays_null(database_url: str) -> None:
    inputs = [
        '{"n": "1", "calls": [["gpt-small", 11, 7]]}',
        '{"n": "2"}',  # nothing recorded, in the same batch as runs that did
        '{"n": "3", "calls": [["ocr-v1", 3, 0], ["ocr-v2", 2, 5]]}',  # summed, last service
    ]
    assert asyncio.run(_complete_batch(database_url, inputs)) == 3
    assert _events(database_url) == [
        ("1", "gpt-small", 11, 7),
        ("2", None, None, None),
        ("3", "ocr-v2", 5, 5),
    ]


def test_a_batch_that_records_nothing_leaves_the_columns_null(database_url: str) -> None:
    assert asyncio.run(_complete_batch(database_url, ['{"n": "1"}', '{"n": "2"}'])) == 2
    assert _events(database_url) == [("1", None, None, None), ("2", None, None, None)]


def test_a_failed_attempt_keeps_what_it_recorded_for_the_budgets(database_url: str) -> None:
    """A handler that paid for a call and then failed: the retry's event keeps the usage, so
    a token budget counts what failed attempts spent."""
    inputs = ['{"n": "1", "fail": true, "calls": [["gpt-small", 40, 2]]}', '{"n": "2"}']
    assert asyncio.run(_complete_batch(database_url, inputs)) == 2
    assert _events(database_url) == [("1", "gpt-small", 40, 2), ("2", None, None, None)]
    spent = fetch_all(
        database_url,
        "SELECT conveyor_spent.s FROM (SELECT sum(prompt_tokens + completion_tokens) AS s"
        "  FROM conveyor.run_events WHERE error IS NOT NULL) conveyor_spent",
    )
    assert spent == [(42,)]
