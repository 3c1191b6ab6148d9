"""Places given back under a cap are announced from a task of their own, at most every
FREED_NOTICE_SECONDS, and a worker that exits sends the one still waiting for its time."""

from __future__ import annotations

import asyncio

import psycopg
from psycopg_pool import AsyncConnectionPool

from conveyor import Pipeline, Run, Stage
from conveyor.flow_control import FlowControl
from conveyor.settings import Settings


async def _noop(run: Run) -> dict[str, object]:
    return {}


PIPELINE = Pipeline("freed", [Stage("capped", _noop, "NEW", "DONE", max_in_flight=2)])
CHANNEL = "conveyor_test_freed"


def test_a_notice_waiting_for_its_time_is_sent_when_the_worker_exits(database_url: str) -> None:
    async def scenario() -> None:
        async with AsyncConnectionPool(
            database_url, kwargs={"autocommit": True}, open=False
        ) as pool:
            flow = FlowControl(
                pool,
                settings=Settings(),
                pipeline=PIPELINE,
                stage=PIPELINE.stages[0],
                channel=CHANNEL,
            )
            async with pool.connection() as conn, conn.transaction():
                await flow.declare_on(conn)
            flow.places_freed()  # sent at once, from a task of its own
            for _ in range(100):
                await asyncio.sleep(0.001)
                if not flow._background and flow._freed_notice_pending is None:
                    break
            flow.places_freed()  # too soon after the first: waits for its time
            assert flow._freed_notice_pending is not None
            await flow.finish_freed_notices()  # the worker exits: sent now

    with psycopg.connect(database_url, autocommit=True) as listener:
        listener.execute(f"LISTEN {CHANNEL}")
        asyncio.run(scenario())
        heard = list(listener.notifies(timeout=1, stop_after=2))
    assert [n.channel for n in heard] == [CHANNEL, CHANNEL]
