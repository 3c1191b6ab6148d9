"""No-op pipelines for the benchmarks: handlers that cost nothing, so figures are the engine's."""

from __future__ import annotations

from typing import Any

from conveyor import Pipeline, Run, Stage


async def noop(run: Run) -> dict[str, Any]:
    return {}


single = Pipeline(
    "bench1", [Stage("only", noop, consumes="NEW", produces="DONE", concurrency=100, batch=50)]
)

three = Pipeline(
    "bench3",
    [
        Stage("s1", noop, consumes="NEW", produces="S1_DONE", concurrency=100, batch=50),
        Stage("s2", noop, consumes="S1_DONE", produces="S2_DONE", concurrency=100, batch=50),
        Stage("s3", noop, consumes="S2_DONE", produces="DONE", concurrency=100, batch=50),
    ],
)
