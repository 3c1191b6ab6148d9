"""How many runs a worker asks for: few distinct sizes, never more than its free slots."""

from __future__ import annotations

import pytest

from conveyor.handler_run import Run
from conveyor.pipeline import Pipeline, Stage
from conveyor.protocol import StageProtocol


async def _noop(run: Run) -> dict[str, object]:
    return {}


def _protocol(batch: int, concurrency: int = 500) -> StageProtocol:
    stage = Stage(
        "only", _noop, consumes="NEW", produces="DONE", concurrency=concurrency, batch=batch
    )
    pipeline = Pipeline("p", [stage])
    return StageProtocol(
        None,  # type: ignore[arg-type]  # claim_size never touches the pool
        schema="conveyor",
        pipeline=pipeline,
        stage=stage,
        worker_id="w",
        lease_seconds=30.0,
    )


@pytest.mark.parametrize("batch", [1, 2, 7, 8, 50, 64, 100, 333])
def test_claim_sizes_fit_the_free_slots_and_stay_few(batch: int) -> None:
    protocol = _protocol(batch)
    sizes = set()
    for free in range(1, 3 * batch + 2):
        size = protocol.claim_size(free)
        assert 1 <= size <= min(free, batch)
        assert size > min(free, batch) // 2  # never less than half of what fits
        sizes.add(size)
    assert protocol.claim_size(batch) == batch
    assert protocol.claim_size(10 * batch) == batch
    # One prepared statement per size: a handful, not one per number of free slots.
    assert len(sizes) <= 8 + 1 + max(1, batch // 8).bit_length()


def test_an_idle_worker_with_fewer_slots_than_a_batch_fills_them_all() -> None:
    assert _protocol(batch=50, concurrency=10).claim_size(10) == 10
