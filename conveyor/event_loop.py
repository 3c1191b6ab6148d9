"""The event loop a worker, maintenance or console process runs on (CONVEYOR_EVENT_LOOP).

`uvloop` (the default) is asyncio's interface on libuv: the loop's own work (polling, timers,
callbacks) runs in C, and a run handed over to an idle worker spends less of its way through
the worker in it. `asyncio` is the standard library's loop, for handler code that needs it."""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Any, TypeVar

EVENT_LOOPS = ("uvloop", "asyncio")

T = TypeVar("T")


def run(main: Coroutine[Any, Any, T], event_loop: str) -> T:
    """Run `main` to its end on a new loop of the kind named (one of EVENT_LOOPS), as
    asyncio.run does: remaining tasks cancelled, async generators and executors shut down."""
    if event_loop == "asyncio":
        return asyncio.run(main)
    import uvloop

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(main)


def running_loop_name() -> str:
    """The kind of the running loop, for the start-up log lines."""
    loop = asyncio.get_running_loop()
    return "uvloop" if type(loop).__module__.startswith("uvloop") else "asyncio"
