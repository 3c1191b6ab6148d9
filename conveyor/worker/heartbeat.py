"""The heartbeat: keeps a worker's registry row and the leases of its runs fresh.

Every third of a lease it extends the leases of the runs in flight well before they expire,
interrupts the handlers whose run was taken away meanwhile (cancelled, or rescued), and beats
the registry row (the rescue tells a dead worker from a live one by it). A worker that replaces
a process that died also ends that process's leases, once, when it starts.
"""

from __future__ import annotations

import asyncio

import psycopg
from structlog.typing import FilteringBoundLogger

from conveyor.db import brief
from conveyor.protocol import StageProtocol
from conveyor.worker.database_errors import DB_ERRORS, DatabaseErrors
from conveyor.worker.dispatch import Dispatcher
from conveyor.worker.hand_offs import HandOffs
from conveyor.worker.in_flight import InFlight


class Heartbeat:
    def __init__(
        self,
        protocol: StageProtocol,
        *,
        lease_seconds: float,
        hand_offs: HandOffs,
        dispatcher: Dispatcher,
        in_flight: InFlight,
        errors: DatabaseErrors,
        log: FilteringBoundLogger,
    ) -> None:
        self._protocol = protocol
        self._period = lease_seconds / 3
        self._hand_offs = hand_offs
        self._dispatcher = dispatcher
        self._in_flight = in_flight
        self._errors = errors
        self._log = log

    async def beat_forever(self) -> None:
        while True:
            # Leases first: the beat waits for the registry lock, which a give-back holds until
            # its release has committed, and the runs in flight must not wait behind it.
            for operation, step in (("extend_leases", self._extend), ("heartbeat", self._beat)):
                try:
                    await step()
                except DB_ERRORS as exc:
                    self._log.warning("heartbeat failed", during=operation, error=brief(exc))
                except psycopg.Error as exc:  # it beats again on its own period: no extra wait
                    await self._errors.refused(operation, exc, back_off=False)
            await asyncio.sleep(self._period)

    async def _beat(self) -> None:
        await self._hand_offs.beat(lambda: self._dispatcher.free_slots)

    async def _extend(self) -> None:
        # Every run held, those whose results wait for their commit too: a completer that lags
        # behind (a slow or busy database) must not let their leases expire and have them
        # rescued and run again.
        held_before = list(self._in_flight.held | self._in_flight.tasks.keys())
        if not held_before:
            return
        held = await self._protocol.extend_leases(held_before)
        for run_id in set(held_before) - held:
            self._in_flight.take_away(run_id)

    async def end_dead_leases(self, dead_pid: int) -> None:
        """The process this one replaces died (killed, out of memory) and its runs are leased
        to it: end those leases now, so the rescue frees the runs within a sweep instead of a
        lease. Tried until the database answers; a refusal is logged, and the leases expire."""
        while True:
            try:
                ended = await self._protocol.end_dead_process_leases(dead_pid)
            except DB_ERRORS as exc:
                await self._errors.away("end_dead_process_leases", exc)
                continue
            except psycopg.Error as exc:
                await self._errors.refused("end_dead_process_leases", exc, back_off=False)
                return
            if ended:
                self._log.warning(
                    "ended the leases of a worker process that died", dead_pid=dead_pid, runs=ended
                )
            return
