"""A worker's per-run metrics are written a moment after they are counted, all of them, and
whatever is still counted when the worker exits is written then."""

from __future__ import annotations

import asyncio
import uuid

from prometheus_client import REGISTRY

from conveyor import metrics
from conveyor.worker.tally import WRITE_DELAY, StageTally


def _read(name: str, labels: dict[str, str]) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


def test_counts_are_written_shortly_after_and_at_exit() -> None:
    stage = {"pipeline": f"p-{uuid.uuid4().hex[:8]}", "stage": "s"}
    labels = (stage["pipeline"], stage["stage"])
    metrics.prepare_stage(*labels)
    in_flight = [2]

    async def scenario() -> list[tuple[float, ...]]:
        tally = StageTally(labels, lambda: in_flight[0])
        tally.claimed += 3
        tally.waits.extend([0.001, 0.002, 0.003])
        tally.soon()
        tally.completed += 1
        tally.durations.append(0.5)
        tally.soon()  # the write already scheduled covers this too
        seen = [_counts()]  # counted, not written yet
        await asyncio.sleep(WRITE_DELAY * 5)
        seen.append(_counts())
        tally.failed += 1
        tally.lease_losses += 2
        in_flight[0] = 0
        tally.soon()
        tally.write()  # at exit: now, and the scheduled write is dropped
        seen.append(_counts())
        await asyncio.sleep(WRITE_DELAY * 5)
        seen.append(_counts())
        return seen

    def _counts() -> tuple[float, ...]:
        return (
            _read("conveyor_runs_claimed_total", stage),
            _read("conveyor_wakeup_latency_seconds_count", stage),
            _read("conveyor_runs_completed_total", stage),
            _read("conveyor_stage_duration_seconds_sum", stage),
            _read("conveyor_runs_failed_total", stage),
            _read("conveyor_lease_losses_total", stage),
            _read("conveyor_runs_in_flight", stage),
        )

    before, later, at_exit, after_exit = asyncio.run(scenario())
    assert before == (0, 0, 0, 0, 0, 0, 0)
    assert later == (3, 3, 1, 0.5, 0, 0, 2)
    assert at_exit == (3, 3, 1, 0.5, 1, 2, 0)
    assert after_exit == at_exit  # each count written once
