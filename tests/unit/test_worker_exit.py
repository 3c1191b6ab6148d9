"""A helper task that loses its cancellation (Python 3.11's wait_for can) does not keep the
worker from exiting."""

from __future__ import annotations

import asyncio

from conveyor.worker.task_ends import cancelled


def test_a_task_that_swallowed_its_cancellation_is_cancelled_again() -> None:
    async def helper(swallowed: list[bool]) -> None:
        while True:
            try:
                await asyncio.sleep(10)
            except asyncio.CancelledError:
                if swallowed:
                    raise
                swallowed.append(True)  # as if wait_for had returned instead

    async def failing() -> None:
        raise RuntimeError("ended with an error before exit")

    async def scenario() -> tuple[bool, bool]:
        swallowed: list[bool] = []
        stubborn = asyncio.create_task(helper(swallowed))
        broken = asyncio.create_task(failing())
        await asyncio.sleep(0.01)
        stubborn.cancel()
        await asyncio.wait_for(cancelled([stubborn, broken]), timeout=5)
        return bool(swallowed), stubborn.cancelled()

    assert asyncio.run(scenario()) == (True, True)
