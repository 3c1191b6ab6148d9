"""Ending a worker's tasks for good."""

from __future__ import annotations

import asyncio

import structlog

from conveyor.db import brief

log = structlog.get_logger("conveyor.worker")


async def cancelled(tasks: list[asyncio.Task[None]]) -> None:
    """Wait for tasks that were just cancelled to end. Python 3.11's asyncio.wait_for (which
    psycopg_pool waits with) can lose a cancellation that lands as its wait completes: such a
    task would run on and the worker never exit. It is cancelled again instead."""
    pending = set(tasks)
    while pending:
        _, pending = await asyncio.wait(pending, timeout=1.0)
        for task in pending:
            task.cancel()
    for task in tasks:
        error = None if task.cancelled() else task.exception()
        if error is not None:  # it died before exit: say so, or nobody will ever know
            log.error("worker task ended with an error", task=task.get_name(), error=brief(error))
