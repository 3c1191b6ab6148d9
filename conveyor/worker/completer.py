"""The completer: commits the finished attempts of one worker in fenced batches, beside its runs.

Run tasks append their Success or Failure to `successes` / `failures` and set `ready`; the
completer takes everything collected so far and applies it in one statement (complete_if_leased
and its siblings), so under load one commit covers many runs. The fence makes a retry safe: on a
database error the batch is kept and tried again; a batch PostgreSQL refuses is applied one
result at a time, so one bad result fails its own run instead of blocking every other.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Mapping
from uuid import UUID

import psycopg
from structlog.typing import FilteringBoundLogger

from conveyor.db import brief
from conveyor.protocol import StageProtocol
from conveyor.results import Applied, Failure, Success
from conveyor.worker.database_errors import DB_ERRORS, DatabaseErrors
from conveyor.worker.tally import StageTally

# At exit, how long the completer may take to commit its last batch before it is cancelled.
COMPLETER_STOP_SECONDS = 5.0
# The final flush at exit gives up after this many database errors; the leases then expire.
_FINAL_TRIES = 10


class Completer:
    def __init__(
        self,
        protocol: StageProtocol,
        *,
        tally: StageTally,
        held: set[UUID],
        running: Mapping[UUID, object],
        slot_freed: asyncio.Event,
        errors: DatabaseErrors,
        log: FilteringBoundLogger,
    ) -> None:
        self._protocol = protocol
        self._tally = tally
        # The worker's runs held until their result is applied or refused (shared, not owned).
        self._held = held
        # The runs whose handler runs now (InFlight.tasks): a run routed back to this stage
        # may be claimed again before its result's batch has returned here, and stays held.
        self._running = running
        # Set once applied results leave `held`: a worker holding as many as it may (results
        # waiting for their commit included: Dispatcher.free) claims again.
        self._slot_freed = slot_freed
        self._errors = errors
        self._log = log
        # Filled by the run tasks, emptied by flush(); the same list objects for the worker's
        # life, so the run tasks may keep them.
        self.successes: list[Success] = []
        self.failures: list[Failure] = []
        self.ready = asyncio.Event()
        self._completing = True
        # One flush at a time, the completer's or a run's (flush_from): a flush under way takes
        # every result collected until it ends. Set while none is under way.
        self._flushed = asyncio.Event()
        self._flushed.set()
        self._run_flushing: asyncio.Task[None] | None = None
        self._run_flush_failed: Exception | None = None

    async def complete_forever(self) -> None:
        while self._completing:
            await self.ready.wait()
            self.ready.clear()
            if self._run_flush_failed is not None:  # a bug: the completer dies with it (loudly)
                raise self._run_flush_failed
            await self.flush()

    async def finish(self, task: asyncio.Task[None]) -> None:
        """Let the completer commit what it holds and return. Cancelled mid-batch, its
        statement would be rolled back, and the finished runs rescued and run again."""
        self._completing = False
        self.ready.set()
        await asyncio.wait({task}, timeout=COMPLETER_STOP_SECONDS)

    @property
    def idle(self) -> bool:
        """No flush is under way."""
        return self._flushed.is_set()

    async def flush_from(self, task: asyncio.Task[None]) -> None:
        """Flush from a run's `task`: a run that ended with nothing else in flight commits its
        result itself, a turn of the loop sooner than waking the completer would. At exit the
        final flush cancels it (its batch is kept) rather than wait for a database away."""
        self._run_flushing = task
        try:
            await self.flush()
        except Exception as exc:  # not the database's (flush keeps those): the completer's own
            self._run_flush_failed = exc
            self.ready.set()
        finally:
            self._run_flushing = None

    async def flush(self, *, final: bool = False) -> None:
        """Commit every finished attempt collected so far in one fenced batch. On a database
        error the results are kept and the batch is tried again: the fence, and leaving out
        the runs started here again meanwhile (_take_batch), make it safe.
        The final flush at exit gives up after a few tries; the leases then expire."""
        while not self._flushed.is_set():
            if final and self._run_flushing is not None:
                # Again every second: a cancellation can be lost in a wait it interrupts.
                self._run_flushing.cancel()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(1.0 if final else None):
                    await self._flushed.wait()
        self._flushed.clear()
        try:
            await self._flush(final)
        finally:
            self._flushed.set()

    async def _flush(self, final: bool) -> None:
        tries = 0
        while self.successes or self.failures:
            successes, failures = self._take_batch()
            if not (successes or failures):
                continue
            try:
                applied = await self._protocol.apply(successes, failures)
            except asyncio.CancelledError:
                # Cancelled at exit while the database does not answer: keep the batch for the
                # final flush (the fence refuses it if this attempt committed after all).
                self.successes[:0] = successes
                self.failures[:0] = failures
                raise
            except DB_ERRORS as exc:
                self.successes[:0] = successes
                self.failures[:0] = failures
                tries += 1
                if final and tries >= _FINAL_TRIES:
                    self._log.error(
                        "could not report results before exiting; leases will expire",
                        runs=len(self.successes) + len(self.failures),
                    )
                    return
                await self._errors.away("complete", exc)
                continue
            except psycopg.Error as exc:  # bad data, not a lost connection: isolate the culprit
                self._log.error("batch of results rejected; applying one by one", error=brief(exc))
                applied = await self._apply_one_by_one(successes, failures)
            # Applied or refused: no longer this worker's, except what waits to be tried again
            # and what it has claimed again meanwhile.
            pending = _run_ids(self.successes, self.failures)
            self._held -= _run_ids(successes, failures) - pending - self._running.keys()
            self._slot_freed.set()
            tally = self._tally
            tally.completed += applied.completed
            tally.retried += applied.retried
            tally.failed += applied.failed
            tally.lease_losses += applied.refused
            tally.soon()
            if applied.refused:
                self._log.warning("stale results refused: lease lost", runs=applied.refused)

    def _take_batch(self) -> tuple[list[Success], list[Failure]]:
        """Every result collected so far, but those of runs that run here again. Such a run
        left this attempt's lease: the result was applied already (a batch whose commit went
        through though its answer was lost) or the lease was lost. Applied now, it could pass
        the new lease's fence, whose attempt number may repeat (a run routed back to its own
        stage starts again at attempt 1) and move the run on with the old output."""
        running = self._running
        successes = [s for s in self.successes if s.run_id not in running]
        failures = [f for f in self.failures if f.run_id not in running]
        dropped = len(self.successes) + len(self.failures) - len(successes) - len(failures)
        self.successes.clear()
        self.failures.clear()
        if dropped:
            self._log.warning("results of runs started here again dropped", runs=dropped)
        return successes, failures

    async def _apply_one_by_one(self, successes: list[Success], failures: list[Failure]) -> Applied:
        """A result PostgreSQL refuses fails its run with the reason, instead of blocking
        every other result behind it forever."""
        totals = [0, 0, 0, 0]
        results: list[Success | Failure] = [*successes, *failures]
        for result in results:
            try:
                if isinstance(result, Success):
                    one = await self._protocol.apply([result], [])
                else:
                    one = await self._protocol.apply([], [result])
            except DB_ERRORS:  # the connection went: keep it for the next flush
                if isinstance(result, Success):
                    self.successes.append(result)
                else:
                    self.failures.append(result)
                continue
            except psycopg.Error as exc:
                self._log.error(
                    "result refused by the database", run_id=str(result.run_id), error=brief(exc)
                )
                failure = Failure(
                    result.run_id,
                    result.attempt,
                    f"result could not be stored: {brief(exc)}",
                    None,
                    result.started_epoch,
                    result.duration,
                )
                try:
                    one = await self._protocol.apply([], [failure])
                except psycopg.Error:
                    continue  # its lease expires; the rescue bounds it once its attempts are spent
            for i, value in enumerate((one.completed, one.retried, one.failed, one.refused)):
                totals[i] += value
        return Applied(*totals)


def _run_ids(*results: list[Success] | list[Failure]) -> set[UUID]:
    return {result.run_id for batch in results for result in batch}
