"""A pipeline whose handlers log, with structlog and with the standard library, from an async
handler and from a sync one (run in a thread): their lines must carry the run's context."""

from __future__ import annotations

import asyncio
import logging
import os
from typing import Any

import structlog

from conveyor import Pipeline, Run, Stage

log = structlog.get_logger("tests.handler")
stdlib_log = logging.getLogger("tests.handler.stdlib")


async def first(run: Run) -> dict[str, Any]:
    log.info("async handler working")
    stdlib_log.warning("async handler warns through the standard library")
    await asyncio.sleep(float(run.input.get("sleep", 0)))
    if run.input.get("leak_url"):
        # A careless handler: its error message quotes the database URL with its password.
        raise RuntimeError(f"cannot reach {os.environ['CONVEYOR_DATABASE_URL']}")
    return {"seen": run.input.get("n")}


def second(run: Run) -> dict[str, Any]:
    log.info("sync handler working")
    stdlib_log.warning("sync handler warns through the standard library")
    return {"seen": run.outputs["first"]["seen"]}


logged = Pipeline(
    "logged",
    [
        Stage("first", first, consumes="NEW", produces="FIRST_DONE", max_attempts=1),
        Stage("second", second, consumes="FIRST_DONE", produces="DONE"),
    ],
)
