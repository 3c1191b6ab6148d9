"""One worker process for one stage: listen, sweep, claim, run handlers, complete, drain."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import json
import logging
import os
import random
import secrets
import signal
import time
import uuid
from collections.abc import Coroutine
from concurrent.futures import ThreadPoolExecutor
from typing import Any
from uuid import UUID

import psycopg
import structlog
from psycopg_pool import AsyncConnectionPool

from conveyor import metrics
from conveyor.db import (
    CONNECT_TIMEOUT_SECONDS,
    DATABASE_AWAY,
    KEEPALIVE_OPTIONS,
    brief,
    refusal,
    server_read_only,
)
from conveyor.listening import Listener, wake_channel
from conveyor.logs import current_run
from conveyor.maintenance import Maintenance
from conveyor.pipeline import Pipeline, Run, Stage
from conveyor.protocol import Applied, ClaimedRow, Failure, StageProtocol, Success, Undecodable
from conveyor.settings import Settings
from conveyor.worker.liveness import LivenessSlot
from conveyor.worker.runner import run_handler
from conveyor.worker.tally import StageTally

log = structlog.get_logger("conveyor.worker")

# A worker that has just gone idle claims once more after this grace: a transaction whose wake-up
# trigger ran (and found nobody waiting) just before we said we were waiting commits within it.
IDLE_GRACE_SECONDS = 0.05
# The supervisor's liveness probe wants to see the loop turn at least this often.
_LIVENESS_TICK = 1.0
POOL_WAIT_SECONDS = 5.0
# At exit, how long the completer may take to commit its last batch before it is cancelled.
COMPLETER_STOP_SECONDS = 5.0
_DB_ERRORS: tuple[type[Exception], ...] = (*DATABASE_AWAY, psycopg.errors.DeadlockDetected)
# A wake-up notification that carries a run leased to a waiting worker at commit:
# `run:<worker>:<signature>:<json>`, signed by hand_off() with the worker's registry secret.
_HAND_OFF = "run:"
# Refused hand-off notifications (forged, stale, replayed) are logged at most this often.
_REFUSAL_LOG_SECONDS = 10.0


def new_worker_id(stage: str) -> str:
    """Unique per process start: pod names and pids are reused, this is not."""
    return f"{stage}-{os.getpid()}-{uuid.uuid4().hex[:8]}"


class Worker:
    def __init__(
        self,
        settings: Settings,
        pipeline: Pipeline,
        stage: Stage,
        url: str,
        *,
        listen_url: str | None = None,
        worker_id: str | None = None,
        parent_pid: int | None = None,
        liveness: LivenessSlot | None = None,
        maintain: bool = False,
        replaces_pid: int | None = None,
    ) -> None:
        self.parent_pid = parent_pid
        self.replaces_pid = replaces_pid
        self.liveness = liveness
        self.maintain = maintain
        self._next_sweep_at = 0.0
        self.settings = settings
        self.pipeline = pipeline
        self.stage = stage
        self.url = url
        self.listen_url = listen_url or url
        self.worker_id = worker_id or new_worker_id(stage.name)
        self.channel = wake_channel(settings.schema, pipeline.name, stage.consumes)
        # Known to this process and, through its registry row, to the database alone: what
        # tells a hand-off from a notification any login could send.
        self._secret = secrets.token_bytes(32)
        self._hand_off_prefix = f"{_HAND_OFF}{self.worker_id}:"
        # (run, attempt) of every hand-off taken, until its lease would have expired: a
        # replayed notification is not run twice.
        self._handed: dict[tuple[UUID, int], float] = {}
        self._refused_hand_offs = 0
        self._next_refusal_log = 0.0
        self.failed = False  # a side task died: the process exits non-zero, to be restarted
        self.stopping = asyncio.Event()
        self._wake = asyncio.Event()
        self._slot_freed = asyncio.Event()
        self._results_ready = asyncio.Event()
        self._in_flight: dict[UUID, asyncio.Task[None]] = {}
        self._successes: list[Success] = []
        self._failures: list[Failure] = []
        self._taken_away: set[UUID] = set()
        # Every run this worker knows it holds, from its claim or hand-off until its result is
        # applied or it is given back. A run leased to it that is not here was handed to it
        # while its listener was away, and is released (_release_unheard).
        self._held: set[UUID] = set()
        self._releasing: set[UUID] = set()
        self._recover_unheard = False
        self._background: set[asyncio.Task[None]] = set()  # give-backs, the leaving beat
        self._backlog = False
        self._running_rescued = False  # a rescued run is in flight: it runs alone
        self._emptying_for_rescued = False  # one is waiting: finish what is in flight first
        self._completing = True
        self._waiting = False
        self._free_reported = 0  # the free slots the registry last heard of (hand-offs count down)
        self._woken_by_timer = False
        self._labels = (pipeline.name, stage.name)
        # Per-run metrics are counted here and written a moment later, off the run's path.
        self._tally = StageTally(self._labels, lambda: len(self._in_flight))
        self._log = log.bind(pipeline=pipeline.name, stage=stage.name, worker=self.worker_id)
        # A "run finished" line per run is built only when INFO is logged at all.
        enabled_for = getattr(self._log, "is_enabled_for", None)
        self._log_runs = enabled_for is None or bool(enabled_for(logging.INFO))

    # -- lifecycle -------------------------------------------------------------------------

    async def run(self) -> None:
        # Every line this process logs (psycopg's too) says which worker it comes from.
        structlog.contextvars.bind_contextvars(
            pipeline=self.pipeline.name, stage=self.stage.name, worker=self.worker_id
        )
        metrics.prepare_stage(*self._labels)
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, self.stop)
        if not self.stage.is_async:
            # Sync handlers run in threads: as many threads as the stage's concurrency (the
            # default executor would cap them at cpu count + 4).
            loop.set_default_executor(
                ThreadPoolExecutor(self.stage.concurrency, thread_name_prefix=self.stage.name)
            )
        self.pool = AsyncConnectionPool(
            self.url,
            # Claims and completions keep one connection each; the rest share the third.
            min_size=3,
            max_size=3,
            open=False,
            kwargs={
                "autocommit": True,
                "application_name": f"conveyor:{self.worker_id}"[:63],
                "prepare_threshold": 5 if self.settings.prepared_statements else None,
                "connect_timeout": CONNECT_TIMEOUT_SECONDS,
                **KEEPALIVE_OPTIONS,
            },
            # psycopg_pool stops reconnecting after reconnect_timeout (0: at once), and a request
            # already queued is not served when the server comes back: it waits out `timeout`.
            # A short wait makes the caller fail and ask again (every caller retries on database
            # errors), which re-arms the reconnection: the worker resumes within seconds of an
            # outage instead of ~30 s (psycopg_pool's default wait).
            reconnect_timeout=0,
            timeout=POOL_WAIT_SECONDS,
        )
        await self.pool.open(wait=False)
        self.protocol = StageProtocol(
            self.pool,
            schema=self.settings.schema,
            pipeline=self.pipeline,
            stage=self.stage,
            worker_id=self.worker_id,
            lease_seconds=self.settings.lease,
            hold_connections=True,
        )
        self.listener = Listener(
            self.listen_url,
            self.channel,
            self._on_notification,
            health_interval=self.settings.listener_check_interval,
            health_timeout=self.settings.listener_check_timeout,
            application_name=f"conveyor-listen:{self.worker_id}"[:63],
            metric_labels=self._labels,
        )
        self._log.info(
            "worker started",
            concurrency=self.stage.concurrency,
            batch=self.stage.batch,
            channel=self.channel,
        )
        helpers = [
            asyncio.create_task(self.listener.run(), name="listener"),
            asyncio.create_task(self._sweep_timer(), name="sweep"),
            asyncio.create_task(self._heartbeat(), name="heartbeat"),
            asyncio.create_task(self._not_waiting_while_deaf(), name="deaf"),
        ]
        if self.parent_pid is not None:
            helpers.append(asyncio.create_task(self._watch_parent(), name="parent"))
        if self.replaces_pid is not None:
            helpers.append(asyncio.create_task(self._end_dead_leases(self.replaces_pid)))
        if self.maintain:
            # The leader's session lock needs a session: the direct (LISTEN) URL, not a pooler.
            maintenance = Maintenance(self.settings, self.pipeline, self.listen_url, self.worker_id)
            helpers.append(asyncio.create_task(maintenance.run(), name="maintenance"))
        completer = asyncio.create_task(self._complete_forever(), name="completer")
        for task in [*helpers, completer]:
            task.add_done_callback(self._side_task_ended)
        try:
            await self._dispatch_until_stopped()
            await self._drain()
            await self._stop_completer(completer)
        finally:
            for task in helpers:
                task.cancel()
            await cancelled(helpers)
            self._results_ready.set()
            completer.cancel()
            await cancelled([completer])
            try:
                await self._flush_results(final=True)
            finally:
                self._tally.write()
            await cancelled(list(self._background))  # a second each to finish, then cancelled
            # Off the registry first, so no hand-off can follow; then nothing leased to this
            # worker is left behind for the lease to expire (a hand-off it never heard).
            await self._forget()
            with contextlib.suppress(psycopg.Error, TimeoutError):
                await asyncio.wait_for(self._release_unheard(), timeout=2)
            await self.listener.close()
            await self.protocol.close()
            await self.pool.close()
            self._log.info("worker stopped")

    def _side_task_ended(self, task: asyncio.Task[None]) -> None:
        """A side task that dies leaves the worker half alive (deaf, or never beating): it
        stops instead, drains what it holds and exits non-zero, and its supervisor starts a
        new one. Readiness drops at once."""
        if task.cancelled() or task.exception() is None:
            return
        self._log.error(
            "worker task died; stopping the worker",
            task=task.get_name(),
            error=brief(task.exception()),
        )
        self.failed = True
        if self.liveness is not None:
            self.liveness.set_listening(False)
        self.stop()

    def stop(self) -> None:
        if not self.stopping.is_set():
            self._log.info(
                "worker stopping: draining in-flight runs", in_flight=len(self._in_flight)
            )
            self.stopping.set()
            self._wake.set()
            self._slot_freed.set()
            self._in_background(self._set_waiting(False))  # no more hand-offs: it is leaving

    # -- claiming ----------------------------------------------------------------------------

    def _on_notification(self, payload: str | None) -> None:
        if payload is None:  # (re)connected: what was handed to it meanwhile went unheard
            self._recover_unheard = True
        elif payload.startswith(_HAND_OFF):
            if not payload.startswith(self._hand_off_prefix):
                return  # a peer's hand-off
            if not self._take_hand_off(payload[len(self._hand_off_prefix) :]):
                return  # taken with slots left, or refused: nothing to claim
        self._wake.set()

    def _signature(self, body: str) -> bytes:
        """hand_off()'s signature of a payload: sha256(secret || sha256(secret || body))."""
        inner = hashlib.sha256(self._secret + body.encode()).digest()
        return hashlib.sha256(self._secret + inner).hexdigest().encode()

    def _take_hand_off(self, signed: str) -> bool:
        """Start a run the wake-up trigger leased to this worker at commit, from the
        notification, once its signature proves the database sent it. One it cannot take is
        given back. Whether the dispatcher should look again: the registry handed it its last
        free slot, so it no longer waits."""
        signature, _, body = signed.partition(":")
        if not hmac.compare_digest(signature.encode(errors="replace"), self._signature(body)):
            self._refuse_hand_off("signature does not match")
            return False
        try:
            handed = json.loads(body)
            free = int(handed["free"])  # the registry's count, after this one
            expires = float(handed["expires"])
            row: ClaimedRow = (
                UUID(handed["id"]),
                handed["input"],
                handed["outputs"],
                int(handed["attempt"]),
                float(handed["waited"]),
                False,
            )
        except (ValueError, KeyError, TypeError, RecursionError) as exc:
            # The database leased it to this worker, but its text cannot be read here (an
            # input nested too deeply): released unheard, then claimed, and failed there.
            self._log.error("undecodable hand-off; releasing it", error=brief(exc))
            self._recover_unheard = True
            return True
        key = (row[0], row[3])
        now = time.time()
        if expires <= now or key in self._handed:
            self._refuse_hand_off("stale or replayed")
            return False
        self._remember_hand_off(key, expires, now)
        self._free_reported = free
        no_slot_left = free <= 0
        if no_slot_left:
            self._waiting = False  # the trigger took it off the waiting list
        run_id = row[0]
        if run_id in self._held or run_id in self._releasing:
            return no_slot_left
        full = len(self._in_flight) >= self.stage.concurrency
        if self.stopping.is_set() or full or self._running_rescued or self._emptying_for_rescued:
            self._in_background(self._give_back(run_id))
            return True  # it no longer waits: the dispatcher claims and waits again when it can
        self._start([row], by_timer=False)
        return no_slot_left

    def _remember_hand_off(self, key: tuple[UUID, int], expires: float, now: float) -> None:
        if len(self._handed) >= 1024:  # forget the ones whose lease is over
            self._handed = {k: at for k, at in self._handed.items() if at > now}
        self._handed[key] = expires

    def _refuse_hand_off(self, reason: str) -> None:
        """A hand-off notification that proves nothing: anyone may NOTIFY. Counted, and logged
        at most every few seconds, so a flood of them cannot flood the log."""
        self._refused_hand_offs += 1
        metrics.WORKER_ERRORS.labels(*self._labels, "hand_off_refused").inc()
        now = time.monotonic()
        if now >= self._next_refusal_log:
            self._next_refusal_log = now + _REFUSAL_LOG_SECONDS
            self._log.warning(
                "hand-off notification refused", reason=reason, refused=self._refused_hand_offs
            )

    def _in_background(self, work: Coroutine[Any, Any, None]) -> None:
        """Run `work` beside the dispatcher; waited for (then cancelled) at exit."""
        task = asyncio.create_task(work)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _give_back(self, run_id: UUID) -> None:
        """Release a hand-off this worker cannot take, after leaving the waiting list: the
        release makes the run claimable again, and must not hand it straight back."""
        self._releasing.add(run_id)
        try:
            await self._set_waiting(False)
            await self.protocol.release([run_id], reason="handed to a worker with no free slot")
        except psycopg.Error as exc:  # its lease expires; the rescue forgives a live owner
            self._log.warning("could not give a hand-off back", error=brief(exc))
        finally:
            self._releasing.discard(run_id)

    async def _release_unheard(self) -> None:
        """Give back the runs leased to this worker that it never heard of: handed to it while
        its listener was away. Fenced like every release; a hand-off heard meanwhile is left
        to this release (_releasing), not started. So the worker leaves the waiting list first,
        as a give-back does: a listener back within milliseconds never took it off, and the
        release's own commit would hand a run straight back, to be left as heard meanwhile
        (seen in a test run: the run then sat leased to the worker until it exited)."""
        leased = await self.protocol.leased_to_me()
        unheard = leased - self._held - self._releasing
        if not unheard:
            return
        if self._waiting:
            await self._set_waiting(False)
            if self._waiting:  # the database did not take it: release on the next wake-up
                self._recover_unheard = True
                return
        self._releasing |= unheard
        try:
            released = await self.protocol.release(
                list(unheard), reason="handed to the worker while its listener was away"
            )
        finally:
            self._releasing -= unheard
        self._log.warning("released runs handed over while not listening", runs=released)

    async def _dispatch_until_stopped(self) -> None:
        stage = self.stage
        # Under a backlog, claim only when a good part of a batch is free, so batches stay big.
        refill_at = max(1, stage.batch // 2)
        while not self.stopping.is_set():
            free = stage.concurrency - len(self._in_flight)
            # A rescued run in flight runs alone; one waiting makes this worker empty itself.
            hold = self._in_flight and (self._running_rescued or self._emptying_for_rescued)
            if free <= 0 or hold or (self._backlog and free < min(refill_at, stage.concurrency)):
                self._slot_freed.clear()
                await self._slot_freed.wait()
                continue
            self._running_rescued = False
            idle = not self._backlog
            if idle and not self._emptying_for_rescued:
                await self._wake.wait()
                if self.stopping.is_set():
                    return
            self._wake.clear()
            timer_fired, self._woken_by_timer = self._woken_by_timer, False
            # A sweep pick-up is a claim by an idle worker that the timer woke; under a backlog
            # the dispatcher claims without waiting, whatever the timer did meanwhile.
            by_timer = timer_fired and idle
            alone = not self._in_flight
            operation = "claim"
            try:
                if self._recover_unheard:
                    operation = "release_unheard"
                    self._recover_unheard = False
                    await self._release_unheard()
                    operation = "claim"
                if timer_fired and not alone:
                    operation = "rescued_waiting"
                    self._emptying_for_rescued = await self.protocol.rescued_waiting()
                    if self._emptying_for_rescued:
                        await self._set_waiting(False)  # and no hand-off keeps it from emptying
                        continue
                    operation = "claim"
                want = self.protocol.claim_size(free)
                rows = await self.protocol.claim(want, alone=alone)
            except _DB_ERRORS as exc:
                self._recover_unheard = self._recover_unheard or operation == "release_unheard"
                await self._database_trouble(operation, exc)
                continue
            except psycopg.Error as exc:
                self._recover_unheard = self._recover_unheard or operation == "release_unheard"
                await self._statement_refused(operation, exc)
                self._wake.set()  # and claim again
                continue
            self._emptying_for_rescued = False
            self._start(rows, by_timer=by_timer)
            # A lone rescued run says nothing about the backlog: look again once it is done.
            self._backlog = len(rows) == want or self._running_rescued
            await self._set_waiting(not self._backlog)

    def _start(self, rows: list[ClaimedRow], *, by_timer: bool) -> None:
        """Run the handler of every run claimed or handed to this worker; fail at once, with
        the reason, a run whose stored values cannot be read here."""
        for run_id, run_input, outputs, attempt, _waited, rescued in rows:
            self._held.add(run_id)
            unreadable = _unreadable(run_input, outputs)
            if unreadable is not None:
                self._log.error("run cannot be read; failed", run_id=str(run_id), error=unreadable)
                self._failures.append(Failure(run_id, attempt, unreadable, None, time.time(), 0.0))
                self._results_ready.set()
                continue
            run = Run(run_id, self.pipeline.name, self.stage.name, run_input, outputs, attempt)
            self._in_flight[run_id] = asyncio.create_task(self._execute(run))
            self._running_rescued = self._running_rescued or rescued
        if rows:
            tally = self._tally
            tally.waits.extend(row[4] for row in rows)
            tally.claimed += len(rows)
            if by_timer:
                tally.sweep_pickups += len(rows)
            tally.soon()

    async def _set_waiting(self, waiting: bool) -> None:
        """Arm or disarm the wake-up trigger for this worker; only on a change, or when a
        waiting worker's free slots changed by more than its hand-offs counted (it claimed):
        hand-offs beyond its room would only be given back. Never armed while the listener
        is away: a run handed over then would go unheard."""
        waiting = waiting and self.listener.connected.is_set() and not self.stopping.is_set()
        free = self._free_slots if waiting else 0
        if waiting == self._waiting and free == self._free_reported:
            return
        try:
            await self.protocol.beat(
                channel=self.channel,
                waiting=waiting,
                ttl_seconds=self._ttl,
                free_slots=free,
                secret=self._secret,
            )
        except _DB_ERRORS as exc:
            await self._database_trouble("beat", exc)
            return
        except psycopg.Error as exc:
            await self._statement_refused("beat", exc)
            return
        armed = waiting and not self._waiting
        self._waiting, self._free_reported = waiting, free
        if armed:
            asyncio.get_running_loop().call_later(IDLE_GRACE_SECONDS, self._wake.set)

    async def _not_waiting_while_deaf(self) -> None:
        """A worker whose listener is away leaves the waiting list at once, so no run is handed
        to it unheard; the sweep tightens meanwhile, and once the listener is back the worker
        releases what it missed (_release_unheard), claims, and waits again."""
        while True:
            await self.listener.disconnected.wait()
            while self._waiting and not self.listener.connected.is_set():
                await self._set_waiting(False)
            await self.listener.connected.wait()

    async def _sweep_timer(self) -> None:
        """Claim on a jittered timer even without a notification: the bound on anything missed.
        While the listener is down or unproven the sweep tightens to at most a second."""
        while True:
            healthy = self.listener.connected.is_set()
            if self.liveness is not None:
                self.liveness.tick()
                self.liveness.set_listening(healthy)
            interval = (
                self.settings.sweep_interval if healthy else min(self.settings.sweep_interval, 1.0)
            )
            await asyncio.sleep(min(interval * random.uniform(0.8, 1.2), _LIVENESS_TICK))
            if time.monotonic() >= self._next_sweep_at or not healthy:
                self._next_sweep_at = time.monotonic() + interval * random.uniform(0.8, 1.2)
                self._woken_by_timer = True
                self._wake.set()

    # -- running ------------------------------------------------------------------------------

    async def _execute(self, run: Run) -> None:
        # This task's context (and the handler's thread, which copies it): every line logged
        # while handling the run carries its id and attempt.
        current_run.set((run.id, run.attempt))
        started = time.perf_counter()
        try:
            outcome = await run_handler(self.stage, run)
        except asyncio.CancelledError:
            if run.id in self._taken_away:  # cancelled, rescued or released: no result
                self._taken_away.discard(run.id)
                self._held.discard(run.id)
                stopping = self.stopping.is_set()
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
                self._in_flight.pop(run.id, None)
                self._tally.soon()
                self._slot_freed.set()
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
        self._in_flight.pop(run.id, None)
        self._slot_freed.set()
        self._results_ready.set()

    async def _complete_forever(self) -> None:
        while self._completing:
            await self._results_ready.wait()
            self._results_ready.clear()
            await self._flush_results()

    async def _flush_results(self, *, final: bool = False) -> None:
        """Commit every finished attempt collected so far in one fenced batch. On a database
        error the results are kept and the batch is tried again: the fence makes it safe.
        The final flush at exit gives up after a few tries; the leases then expire."""
        tries = 0
        while self._successes or self._failures:
            successes, self._successes = self._successes, []
            failures, self._failures = self._failures, []
            try:
                applied = await self.protocol.apply(successes, failures)
            except asyncio.CancelledError:
                # Cancelled at exit while the database does not answer: keep the batch for the
                # final flush (the fence refuses it if this attempt committed after all).
                self._successes[:0] = successes
                self._failures[:0] = failures
                raise
            except _DB_ERRORS as exc:
                self._successes[:0] = successes
                self._failures[:0] = failures
                tries += 1
                if final and tries >= 10:
                    self._log.error(
                        "could not report results before exiting; leases will expire",
                        runs=len(self._successes) + len(self._failures),
                    )
                    return
                await self._database_trouble("complete", exc)
                continue
            except psycopg.Error as exc:  # bad data, not a lost connection: isolate the culprit
                self._log.error("batch of results rejected; applying one by one", error=brief(exc))
                applied = await self._apply_one_by_one(successes, failures)
            # Applied or refused: no longer this worker's, except what waits to be tried again.
            pending = _run_ids(self._successes, self._failures)
            self._held -= _run_ids(successes, failures) - pending
            tally = self._tally
            tally.completed += applied.completed
            tally.retried += applied.retried
            tally.failed += applied.failed
            tally.lease_losses += applied.refused
            tally.soon()
            if applied.refused:
                self._log.warning("stale results refused: lease lost", runs=applied.refused)

    async def _apply_one_by_one(self, successes: list[Success], failures: list[Failure]) -> Applied:
        """A result PostgreSQL refuses fails its run with the reason, instead of blocking
        every other result behind it forever."""
        totals = [0, 0, 0, 0]
        results: list[Success | Failure] = [*successes, *failures]
        for result in results:
            try:
                if isinstance(result, Success):
                    one = await self.protocol.apply([result], [])
                else:
                    one = await self.protocol.apply([], [result])
            except _DB_ERRORS:  # the connection went: keep it for the next flush
                if isinstance(result, Success):
                    self._successes.append(result)
                else:
                    self._failures.append(result)
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
                    one = await self.protocol.apply([], [failure])
                except psycopg.Error:
                    continue  # its lease expires; the rescue bounds it once its attempts are spent
            for i, value in enumerate((one.completed, one.retried, one.failed, one.refused)):
                totals[i] += value
        return Applied(*totals)

    # -- leases and registry ----------------------------------------------------------------

    @property
    def _ttl(self) -> float:
        return self.settings.lease

    @property
    def _free_slots(self) -> int:
        """How many runs may be handed to this worker (the registry counts them down): all its
        slots while it has nothing in flight, none while it works. Hand-offs are for a worker
        that is idle; one that works claims what comes as a batch, when it is woken."""
        if self._in_flight or self._running_rescued:
            return 0
        return self.stage.concurrency

    async def _heartbeat(self) -> None:
        """Keep the registry row fresh, extend the leases of in-flight runs well before they
        expire (a third of the lease), and interrupt handlers whose run was taken away. The
        registry beat comes first: the rescue tells a dead worker from a live one by it."""
        while True:
            for operation, step in (("heartbeat", self._beat), ("extend_leases", self._extend)):
                try:
                    await step()
                except _DB_ERRORS as exc:
                    self._log.warning("heartbeat failed", during=operation, error=brief(exc))
                except psycopg.Error as exc:  # it beats again on its own period: no extra wait
                    await self._statement_refused(operation, exc, back_off=False)
            await asyncio.sleep(self.settings.lease / 3)

    async def _beat(self) -> None:
        free = self._free_slots if self._waiting else 0
        await self.protocol.beat(
            channel=self.channel,
            waiting=self._waiting,
            ttl_seconds=self._ttl,
            free_slots=free,
            secret=self._secret,
        )
        self._free_reported = free

    async def _extend(self) -> None:
        held_before = list(self._in_flight)
        if not held_before:
            return
        held = await self.protocol.extend_leases(held_before)
        for run_id in set(held_before) - held:
            task = self._in_flight.get(run_id)
            if task is not None:  # its task logs it, with the run's context
                self._taken_away.add(run_id)
                task.cancel()

    async def _end_dead_leases(self, dead_pid: int) -> None:
        """The process this one replaces died (killed, out of memory) and its runs are leased
        to it: end those leases now, so the rescue frees the runs within a sweep instead of a
        lease. Tried until the database answers; a refusal is logged, and the leases expire."""
        while True:
            try:
                ended = await self.protocol.end_dead_process_leases(dead_pid)
            except _DB_ERRORS as exc:
                await self._database_trouble("end_dead_process_leases", exc)
                continue
            except psycopg.Error as exc:
                await self._statement_refused("end_dead_process_leases", exc, back_off=False)
                return
            if ended:
                self._log.warning(
                    "ended the leases of a worker process that died", dead_pid=dead_pid, runs=ended
                )
            return

    async def _watch_parent(self) -> None:
        """A worker whose supervisor died exits instead of running on orphaned."""
        while os.getppid() == self.parent_pid:
            await asyncio.sleep(1.0)
        self._log.warning("supervisor is gone; stopping", supervisor_pid=self.parent_pid)
        self.stop()

    async def _forget(self) -> None:
        with contextlib.suppress(psycopg.Error, TimeoutError):  # the row expires by itself
            await asyncio.wait_for(self.protocol.forget(), timeout=2)

    # -- shutdown -----------------------------------------------------------------------------

    async def _stop_completer(self, completer: asyncio.Task[None]) -> None:
        """Let the completer commit what it holds and return. Cancelled mid-batch, its
        statement would be rolled back, and the finished runs rescued and run again."""
        self._completing = False
        self._results_ready.set()
        await asyncio.wait({completer}, timeout=COMPLETER_STOP_SECONDS)

    async def _drain(self) -> None:
        """Stop claiming; give in-flight handlers until the drain timeout, then release them."""
        deadline = time.monotonic() + self.settings.drain_timeout
        while self._in_flight and time.monotonic() < deadline:
            self._slot_freed.clear()
            try:
                await asyncio.wait_for(self._slot_freed.wait(), deadline - time.monotonic())
            except TimeoutError:
                break
        leftover = dict(self._in_flight)
        for run_id, task in leftover.items():
            self._taken_away.add(run_id)
            task.cancel()
        await asyncio.gather(*leftover.values(), return_exceptions=True)
        if leftover:
            try:
                released = await self.protocol.release(list(leftover))
                self._log.info("released unfinished runs", runs=released)
            except _DB_ERRORS as exc:
                self._log.warning(
                    "could not release runs; their leases will expire", error=brief(exc)
                )
            except psycopg.Error as exc:
                await self._statement_refused("release", exc, back_off=False)

    async def _database_trouble(self, what: str, exc: BaseException) -> None:
        self._log.warning("database error; will retry", during=what, error=brief(exc))
        if server_read_only(exc):
            # A standby, or a primary demoted by a failover: every connection to it is useless.
            # New ones (a multi-host URL with target_session_attrs=read-write) find the primary.
            self.listener.reconnect()
            await self.pool.drain()
        await asyncio.sleep(random.uniform(0.05, 0.5))

    async def _statement_refused(
        self, operation: str, exc: psycopg.Error, *, back_off: bool = True
    ) -> None:
        """PostgreSQL refused a statement over a working connection: a malformed row, a broken
        schema, a missing privilege. Logged and counted, never the end of the worker (its
        restarts would meet the same refusal, and the crash-loop bound would stop them all).
        Retrying at once would only repeat it: the worker waits about a sweep interval."""
        retry_in = self.settings.sweep_interval * random.uniform(0.8, 1.2) if back_off else None
        self._log.error(
            "statement failed",
            operation=operation,
            **refusal(exc),
            retry_in=None if retry_in is None else round(retry_in, 3),
        )
        metrics.WORKER_ERRORS.labels(*self._labels, operation).inc()
        if retry_in is not None:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(retry_in):
                    await self.stopping.wait()


def _unreadable(run_input: object, outputs: object) -> str | None:
    """Why a claimed run's input or outputs cannot be given to a handler, if they cannot."""
    for name, value in (("input", run_input), ("outputs", outputs)):
        if isinstance(value, Undecodable):
            return f"run {name} cannot be read: {value.reason}"
        if not isinstance(value, dict):
            return f"run {name} is not a JSON object"
    return None


def _run_ids(*results: list[Success] | list[Failure]) -> set[UUID]:
    return {result.run_id for batch in results for result in batch}


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


def run_worker(
    settings: Settings,
    pipeline: Pipeline,
    stage: Stage,
    url: str,
    *,
    listen_url: str | None = None,
    parent_pid: int | None = None,
    liveness: LivenessSlot | None = None,
    maintain: bool = False,
    replaces_pid: int | None = None,
) -> None:
    worker = Worker(
        settings,
        pipeline,
        stage,
        url,
        listen_url=listen_url,
        parent_pid=parent_pid,
        liveness=liveness,
        maintain=maintain,
        replaces_pid=replaces_pid,
    )
    asyncio.run(worker.run())
    if worker.failed:
        raise SystemExit(1)
