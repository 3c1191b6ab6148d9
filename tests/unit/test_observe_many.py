"""A batch observed at once reads exactly as the same amounts observed one by one."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Histogram, generate_latest

from conveyor.metrics import observe_many

BUCKETS = (0.001, 0.01, 0.1, 1.0)
# on the bounds, between them, below the first, above the last (+Inf)
AMOUNTS = [0.0, 0.001, 0.0010001, 0.005, 0.01, 0.5, 1.0, 1.5, 250.0, 0.0999999]


def _exposition(record: str) -> bytes:
    registry = CollectorRegistry()
    histogram = Histogram("h_seconds", "h", ["stage"], buckets=BUCKETS, registry=registry)
    child = histogram.labels("s")
    if record == "batch":
        observe_many(child, AMOUNTS)
        observe_many(child, [])
    else:
        for amount in AMOUNTS:
            child.observe(amount)
    return b"\n".join(
        line for line in generate_latest(registry).splitlines() if b"_created" not in line
    )


def test_a_batch_reads_as_single_observations() -> None:
    batch, single = _exposition("batch"), _exposition("single")
    assert batch == single
    assert b'h_seconds_bucket{le="0.01",stage="s"} 5.0' in batch
    assert b'h_seconds_count{stage="s"} 10.0' in batch
