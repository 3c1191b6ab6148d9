"""No-op pipelines for the benchmarks: handlers that cost nothing, so figures are the engine's."""

from __future__ import annotations

from typing import Any

from conveyor import FanOut, Limit, Pipeline, Run, Stage


async def noop(run: Run) -> dict[str, Any]:
    return {}


single = Pipeline(
    "bench1", [Stage("only", noop, consumes="NEW", produces="DONE", concurrency=100, batch=50)]
)


def _limited(**flow: Any) -> Pipeline:
    """(a)'s pipeline with flow control that never binds: limits far above what one worker
    moves, so every claim pays their bookkeeping and is never held back."""
    stage = Stage("only", noop, consumes="NEW", produces="DONE", concurrency=100, batch=50, **flow)
    return Pipeline("bench1", [stage])


_NEVER_BINDING_RATE = Limit("bench:never-binding", requests_per_minute=1e9)
# one limit, as a stage that calls a model declares it: a key with a rate
single_rate_limited = _limited(limits=[_NEVER_BINDING_RATE])
# two: a stage cap as well
single_limited = _limited(limits=[_NEVER_BINDING_RATE], max_in_flight=1_000_000)


three = Pipeline(
    "bench3",
    [
        Stage("s1", noop, consumes="NEW", produces="S1_DONE", concurrency=100, batch=50),
        Stage("s2", noop, consumes="S1_DONE", produces="S2_DONE", concurrency=100, batch=50),
        Stage("s3", noop, consumes="S2_DONE", produces="DONE", concurrency=100, batch=50),
    ],
)


# Fan-out (python -m benchmarks.fan_out): one parent splits into input["width"] no-op children,
# whose join only counts them.
async def split(run: Run) -> FanOut:
    width = int(run.input["width"])
    return FanOut([{"n": n} for n in range(width)], {"width": width})


async def join(run: Run) -> dict[str, int]:
    return {
        "children": len(run.children),
        "failed": sum(1 for child in run.children if not child.succeeded),
    }


fan = Pipeline(
    "fanbench",
    [
        Stage("split", split, consumes="NEW", produces="SPLIT", fan_out="PART"),
        Stage("child", noop, consumes="PART", produces="DONE", concurrency=100, batch=50),
        Stage("join", join, consumes="SPLIT", produces="JOINED"),
    ],
)
