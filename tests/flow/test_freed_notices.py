"""Places given back under a cap are announced from a task of their own, at most every
FREED_NOTICE_SECONDS, and a worker that exits sends the one still waiting for its time."""

from __future__ import annotations

import asyncio
import time

import psycopg
from psycopg_pool import AsyncConnectionPool

from conveyor import Pipeline, Run, Stage
from conveyor.flow_control import FlowControl
from conveyor.settings import Settings


async def _noop(run: Run) -> dict[str, object]:
    return {}


PIPELINE = Pipeline("freed", [Stage("capped", _noop, "NEW", "DONE", max_in_flight=2)])
CHANNEL = "conveyor_test_freed"


async def _declared(pool: AsyncConnectionPool) -> FlowControl:
    """The capped stage's flow control, its limits written as a worker's first claim does."""
    flow = FlowControl(
        pool, settings=Settings(), pipeline=PIPELINE, stage=PIPELINE.stages[0], channel=CHANNEL
    )
    async with pool.connection() as conn, conn.transaction():
        await flow.declare_on(conn)
    return flow


def test_a_notice_waiting_for_its_time_is_sent_when_the_worker_exits(database_url: str) -> None:
    async def scenario() -> None:
        async with AsyncConnectionPool(
            database_url, kwargs={"autocommit": True}, open=False
        ) as pool:
            flow = await _declared(pool)
            flow.places_freed()  # sent at once, from a task of its own
            for _ in range(5000):
                await asyncio.sleep(0.001)
                if flow._freed_notice is None:
                    break
            else:
                raise AssertionError("the first notice was never sent")
            flow._next_freed_notice = time.monotonic() + 60  # the next one's time is far off
            flow.places_freed()
            waiting = flow._freed_notice
            assert isinstance(waiting, asyncio.TimerHandle)
            assert waiting.when() > asyncio.get_running_loop().time() + 30
            await flow.finish_freed_notices()  # the worker exits: sent now, not in a minute
            assert waiting.cancelled() and flow._freed_notice is None

    with psycopg.connect(database_url, autocommit=True) as listener:
        listener.execute(f"LISTEN {CHANNEL}")
        asyncio.run(scenario())
        heard = list(listener.notifies(timeout=1, stop_after=2))
    assert [n.channel for n in heard] == [CHANNEL, CHANNEL]


def test_places_freed_while_a_notice_is_under_way_make_one_more_notice(
    database_url: str,
) -> None:
    async def scenario() -> None:
        async with AsyncConnectionPool(
            database_url, min_size=1, max_size=1, kwargs={"autocommit": True}, open=False
        ) as pool:
            flow = await _declared(pool)
            async with pool.connection():  # the notice waits for the pool's one connection
                flow.places_freed()
                for _ in range(5):  # places freed again, each past FREED_NOTICE_SECONDS
                    await asyncio.sleep(0.06)
                    flow.places_freed()
                assert isinstance(flow._freed_notice, asyncio.Task)
            await flow.finish_freed_notices()

    with psycopg.connect(database_url, autocommit=True) as listener:
        listener.execute(f"LISTEN {CHANNEL}")
        asyncio.run(scenario())
        heard = list(listener.notifies(timeout=1, stop_after=10))
    assert len(heard) == 2  # the one under way, and one for the places freed meanwhile
