"""A worker's per-run metrics, counted as they happen and written a moment later in one go.

In multiprocess mode every metric write is a locked write to a memory-mapped file: ~3-11 us each
on the 2-core machine, several times that on a CPU that has just woken up, and a run takes about
ten of them (claimed, in flight, wake-up latency, duration, completed...). None of that belongs
on the path from a run's notification to its completion (benchmarks, (d): with the listener's
standing reader, ~0.5 ms less over three stages). So the worker only counts here, and the
counts are written `WRITE_DELAY` seconds after the first one of a batch. Not sooner: the run
goes on to its next stage in other processes on the same few cores, and a write a couple of
milliseconds later lands on their path ((d), three stages: ~0.13 ms more end to end with writes
2 ms after the count than 0.1 s after). Under load one write covers many runs. Prometheus
scrapes every few seconds; a tenth of a second late is invisible.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from conveyor import metrics
from conveyor.metrics import WRITE_DELAY


class StageTally:
    def __init__(self, labels: tuple[str, str], in_flight: Callable[[], int]) -> None:
        self._in_flight = in_flight
        self._claimed_total = metrics.CLAIMED.labels(*labels)
        self._sweep_pickups_total = metrics.SWEEP_PICKUPS.labels(*labels)
        self._completed_total = metrics.COMPLETED.labels(*labels)
        self._retried_total = metrics.RETRIED.labels(*labels)
        self._failed_total = metrics.FAILED.labels(*labels)
        self._lease_losses_total = metrics.LEASE_LOSSES.labels(*labels)
        self._in_flight_gauge = metrics.IN_FLIGHT.labels(*labels)
        self._wakeup_latency = metrics.WAKEUP_LATENCY.labels(*labels)
        self._stage_duration = metrics.STAGE_DURATION.labels(*labels)
        self.claimed = 0
        self.sweep_pickups = 0
        self.completed = 0
        self.retried = 0
        self.failed = 0
        self.lease_losses = 0
        self.waits: list[float] = []
        self.durations: list[float] = []
        self._scheduled: asyncio.TimerHandle | None = None

    def soon(self) -> None:
        """Write what was counted shortly, once the loop has nothing more urgent; call after
        counting. Outside a running loop (tests, shutdown), write at once."""
        if self._scheduled is not None:
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            self.write()
            return
        self._scheduled = loop.call_later(WRITE_DELAY, self.write)

    def write(self) -> None:
        """Write everything counted so far (also at exit, so nothing counted is lost)."""
        if self._scheduled is not None:
            self._scheduled.cancel()
            self._scheduled = None
        waits, self.waits = self.waits, []
        durations, self.durations = self.durations, []
        metrics.observe_many(self._wakeup_latency, waits)
        metrics.observe_many(self._stage_duration, durations)
        for counter, amount in (
            (self._claimed_total, self.claimed),
            (self._sweep_pickups_total, self.sweep_pickups),
            (self._completed_total, self.completed),
            (self._retried_total, self.retried),
            (self._failed_total, self.failed),
            (self._lease_losses_total, self.lease_losses),
        ):
            if amount:
                counter.inc(amount)
        self.claimed = self.sweep_pickups = self.completed = 0
        self.retried = self.failed = self.lease_losses = 0
        self._in_flight_gauge.set(self._in_flight())
