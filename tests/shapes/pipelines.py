"""Pipelines that are not lines, for the tests of routing (CONVEYOR_PIPELINE=tests.shapes...)."""

from __future__ import annotations

from conveyor import Pipeline, Route, Run, Stage


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
