"""A task started at once (conveyor/worker/eager.py) behaves as any task after its first step:
the step runs before start_task returns, as the current task and in the task's own context, and
the task then waits, returns, raises, times out and is cancelled like one create_task made, on
each loop a worker may run on."""

from __future__ import annotations

import asyncio
import contextvars
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any

import pytest

from conveyor import event_loop
from conveyor.event_loop import EVENT_LOOPS
from conveyor.worker.eager import start_task

pytestmark = pytest.mark.parametrize("loop_name", EVENT_LOOPS)

where: contextvars.ContextVar[str] = contextvars.ContextVar("where", default="outside")


def _from_callback(
    make: Callable[[], Coroutine[Any, Any, Any]],
) -> Awaitable[tuple[asyncio.Task[Any], bool]]:
    """start_task as the listener calls it: from a loop callback, outside any task."""
    loop = asyncio.get_running_loop()
    started: asyncio.Future[tuple[asyncio.Task[Any], bool]] = loop.create_future()
    loop.call_soon(lambda: started.set_result(start_task(loop, make())))
    return started


def test_the_first_step_runs_before_start_task_returns_and_the_task_goes_on(loop_name: str) -> None:
    steps: list[str] = []

    async def scenario() -> None:
        gate = asyncio.get_running_loop().create_future()

        async def work() -> str:
            steps.append("first")
            await gate
            steps.append("second")
            return "done"

        loop = asyncio.get_running_loop()
        seen: list[list[str]] = []

        def start() -> None:
            task, started = start_task(loop, work())
            seen.append(list(steps))  # what had run when start_task returned
            box.append((task, started))

        box: list[tuple[asyncio.Task[Any], bool]] = []
        loop.call_soon(start)
        await asyncio.sleep(0)
        task, started = box[0]
        assert started and seen == [["first"]] and not task.done()
        await asyncio.sleep(0.01)
        assert steps == ["first"]  # still waiting
        gate.set_result(None)
        assert await task == "done"
        assert steps == ["first", "second"]

    event_loop.run(scenario(), loop_name)


def test_the_first_step_runs_as_the_current_task_in_its_own_context(loop_name: str) -> None:
    async def scenario() -> None:
        inside: list[object] = []

        async def work() -> None:
            where.set("inside")
            inside.append(asyncio.current_task())
            async with asyncio.timeout(5):  # needs the current task
                await asyncio.sleep(0)
            inside.append(where.get())

        task, started = await _from_callback(work)
        await task
        assert started and inside == [task, "inside"]
        assert where.get() == "outside"  # the task's context is its own

    event_loop.run(scenario(), loop_name)


def test_a_coroutine_that_ends_in_its_first_step_ends_its_task(loop_name: str) -> None:
    async def scenario() -> None:
        async def quick() -> int:
            return 7

        async def broken() -> None:
            raise ValueError("bad")

        task, started = await _from_callback(quick)
        assert started and await task == 7
        failing, _ = await _from_callback(broken)
        with pytest.raises(ValueError, match="bad"):
            await failing

    event_loop.run(scenario(), loop_name)


def test_a_task_started_at_once_is_cancelled_and_times_out_like_any_other(loop_name: str) -> None:
    async def scenario() -> None:
        cleaned: list[str] = []

        async def waits_forever() -> None:
            try:
                await asyncio.Event().wait()
            finally:
                cleaned.append("forever")

        async def times_out() -> str:
            try:
                async with asyncio.timeout(0.01):
                    await asyncio.sleep(5)
            except TimeoutError:
                return "timed out"
            return "not timed out"

        # Cancelled in the callback that started it, before the task took over what its
        # coroutine waits for (that is cancelled too, as a plain task's would be), and later.
        loop = asyncio.get_running_loop()
        inner = loop.create_task(asyncio.sleep(5))

        async def waits_on_inner() -> None:
            try:
                await inner
            finally:
                cleaned.append("inner")

        at_once: list[asyncio.Task[Any]] = []

        def start_and_cancel() -> None:
            task, _ = start_task(loop, waits_on_inner())
            task.cancel()
            at_once.append(task)

        loop.call_soon(start_and_cancel)
        late, _ = await _from_callback(waits_forever)
        await asyncio.sleep(0.01)
        late.cancel()
        for task in (at_once[0], late):
            with pytest.raises(asyncio.CancelledError):
                await task
        assert inner.cancelled()
        assert sorted(cleaned) == ["forever", "inner"]
        timing, _ = await _from_callback(times_out)
        assert await timing == "timed out"

    event_loop.run(scenario(), loop_name)


def test_inside_another_task_it_is_a_plain_task_not_yet_started(loop_name: str) -> None:
    async def scenario() -> None:
        steps: list[str] = []

        async def work() -> None:
            steps.append("ran")

        task, started = start_task(asyncio.get_running_loop(), work())  # in this test's task
        assert not started and steps == []
        await task
        assert steps == ["ran"]

    event_loop.run(scenario(), loop_name)


def test_a_cancel_that_comes_after_the_awaited_future_is_done_still_reaches_the_coroutine(
    loop_name: str,
) -> None:
    async def scenario() -> None:
        loop = asyncio.get_running_loop()
        ready: asyncio.Future[None] = loop.create_future()
        seen: list[str] = []

        async def work() -> None:
            try:
                await ready
                seen.append("went on")
            except asyncio.CancelledError:
                seen.append("cancelled")
                raise

        started: list[asyncio.Task[Any]] = []

        def start_then_cancel() -> None:
            task, _ = start_task(loop, work())
            ready.set_result(None)  # done before the task took it over: not cancellable
            task.cancel()
            started.append(task)

        loop.call_soon(start_then_cancel)
        await asyncio.sleep(0.01)
        assert started[0].cancelled() and seen == ["cancelled"]

    event_loop.run(scenario(), loop_name)
