"""Pipelines that are not lines, for the tests of routing and fan-out
(CONVEYOR_PIPELINE=tests.shapes.pipelines:...)."""

from __future__ import annotations

import asyncio

from conveyor import FanOut, PermanentError, Pipeline, Route, Run, Stage


async def triage(run: Run) -> Route:
    """Sends each run to the branch its input names: a, b, c; anything else is not declared."""
    kind = run.input.get("kind")
    target = {"a": "TO_A", "b": "TO_B", "c": "TO_C"}.get(kind, f"TO_{str(kind).upper()}")
    return Route(target, {"kind": kind})


def branch(name: str) -> Stage:
    async def handle(run: Run) -> dict[str, str]:
        return {"branch": name}

    return Stage(name, handle, consumes=f"TO_{name.upper()}", produces="DONE")


router = Pipeline(
    "router",
    [
        Stage("triage", triage, consumes="NEW", produces="TO_A", routes=["TO_B", "TO_C"]),
        branch("a"),
        branch("b"),
        branch("c"),
    ],
)


async def draft(run: Run) -> dict[str, int]:
    return {"version": run.outputs.get("draft", {}).get("version", 0) + 1}


async def review(run: Run) -> Route | dict[str, bool]:
    """Approves a draft once it reaches the input's `approve_at` version; sends it back to be
    drafted again before that (a loop: draft runs at most 3 times)."""
    version = run.outputs["draft"]["version"]
    if version >= run.input["approve_at"]:
        return {"approved": True}
    return Route("NEW", {"approved": False, "version": version})


loop = Pipeline(
    "loop",
    [
        Stage("draft", draft, consumes="NEW", produces="DRAFTED", max_visits=3),
        Stage("review", review, consumes="DRAFTED", produces="DONE", routes=["NEW"]),
    ],
)


async def split(run: Run) -> FanOut:
    """One child per number below the input's `width`; those listed in `fail` fail at once,
    the others first sleep the input's `sleep` seconds (children still running)."""
    width = int(run.input["width"])
    failing = set(run.input.get("fail", []))
    sleep = float(run.input.get("sleep", 0))
    return FanOut(
        [
            {"n": n, "fail": n in failing, "sleep": 0 if n in failing else sleep}
            for n in range(width)
        ],
        {"width": width},
    )


async def square(run: Run) -> dict[str, int]:
    await asyncio.sleep(float(run.input.get("sleep", 0)))
    if run.input.get("fail"):
        raise PermanentError(f"child {run.input['n']} refuses")
    return {"square": int(run.input["n"]) ** 2}


async def gather(run: Run) -> dict[str, object]:
    return {
        "indexes": [child.index for child in run.children],
        "squares": [child.outputs.get("square", {}).get("square") for child in run.children],
        "failed": [child.index for child in run.children if not child.succeeded],
        "errors": [child.error for child in run.children if not child.succeeded],
    }


def _fan(name: str, on_child_failure: str) -> Pipeline:
    return Pipeline(
        name,
        [
            Stage(
                "split",
                split,
                consumes="NEW",
                produces="SPLIT",
                fan_out="PART",
                on_child_failure=on_child_failure,
            ),
            Stage("square", square, consumes="PART", produces="DONE", concurrency=20),
            Stage("gather", gather, consumes="SPLIT", produces="GATHERED"),
        ],
    )


fan = _fan("fan", "fail")
fan_join = _fan("fan_join", "join")


async def split_once(run: Run) -> FanOut:
    """Fans out on the first visit only; sent back by its join, it creates no children."""
    if "gather" in run.outputs:
        return FanOut([], {"width": 0})
    return await split(run)


async def gather_then_again(run: Run) -> Route | dict[str, object]:
    """Joins, and the first time sends the run back to fan out again."""
    joined = await gather(run)
    if "gather" not in run.outputs:
        return Route("NEW", joined)
    return joined


fan_again = Pipeline(
    "fan_again",
    [
        Stage("split", split_once, consumes="NEW", produces="SPLIT", fan_out="PART"),
        Stage("square", square, consumes="PART", produces="DONE"),
        Stage("gather", gather_then_again, consumes="SPLIT", produces="GATHERED", routes=["NEW"]),
    ],
)
