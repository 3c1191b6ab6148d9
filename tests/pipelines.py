"""Pipelines for the tests. Handlers misbehave on request, through the run's input:

- "sleep": seconds each stage sleeps;
- "fail_times": raise on the first N attempts of stage "one";
- "always_fail": stage "one" always raises;
- "fail_with": stage "one" always raises RuntimeError with this message;
- "kill_first_attempt": stage "one" SIGKILLs its own worker on attempt 1;
- "kill_always": stage "one" SIGKILLs its own worker every time;
- "bad_output": stage "one" returns what jsonb cannot store ("nan", "nul") or what JSON cannot
  encode ("object").
"""

from __future__ import annotations

import asyncio
import os
import signal
from typing import Any

from conveyor import Backoff, Pipeline, Run, Stage


async def one(run: Run) -> dict[str, Any]:
    if run.input.get("always_fail"):
        raise RuntimeError(f"poison run {run.input.get('n')}")
    if run.input.get("fail_with"):
        raise RuntimeError(run.input["fail_with"])
    if run.attempt <= int(run.input.get("fail_times", 0)):
        raise ValueError(f"flaky failure on attempt {run.attempt}")
    if run.input.get("kill_always") or (run.input.get("kill_first_attempt") and run.attempt == 1):
        os.kill(os.getpid(), signal.SIGKILL)
    bad = run.input.get("bad_output")
    if bad:
        return {"nan": {"x": float("nan")}, "nul": {"x": "a\x00b"}, "object": {"x": object()}}[bad]
    await asyncio.sleep(float(run.input.get("sleep", 0)))
    return {"stage": "one", "n": run.input.get("n")}


async def two(run: Run) -> dict[str, Any]:
    await asyncio.sleep(float(run.input.get("sleep", 0)))
    return {"stage": "two", "seen": run.outputs["one"]["n"]}


def three(run: Run) -> dict[str, Any]:  # a sync handler: runs in a thread
    import time

    time.sleep(float(run.input.get("sleep", 0)))
    return {"stage": "three", "seen": run.outputs["two"]["seen"]}


_FAST_RETRY = Backoff(base=0.05, cap=0.2)

chain = Pipeline(
    "chain",
    [
        Stage(
            "one",
            one,
            consumes="NEW",
            working="ONE_RUNNING",
            produces="ONE_DONE",
            concurrency=20,
            max_attempts=3,
            backoff=_FAST_RETRY,
            timeout=30,
        ),
        Stage(
            "two",
            two,
            consumes="ONE_DONE",
            working="TWO_RUNNING",
            produces="TWO_DONE",
            concurrency=20,
            backoff=_FAST_RETRY,
        ),
        Stage(
            "three",
            three,
            consumes="TWO_DONE",
            working="THREE_RUNNING",
            produces="DONE",
            concurrency=8,
            backoff=_FAST_RETRY,
        ),
    ],
)
