"""A run routed back to its own stage can be claimed again by the same worker before the batch
that applied its result has returned to the completer. The completer must not then let go of
the new attempt: a run missing from `held` while its handler runs would be released as a
lease the worker never heard of (HandOffs.release_unheard) and run twice."""

from __future__ import annotations

import asyncio
import time
import uuid
from typing import Any, cast

import psycopg
import pytest

from conveyor import metrics
from conveyor.results import Applied, Failure, Success
from conveyor.worker.completer import Completer
from conveyor.worker.tally import StageTally
from tests.helpers import unstarted_worker


class _Protocol:
    async def apply(self, successes: list[Success], failures: list[Failure]) -> Applied:
        return Applied(len(successes), 0, 0, 0)


class _Log:
    def __getattr__(self, name: str) -> Any:
        return lambda *args, **kwargs: None


def _completer(held: set[uuid.UUID], running: dict[uuid.UUID, Any]) -> Completer:
    labels = (f"held-{uuid.uuid4().hex[:8]}", "s")
    metrics.prepare_stage(*labels)
    return Completer(
        cast(Any, _Protocol()),
        tally=StageTally(labels, lambda: 0),
        held=held,
        running=running,
        slot_freed=asyncio.Event(),
        errors=cast(Any, None),
        log=cast(Any, _Log()),
    )


def _success(run_id: uuid.UUID) -> Success:
    return Success(run_id, 1, "{}", time.time(), 0.001)


def test_an_applied_result_lets_its_run_go() -> None:
    ended, other = uuid.uuid4(), uuid.uuid4()
    held = {ended, other}
    completer = _completer(held, {})
    completer.successes.append(_success(ended))
    asyncio.run(completer.flush())
    assert held == {other}


def test_a_run_claimed_again_while_its_result_was_applied_stays_held() -> None:
    looped = uuid.uuid4()
    held = {looped}
    running: dict[uuid.UUID, Any] = {looped: object()}  # its next attempt's handler
    completer = _completer(held, running)
    completer.successes.append(_success(looped))
    asyncio.run(completer.flush())
    assert held == {looped}


class _CommittedThenLost(_Protocol):
    """A batch that commits, then loses its answer with the connection."""

    def __init__(self) -> None:
        self.batches: list[list[uuid.UUID]] = []

    async def apply(self, successes: list[Success], failures: list[Failure]) -> Applied:
        self.batches.append([r.run_id for r in [*successes, *failures]])
        if len(self.batches) == 1:
            raise psycopg.OperationalError("server closed the connection unexpectedly")
        return await super().apply(successes, failures)


class _ClaimedAgainDuringBackOff:
    """The worker's back-off after the lost answer; meanwhile the run, moved back to this stage
    by the batch that did commit, is claimed again by the same worker."""

    def __init__(self, running: dict[uuid.UUID, Any], run_id: uuid.UUID) -> None:
        self._running = running
        self._run_id = run_id

    async def away(self, what: str, exc: BaseException) -> None:
        self._running[self._run_id] = object()


def test_a_result_whose_run_runs_here_again_is_not_applied_a_second_time() -> None:
    """Retried after the lost answer, the old result would pass the new lease's fence (a run
    routed back to its own stage starts again at attempt 1): it is left out."""
    looped, other = uuid.uuid4(), uuid.uuid4()
    held = {looped, other}
    running: dict[uuid.UUID, Any] = {}
    protocol = _CommittedThenLost()
    completer = _completer(held, running)
    completer._protocol = cast(Any, protocol)
    completer._errors = cast(Any, _ClaimedAgainDuringBackOff(running, looped))
    completer.successes.extend([_success(looped), _success(other)])
    asyncio.run(completer.flush())
    assert protocol.batches == [[looped, other], [other]]
    assert held == {looped}  # its new attempt's, until that attempt's result


def test_the_worker_gives_its_completer_the_tasks_its_runs_run_in() -> None:
    worker = unstarted_worker()
    assert worker._completer._running is worker._in_flight.tasks


class _Slow(_Protocol):
    """Each batch waits for `release`; records the batches and how many overlap."""

    def __init__(self) -> None:
        self.release = asyncio.Event()
        self.batches: list[list[uuid.UUID]] = []
        self.at_once = 0
        self.most_at_once = 0

    async def apply(self, successes: list[Success], failures: list[Failure]) -> Applied:
        self.batches.append([r.run_id for r in [*successes, *failures]])
        self.at_once += 1
        self.most_at_once = max(self.most_at_once, self.at_once)
        try:
            await self.release.wait()
        finally:
            self.at_once -= 1
        return await super().apply(successes, failures)


def test_one_flush_at_a_time_and_the_one_under_way_takes_what_comes_meanwhile() -> None:
    """A run's task may flush beside the completer (flush_from): never two statements at
    once, and a result added during a flush is committed by it, not left waiting."""
    # (one flush waiting for another: test_the_final_flush_interrupts_a_run_flush...)
    first, second = uuid.uuid4(), uuid.uuid4()
    held = {first, second}
    completer = _completer(held, {})
    protocol = _Slow()
    completer._protocol = cast(Any, protocol)

    async def scenario() -> None:
        completer.successes.append(_success(first))
        run_flush = asyncio.create_task(completer.flush())
        await asyncio.sleep(0.01)
        assert not completer.idle
        completer.successes.append(_success(second))
        protocol.release.set()
        await run_flush  # it commits the second result too
        await completer.flush()  # one after it has nothing left to do

    asyncio.run(scenario())
    assert protocol.batches == [[first], [second]]
    assert protocol.most_at_once == 1
    assert held == set() and completer.idle


def test_the_final_flush_interrupts_a_run_flush_and_commits_its_batch() -> None:
    """At exit a run's task may still wait on the database for its flush: the final flush
    cancels it (its batch is kept) and commits that batch itself."""
    ended = uuid.uuid4()
    held = {ended}
    completer = _completer(held, {})
    protocol = _Slow()
    completer._protocol = cast(Any, protocol)

    async def scenario() -> None:
        completer.successes.append(_success(ended))

        async def run() -> None:
            await completer.flush_from(cast(Any, asyncio.current_task()))

        run_task = asyncio.create_task(run())
        await asyncio.sleep(0.01)  # the run's flush waits on the database
        asyncio.get_running_loop().call_later(0.01, protocol.release.set)
        await completer.flush(final=True)
        assert run_task.cancelled()

    asyncio.run(scenario())
    assert protocol.batches == [[ended], [ended]]
    assert held == set()


def test_an_unexpected_error_in_a_run_flush_ends_the_completer_loudly() -> None:
    """Not the database's error (those are retried) but a bug: the completer task dies with it,
    as it would have flushing itself, and the worker stops (Worker._side_task_ended)."""
    completer = _completer({uuid.uuid4()}, {})

    class _Broken(_Protocol):
        async def apply(self, successes: list[Success], failures: list[Failure]) -> Applied:
            raise RuntimeError("a bug")

    completer._protocol = cast(Any, _Broken())

    async def scenario() -> None:
        loop_task = asyncio.create_task(completer.complete_forever())
        completer.successes.append(_success(uuid.uuid4()))

        async def run() -> None:
            await completer.flush_from(cast(Any, asyncio.current_task()))

        await asyncio.create_task(run())  # the run's task itself ends quietly
        with pytest.raises(RuntimeError, match="a bug"):
            await asyncio.wait_for(loop_task, 5)

    asyncio.run(scenario())
