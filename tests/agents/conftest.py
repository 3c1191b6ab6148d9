from __future__ import annotations

import asyncio
import uuid
from collections.abc import Awaitable, Callable, Iterator
from typing import Any, TypeVar

import pytest

from conveyor import Pipeline, Route, Run, Stage
from conveyor.agents import db
from conveyor.protocol import execute_writes
from tests.integration.conftest import start_conveyor
from tests.llm_server import FakeLLM

__all__ = ["start_conveyor"]  # the engine's fixture: `conveyor ARGS` against the test database

T = TypeVar("T")


@pytest.fixture
def agents_db(database_url: str, monkeypatch: pytest.MonkeyPatch) -> str:
    """The test database as the handlers find it: through the environment, like a worker."""
    monkeypatch.setenv("CONVEYOR_DATABASE_URL", database_url)
    monkeypatch.delenv("CONVEYOR_SCHEMA", raising=False)
    return database_url


@pytest.fixture
def fake_llm() -> Iterator[FakeLLM]:
    server = FakeLLM()
    yield server
    server.close()


@pytest.fixture
def fallback_llm() -> Iterator[FakeLLM]:
    server = FakeLLM(answer="The fallback route answers [1].")
    yield server
    server.close()


def run_async(scenario: Callable[[], Awaitable[T]]) -> T:
    """One event loop per scenario; the handlers' pool is closed inside it."""

    async def main() -> T:
        try:
            return await scenario()
        finally:
            await db.close()

    return asyncio.run(main())


async def run_stages(
    pipeline: Pipeline,
    run_input: dict[str, Any],
    *,
    run_id: uuid.UUID | None = None,
    until: str = "answer",
) -> tuple[dict[str, Any], list[Run]]:
    """The pipeline's handlers, in this process, as the workers would call them: each stage
    in turn, or the one a Route sends the run to."""
    run_id = run_id or uuid.uuid4()
    outputs: dict[str, Any] = {}
    runs = []
    consumers = {stage.consumes: stage for stage in pipeline.stages}
    stage: Stage | None = pipeline.stages[0]
    while stage is not None:
        run = Run(run_id, pipeline.name, stage.name, run_input, dict(outputs), 1)
        output = await stage.handler(run)  # type: ignore[misc]
        status = stage.produces
        if isinstance(output, Route):
            status, output = output.to, output.output
        outputs[stage.name] = output
        await _store_writes(run)
        runs.append(run)
        if stage.name == until:
            break
        stage = consumers.get(status)
    return outputs, runs


async def _store_writes(run: Run) -> None:
    """What the engine does with a stored output: the handler's writes (Run.write), committed
    together."""
    if run.writes:
        pool, _schema = await db.pool()
        async with pool.connection() as conn, conn.transaction():
            await execute_writes(conn, run.writes)
