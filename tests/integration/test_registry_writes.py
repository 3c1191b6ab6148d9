"""A worker writes its registry row from the dispatcher, the heartbeat and its give-backs at
once, each over a connection of its own. Whatever order they commit in, the row ends up saying
what the worker is: a worker that waits is on the waiting list, or no run is handed to it and no
wake-up reaches it until its next sweep."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
import structlog
from psycopg_pool import AsyncConnectionPool

from conveyor import Pipeline, Run, Stage
from conveyor.listening import Listener
from conveyor.protocol import StageProtocol
from conveyor.worker.database_errors import DatabaseErrors
from conveyor.worker.hand_offs import HandOffs
from tests.helpers import scalar


async def _noop(run: Run) -> dict[str, object]:
    return {}


PIPELINE = Pipeline("registry", [Stage("only", _noop, "NEW", "DONE")])
CHANNEL = "conveyor_test_registry"
WORKER = "only-1-registry"
LABELS = ("registry", "only")


def _registry_row(url: str) -> tuple[bool, int]:
    waiting = scalar(url, "SELECT waiting FROM conveyor.workers WHERE worker_id = %s", (WORKER,))
    free = scalar(url, "SELECT free_slots FROM conveyor.workers WHERE worker_id = %s", (WORKER,))
    return bool(waiting), int(free)


@pytest.mark.parametrize("arming", [True, False])
def test_the_heartbeat_and_the_dispatcher_never_leave_the_row_behind_the_worker(
    database_url: str, arming: bool
) -> None:
    """The heartbeat beats while the dispatcher arms (or disarms) the worker: the row the
    last commit leaves is the worker's state, 40 times over."""
    log: Any = structlog.get_logger()

    async def scenario() -> list[tuple[bool, int, bool, int]]:
        listener = Listener(database_url, CHANNEL, lambda payload: None, health_interval=60)
        listening = asyncio.create_task(listener.run())
        async with AsyncConnectionPool(
            database_url, min_size=3, max_size=3, kwargs={"autocommit": True}, open=False
        ) as pool:
            stopping = asyncio.Event()
            protocol = StageProtocol(
                pool,
                schema="conveyor",
                pipeline=PIPELINE,
                stage=PIPELINE.stages[0],
                worker_id=WORKER,
                lease_seconds=30,
            )
            hand_offs = HandOffs(
                WORKER,
                protocol,
                listener=listener,
                errors=DatabaseErrors(
                    pool=pool,
                    listener=listener,
                    stopping=stopping,
                    sweep_interval=5,
                    labels=LABELS,
                    log=log,
                ),
                held=set(),
                channel=CHANNEL,
                ttl_seconds=30,
                stopping=stopping,
                wake=asyncio.Event(),
                labels=LABELS,
                log=log,
            )
            await asyncio.wait_for(listener.connected.wait(), 10)
            seen = []
            for _ in range(40):
                await hand_offs.set_waiting(not arming, 3)  # where the worker starts from
                await asyncio.gather(hand_offs.set_waiting(arming, 3), hand_offs.beat(3))
                waiting, free = await asyncio.to_thread(_registry_row, database_url)
                seen.append((waiting, free, hand_offs.armed, hand_offs.free_reported))
        listening.cancel()
        await listener.close()
        return seen

    seen = asyncio.run(scenario())
    assert {(armed, free) for _, _, armed, free in seen} == {(arming, 3 if arming else 0)}
    assert [(waiting, free) for waiting, free, _, _ in seen] == [
        (armed, free) for _, _, armed, free in seen
    ]
