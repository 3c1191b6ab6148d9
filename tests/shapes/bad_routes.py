"""A pipeline whose route names a status no stage consumes: `conveyor run` refuses it."""

from __future__ import annotations

from conveyor import Pipeline, Run, Stage


async def _noop(run: Run) -> dict[str, object]:
    return {}


pipeline = Pipeline("bad", [Stage("only", _noop, "NEW", "DONE", routes=["NOWHERE"])])
