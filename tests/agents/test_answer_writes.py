"""The answer stage writes the exchange to the session's memory in the transaction that stores
its answer: an answer whose completion is refused leaves no exchange behind, a stored one leaves
exactly one. The stage's handler as the worker runs it, the protocol against real PostgreSQL."""

from __future__ import annotations

import asyncio
from typing import Any
from uuid import UUID

import psycopg
import pytest
from psycopg.types.json import Jsonb
from psycopg_pool import AsyncConnectionPool

from conveyor import Run, runs
from conveyor.agents import build_pipeline
from conveyor.agents.config import AgentConfig
from conveyor.agents.ingest import bundled_corpus, ingest
from conveyor.protocol import StageProtocol
from conveyor.reference import NAME
from conveyor.results import Success
from conveyor.worker.runner import run_handler
from tests.agents.conftest import run_async, run_stages
from tests.helpers import fetch_all

PIPELINE = build_pipeline(AgentConfig(), NAME)
ANSWER = PIPELINE.stage("answer")
QUESTIONS = {
    "cancelled": "What happens to a run when its worker is killed?",
    "kept": "What does the sweep do?",
}


@pytest.fixture
def corpus_db(agents_db: str) -> str:
    run_async(lambda: ingest(agents_db, "conveyor", bundled_corpus(), AgentConfig()))
    return agents_db


def _ready_for_answer(url: str, session: str) -> UUID:
    """A run of the agents' pipeline waiting for its answer: analyzed and assembled."""
    run_input = {"question": QUESTIONS[session], "session_id": session}
    outputs, _ = run_async(lambda: run_stages(PIPELINE, run_input, until="assemble"))
    with psycopg.connect(url, autocommit=True) as conn:
        row = conn.execute(
            "INSERT INTO conveyor.pipeline_runs (pipeline, status, input, outputs)"
            " VALUES (%s, 'CONTEXT_READY', %s, %s) RETURNING id",
            (PIPELINE.name, Jsonb(run_input), Jsonb(outputs)),
        ).fetchone()
    assert row is not None
    return UUID(str(row[0]))


def _exchanges(url: str) -> list[tuple[Any, ...]]:
    return fetch_all(
        url,
        "SELECT namespace, metadata->>'run_id' FROM conveyor.memory WHERE kind = 'message'"
        " ORDER BY namespace",
    )


def test_the_exchange_is_remembered_only_with_a_stored_answer(corpus_db: str) -> None:
    cancelled = _ready_for_answer(corpus_db, "cancelled")
    kept = _ready_for_answer(corpus_db, "kept")

    async def scenario() -> None:
        async with AsyncConnectionPool(
            corpus_db, min_size=1, max_size=2, kwargs={"autocommit": True}
        ) as pool:
            protocol = StageProtocol(
                pool,
                schema="conveyor",
                pipeline=PIPELINE,
                stage=ANSWER,
                worker_id="answer-w",
                lease_seconds=30,
            )
            results: dict[UUID, Success] = {}
            for run_id, run_input, outputs, attempt, _waited, _rescued in await protocol.claim(2):
                run = Run(run_id, PIPELINE.name, ANSWER.name, run_input, outputs, attempt)
                outcome = await asyncio.create_task(run_handler(ANSWER, run))
                assert isinstance(outcome, Success), outcome
                results[run_id] = outcome
            assert set(results) == {cancelled, kept}
            # Nothing is in memory while the answers wait to be stored.
            assert _exchanges(corpus_db) == []
            # An operator cancels one run while its answer is on its way.
            with psycopg.connect(corpus_db, autocommit=True) as conn:
                assert runs.cancel(conn, "conveyor", cancelled, "test")
            applied = await protocol.apply([results[cancelled], results[kept]], [])
            assert (applied.completed, applied.refused) == (1, 1)
            # The stored answer applied again (a flush retried): no second exchange.
            again = await protocol.apply([results[kept]], [])
            assert (again.completed, again.refused) == (0, 1)

    run_async(scenario)
    assert _exchanges(corpus_db) == [("session:kept", str(kept))]
    statuses = dict(fetch_all(corpus_db, "SELECT id, status FROM conveyor.pipeline_runs"))
    assert statuses == {cancelled: "CANCELLED", kept: "DONE"}
    remembered = fetch_all(
        corpus_db,
        "SELECT outputs->'answer'->>'remembered' FROM conveyor.pipeline_runs WHERE id = %s",
        (kept,),
    )
    assert remembered == [("true",)]


def test_the_handler_hands_the_exchange_over_instead_of_writing_it(agents_db: str) -> None:
    """Called alone (as a unit test of a handler would), the answer stage writes nothing: the
    exchange is in run.writes, for the engine."""
    run_input = {"question": QUESTIONS["kept"], "session_id": "alone"}

    async def scenario() -> Run:
        outputs, _ = await run_stages(PIPELINE, run_input, until="assemble")
        run = Run(UUID(int=1), PIPELINE.name, ANSWER.name, run_input, outputs, 1)
        await ANSWER.handler(run)  # type: ignore[misc]
        return run

    run = run_async(scenario)
    assert _exchanges(agents_db) == []
    [write] = run.writes
    assert isinstance(write.params, tuple) and write.params[0] == "session:alone"
