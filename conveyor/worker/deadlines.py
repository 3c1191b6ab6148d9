"""Stage timeouts with one timer per slice of time, shared by every run due to expire in it.

asyncio.timeout arms and disarms a timer per run, which was the largest fixed cost of running a
fast handler. Here a run joins the set of its slice and leaves it when it ends; the slice's
timer cancels whoever is still in it. A deadline is honoured up to one slice late: a hundredth
of the timeout, between 1 ms and 100 ms (on uvloop, whose timers count whole milliseconds, up to
a millisecond early).
"""

from __future__ import annotations

import asyncio
import math
import weakref
from typing import Any

Task = asyncio.Task[Any]


class Deadlines:
    """The deadlines of one event loop's runs."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._slices: dict[float, set[Task]] = {}
        self._expired: set[Task] = set()

    def watch(self, task: Task, timeout: float) -> set[Task]:
        """Cancel `task` once `timeout` seconds have passed; give the result to `leave`."""
        slice_seconds = min(0.1, max(0.001, timeout / 100))
        ends = math.ceil((self._loop.time() + timeout) / slice_seconds) * slice_seconds
        tasks = self._slices.get(ends)
        if tasks is None:
            tasks = self._slices[ends] = set()
            self._loop.call_at(ends, self._expire, ends)
        tasks.add(task)
        return tasks

    def timed_out(self, task: Task) -> bool:
        """Called on CancelledError: whether this cancellation is the timeout and nothing else
        (then the task is no longer being cancelled)."""
        if task not in self._expired:
            return False
        self._expired.discard(task)
        return task.uncancel() == 0

    def leave(self, task: Task, tasks: set[Task]) -> None:
        tasks.discard(task)
        if task in self._expired:  # the handler swallowed the cancellation: take it back
            self._expired.discard(task)
            task.uncancel()

    def _expire(self, ends: float) -> None:
        for task in self._slices.pop(ends, ()):
            if task.cancel():
                self._expired.add(task)


_by_loop: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, Deadlines] = (
    weakref.WeakKeyDictionary()
)


def for_running_loop() -> Deadlines:
    loop = asyncio.get_running_loop()
    deadlines = _by_loop.get(loop)
    if deadlines is None:
        deadlines = _by_loop[loop] = Deadlines(loop)
    return deadlines
