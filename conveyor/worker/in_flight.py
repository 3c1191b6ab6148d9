"""The runs a worker holds, and the tasks that run their handlers.

A run is started here from a claim or a hand-off, runs as a task of its own, and its result goes
to the completer. A run whose lease was lost, or that is still running when the drain ends, is
taken away: its task is cancelled, and it leaves no result.

The path from a claim to a result is the worker's hot path: per run, one task, one append to
the completer's list, counts in the tally, and a log line only when INFO is logged at all.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from uuid import UUID

import psycopg
from structlog.typing import FilteringBoundLogger

from conveyor.fan_out import Child
from conveyor.handler_run import Run
from conveyor.limits import FlowHandle
from conveyor.logs import current_run
from conveyor.pipeline import Pipeline, Stage
from conveyor.results import Failure, Success
from conveyor.server_json import ClaimedRow, Undecodable
from conveyor.worker.completer import Completer
from conveyor.worker.deadlines import Deadlines, for_running_loop
from conveyor.worker.eager import start_task
from conveyor.worker.runner import run_handler
from conveyor.worker.tally import StageTally

ReadChildren = Callable[[UUID], Awaitable[tuple[Child, ...]]]


class InFlight:
    def __init__(
        self,
        pipeline: Pipeline,
        stage: Stage,
        *,
        held: set[UUID],
        tasks: dict[UUID, asyncio.Task[None]],
        completer: Completer,
        tally: StageTally,
        slot_freed: asyncio.Event,
        stopping: asyncio.Event,
        log: FilteringBoundLogger,
        log_runs: bool,
        flow: FlowHandle | None = None,
        read_children: ReadChildren | None = None,
    ) -> None:
        self._flow = flow  # what Run.acquire and Run.close_limit reach, under limits
        self._read_children = read_children  # a stage that joins a fan-out: Run.children
        self._pipeline_name = pipeline.name
        self._stage = stage
        # The handler task of every run started and not yet finished (shared with the
        # completer).
        self.tasks = tasks
        # Runs whose task is cancelled because they are no longer this worker's: no result.
        self.taken_away: set[UUID] = set()
        self.held = held  # the worker's runs, from claim or hand-off to result (shared)
        self._successes = completer.successes
        self._failures = completer.failures
        self._results_ready = completer.ready
        self._completer = completer
        self._tally = tally
        self._slot_freed = slot_freed
        self._stopping = stopping
        self._log = log
        self._log_runs = log_runs  # a "run finished" line per run only when INFO is logged
        # Called when the last run in flight has ended (Dispatcher._offer_slots_again).
        self.on_idle: Callable[[], None] | None = None
        # The worker's loop and its deadlines, known from the first start on.
        self._loop: asyncio.AbstractEventLoop | None = None
        self._deadlines: Deadlines | None = None

    def start(self, rows: list[ClaimedRow], *, by_timer: bool, at_once: bool = False) -> bool:
        """Run the handler of every run claimed or handed to this worker; fail at once, with
        the reason, a run whose stored values cannot be read here. `at_once`: the handler
        starts before this returns (a run handed over in a notification: eager.start_task).
        Whether a rescued run was started (it then runs alone)."""
        rescued_started = False
        loop = self._loop
        if loop is None:  # the first start, in the worker's loop
            loop = self._loop = asyncio.get_running_loop()
            self._deadlines = for_running_loop()
        tasks = self.tasks
        for run_id, run_input, outputs, attempt, _waited, rescued in rows:
            self.held.add(run_id)
            readable = type(run_input) is dict and type(outputs) is dict
            unreadable = None if readable else _unreadable(run_input, outputs)
            if unreadable is not None:
                self._log.error("run cannot be read; failed", run_id=str(run_id), error=unreadable)
                self._failures.append(Failure(run_id, attempt, unreadable, None, time.time(), 0.0))
                self._results_ready.set()
                continue
            run = Run(run_id, self._pipeline_name, self._stage.name, run_input, outputs, attempt)
            if self._flow is not None:
                run._flow = self._flow
            if at_once:
                task, started = start_task(loop, self._execute(run))
                if not started:  # a started task counted itself in (and out, if it ended)
                    tasks[run_id] = task
            else:
                tasks[run_id] = loop.create_task(self._execute(run))
            rescued_started = rescued_started or rescued
        if rows:
            tally = self._tally
            tally.waits.extend(row[4] for row in rows)
            tally.claimed += len(rows)
            if by_timer:
                tally.sweep_pickups += len(rows)
            tally.soon()
        return rescued_started

    def take_away(self, run_id: UUID) -> None:
        """Interrupt a run that is no longer this worker's; its task logs it, with the run's
        context, and leaves no result."""
        task = self.tasks.get(run_id)
        if task is not None:
            self.taken_away.add(run_id)
            task.cancel()

    async def _execute(self, run: Run) -> None:
        # This task's context (and the handler's thread, which copies it): every line logged
        # while handling the run carries its id and attempt.
        current_run.set((run.id, run.attempt))
        started = time.perf_counter()
        # This task (asyncio.current_task() without the loop looks the loop up: on Python 3.11
        # a getpid() system call), held in `tasks` until the run ends.
        task = asyncio.current_task(self._loop)
        assert task is not None, "runs in a task of its own"
        self.tasks[run.id] = task
        try:
            unread = None if self._read_children is None else await self._children_unread(run)
            outcome = unread or await run_handler(
                self._stage, run, task=task, deadlines=self._deadlines
            )
        except asyncio.CancelledError:
            if run.id in self.taken_away:  # cancelled, rescued or released: no result
                self.taken_away.discard(run.id)
                self.held.discard(run.id)
                stopping = self._stopping.is_set()
                self._log.warning(
                    "run interrupted: worker stopping"
                    if stopping
                    else "run taken away; interrupting"
                )
                self._log.info(
                    "run finished",
                    run_id=str(run.id),
                    attempt=run.attempt,
                    outcome="released" if stopping else "taken away",
                    duration=round(time.perf_counter() - started, 6),
                )
                self._ended(run.id, task)
                self._tally.soon()
                return
            raise
        self._tally.durations.append(outcome.duration)
        self._tally.soon()  # observed even while the database keeps the result waiting
        if isinstance(outcome, Success):
            self._successes.append(outcome)
            if self._log_runs:
                self._log.info(
                    "run finished",
                    run_id=str(run.id),
                    attempt=run.attempt,
                    outcome="completed",
                    duration=round(outcome.duration, 6),
                )
        else:
            self._failures.append(outcome)
            self._log.warning(
                "run finished",
                run_id=str(run.id),
                attempt=run.attempt,
                outcome="retrying" if outcome.retry_in is not None else "failed",
                duration=round(outcome.duration, 6),
                error=outcome.error.splitlines()[-1],
            )
        self._ended(run.id, task)
        completer = self._completer
        if not self.tasks and completer.idle:
            # Nothing else in flight to share a batch with: commit the result from here, a
            # turn of the loop sooner than the completer would. The batch's log lines are
            # not this run's.
            current_run.set(None)
            await completer.flush_from(task)
        else:
            self._results_ready.set()

    def _ended(self, run_id: UUID, task: asyncio.Task[None]) -> None:
        """A run's task is over: its slot is free, and the worker may be idle. The run may run
        here again already (claimed again after a rescue): that task stays in `tasks`, and
        keeps the run's old result from being applied (Completer._take_batch)."""
        if self.tasks.get(run_id) is task:
            del self.tasks[run_id]
        self._slot_freed.set()
        if not self.tasks and self.on_idle is not None:
            self.on_idle()

    async def _children_unread(self, run: Run) -> Failure | None:
        """Give a run of a stage that joins a fan-out its children; a failed attempt when they
        cannot be read now."""
        assert self._read_children is not None
        try:
            run.children = await self._read_children(run.id)
        except psycopg.Error as exc:  # the database, not the run: its attempt is given back
            error = f"could not read the run's children: {type(exc).__name__}: {exc}"
            retry_in = self._stage.backoff.delay(run.attempt)
            return Failure(run.id, run.attempt, error, retry_in, time.time(), 0.0, counted=False)
        return None


def _unreadable(run_input: object, outputs: object) -> str | None:
    """Why a claimed run's input or outputs cannot be given to a handler, if they cannot."""
    for name, value in (("input", run_input), ("outputs", outputs)):
        if isinstance(value, Undecodable):
            return f"run {name} cannot be read: {value.reason}"
        if not isinstance(value, dict):
            return f"run {name} is not a JSON object"
    return None
