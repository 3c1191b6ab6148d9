"""The sweep: a claim on a jittered timer even without a notification, the bound on anything a
lost notification leaves. While the listener is down or unproven the sweep tightens to at most
a second. Its loop also turns the supervisor's liveness probe."""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Callable

from conveyor.listening import Listener
from conveyor.worker.liveness import LivenessSlot

# The supervisor's liveness probe wants to see the loop turn at least this often.
LIVENESS_TICK = 1.0


class SweepTimer:
    def __init__(
        self,
        listener: Listener,
        *,
        sweep_interval: float,
        sweep: Callable[[], None],
        liveness: LivenessSlot | None,
    ) -> None:
        self._listener = listener
        self._sweep_interval = sweep_interval
        self._sweep = sweep
        self._liveness = liveness
        self._next_sweep_at = 0.0

    async def run_forever(self) -> None:
        while True:
            healthy = self._listener.connected.is_set()
            if self._liveness is not None:
                self._liveness.tick()
                self._liveness.set_listening(healthy)
            await asyncio.sleep(min(self._interval(healthy), LIVENESS_TICK))
            # As the listener is now: one that has just connected does not tighten the sweep.
            healthy = self._listener.connected.is_set()
            interval = self._interval(healthy)
            if time.monotonic() >= self._next_sweep_at or not healthy:
                self._next_sweep_at = time.monotonic() + interval
                self._sweep()

    def _interval(self, healthy: bool) -> float:
        """The sweep interval, jittered by 20% either way; at most a second while the listener
        is down or unproven."""
        interval = self._sweep_interval if healthy else min(self._sweep_interval, 1.0)
        return interval * random.uniform(0.8, 1.2)
