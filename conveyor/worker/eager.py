"""Tasks whose first step runs at once, inside the callback that makes them.

A run handed over in a notification is read in the listener's reader callback; started as a
plain task, its handler would wait one more turn of the event loop, some 20 us on a CPU that
has just woken, and so would every stage of a run handed from worker to worker. Started here,
its handler runs, and a fast handler's result is on its way to the database, before the
callback returns.

Python 3.12 does this itself (asyncio.Task's eager_start). On 3.11 the first step runs here the
same way: in the task's context, with the task entered as the current one (asyncio.timeout and
current_task() see it), and the task then goes on from wherever that step stopped.
"""

from __future__ import annotations

import asyncio
import contextvars
import sys
from collections.abc import Coroutine, Generator
from typing import Any

if sys.version_info < (3, 12):  # what asyncio itself uses to run a task's step
    from asyncio.tasks import _enter_task, _leave_task  # type: ignore[attr-defined]

Task = asyncio.Task[Any]


def start_task(
    loop: asyncio.AbstractEventLoop, coro: Coroutine[Any, Any, Any]
) -> tuple[Task, bool]:
    """A task for `coro` that has already taken its first step, up to its first real wait (or
    to its end), and True. Called from inside another task: a task as create_task makes it,
    which has not started yet, and False."""
    if asyncio.current_task(loop) is not None:
        return loop.create_task(coro), False
    if sys.version_info >= (3, 12):
        return asyncio.Task(coro, loop=loop, eager_start=True), True  # type: ignore[call-arg,unused-ignore]
    context = contextvars.copy_context()
    rest = _AfterFirstStep(coro)
    # A Task, not loop.create_task: a task factory (an error reporter's) may wrap the coroutine
    # in one of its own, which would await this one; 3.12's eager start passes it by as well.
    task = asyncio.Task(rest, loop=loop, context=context)
    _enter_task(loop, task)
    try:
        context.run(rest.first_step)
    finally:
        _leave_task(loop, task)
    return task, True


class _AfterFirstStep(Coroutine[Any, Any, Any]):
    """What the task drives: `coro` from where its first step left it. The task's own first
    step receives what that step yielded (the future it waits for), returned or raised."""

    __slots__ = ("_coro", "_raised", "_returned", "_yielded")

    def __init__(self, coro: Coroutine[Any, Any, Any]) -> None:
        self._coro = coro
        self._yielded: Any = None
        self._returned: StopIteration | None = None
        self._raised: BaseException | None = None

    def first_step(self) -> None:
        try:
            self._yielded = self._coro.send(None)
        except StopIteration as stop:
            self._returned = stop
        except BaseException as exc:  # the task's to raise, as if in its own first step
            self._raised = exc

    def send(self, value: Any) -> Any:
        if self._returned is not None or self._raised is not None:
            return self._finished()
        yielded, self._yielded = self._yielded, None
        if yielded is not None:  # the task's first step: the future the coroutine waits for
            return yielded
        return self._coro.send(value)

    def throw(self, typ: Any, val: Any = None, tb: Any = None) -> Any:
        if self._returned is not None or self._raised is not None:
            return self._finished()  # done before the task first ran: nothing to interrupt
        yielded, self._yielded = self._yielded, None
        if (
            isinstance(yielded, asyncio.Future)
            and isinstance(typ, asyncio.CancelledError)
            and yielded.cancel(msg=typ.args[0] if typ.args else None)
        ):
            # Cancelled before the task took over the future its coroutine waits for: that
            # future is cancelled, as Task.cancel() would have, and the task waits for it. One
            # already done is not: the cancellation goes to the coroutine itself.
            return yielded
        if val is None and tb is None:
            return self._coro.throw(typ)
        return self._coro.throw(typ, val, tb)  # asyncio passes one argument

    def close(self) -> None:
        self._coro.close()

    def __await__(self) -> Generator[Any, None, Any]:
        raise TypeError("driven by its task only")

    def _finished(self) -> Any:
        returned, raised = self._returned, self._raised
        self._returned = self._raised = None
        if raised is not None:
            raise raised
        raise StopIteration(returned.value if returned is not None else None)
