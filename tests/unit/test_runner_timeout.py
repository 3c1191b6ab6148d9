"""The stage timeout of run_handler (shared per-slice timers, conveyor/worker/deadlines.py), on
each loop a worker may run on."""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

import pytest

from conveyor import event_loop
from conveyor.event_loop import EVENT_LOOPS
from conveyor.handler_run import Run
from conveyor.pipeline import Stage
from conveyor.results import Failure, Success
from conveyor.worker.runner import run_handler

pytestmark = pytest.mark.parametrize("loop_name", EVENT_LOOPS)


def _run() -> Run:
    return Run(uuid.uuid4(), "p", "s", {}, {}, attempt=1)


def _stage(handler: Any, timeout: float) -> Stage:
    return Stage("s", handler, consumes="NEW", produces="DONE", timeout=timeout, max_attempts=3)


def test_a_slow_handler_fails_with_the_timeout_and_fast_ones_complete(loop_name: str) -> None:
    async def handler(run: Run) -> dict[str, Any]:
        await asyncio.sleep(run.input.get("sleep", 0))
        return {"ok": True}

    async def scenario() -> list[Success | Failure]:
        stage = _stage(handler, timeout=0.2)
        slow, fast = _run(), _run()
        slow.input["sleep"] = 5
        return list(
            await asyncio.gather(
                asyncio.create_task(run_handler(stage, slow)),
                *(asyncio.create_task(run_handler(stage, fast)) for _ in range(50)),
            )
        )

    slow, *fast = event_loop.run(scenario(), loop_name)
    assert isinstance(slow, Failure)  # not after its 5 s: the timeout cut it short
    assert slow.error == "TimeoutError: stage 's' timed out after 0.2s"
    assert slow.retry_in is not None and slow.duration >= 0.2  # never before the deadline
    assert all(isinstance(o, Success) and o.output_json == '{"ok": true}' for o in fast)


def test_another_cancellation_is_not_taken_for_the_timeout(loop_name: str) -> None:
    async def handler(run: Run) -> None:
        await asyncio.sleep(5)

    async def scenario() -> bool:
        task = asyncio.create_task(run_handler(_stage(handler, timeout=0.1), _run()))
        await asyncio.sleep(0.01)
        task.cancel()  # the worker takes the run away
        try:
            await task
        except asyncio.CancelledError:
            return True
        return False

    assert event_loop.run(scenario(), loop_name)


def test_a_handler_that_swallows_the_cancellation_leaves_its_task_usable(loop_name: str) -> None:
    async def handler(run: Run) -> str:
        try:
            await asyncio.sleep(5)
        except asyncio.CancelledError:
            return {"r": "swallowed"}
        return "slept"

    async def scenario() -> tuple[Success | Failure, int]:
        outcome = await run_handler(_stage(handler, timeout=0.05), _run())
        task = asyncio.current_task()
        assert task is not None
        await asyncio.sleep(0.01)  # not cancelled any more
        return outcome, task.cancelling()

    outcome, cancelling = event_loop.run(scenario(), loop_name)
    assert isinstance(outcome, Success) and outcome.output_json == '{"r": "swallowed"}'
    assert cancelling == 0
