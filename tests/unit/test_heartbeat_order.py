"""The heartbeat extends the leases of the runs in flight before it beats the registry row:
the beat waits for the registry lock, which a give-back holds until its release has committed,
and the runs must not wait behind it."""

from __future__ import annotations

import asyncio
import uuid
from typing import Any, cast

from conveyor.worker.heartbeat import Heartbeat


class _Protocol:
    def __init__(self) -> None:
        self.extended: list[list[uuid.UUID]] = []

    async def extend_leases(self, run_ids: list[uuid.UUID]) -> set[uuid.UUID]:
        self.extended.append(run_ids)
        return set(run_ids)


class _HandOffs:
    def __init__(self) -> None:
        self.registry_lock = asyncio.Lock()
        self.beats = 0

    async def beat(self, free_slots: Any) -> None:
        async with self.registry_lock:
            self.beats += 1


class _InFlight:
    def __init__(self, run_id: uuid.UUID) -> None:
        self.held = {run_id}
        self.tasks: dict[uuid.UUID, Any] = {}

    def take_away(self, run_id: uuid.UUID) -> None:
        raise AssertionError("nothing is taken away")


def test_leases_are_extended_while_the_registry_lock_is_held() -> None:
    async def scenario() -> None:
        run_id = uuid.uuid4()
        protocol, hand_offs = _Protocol(), _HandOffs()
        heartbeat = Heartbeat(
            cast(Any, protocol),
            lease_seconds=3.0,
            hand_offs=cast(Any, hand_offs),
            dispatcher=cast(Any, None),
            in_flight=cast(Any, _InFlight(run_id)),
            errors=cast(Any, None),
            log=cast(Any, None),
        )
        async with hand_offs.registry_lock:  # a give-back's release under way
            beating = asyncio.create_task(heartbeat.beat_forever())
            async with asyncio.timeout(5):
                while not protocol.extended:
                    await asyncio.sleep(0.001)
            assert protocol.extended == [[run_id]]
            assert hand_offs.beats == 0  # the beat waits for the lock
        async with asyncio.timeout(5):
            while hand_offs.beats == 0:
                await asyncio.sleep(0.001)
        beating.cancel()

    asyncio.run(scenario())
