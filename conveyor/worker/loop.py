"""One worker process for one stage: listen, sweep, claim, run handlers, complete, drain.

The Worker wires its units and runs their lifecycle:
    Dispatcher (dispatch.py)   when to claim and how much, and whether a hand-off is taken
    InFlight (in_flight.py)    the runs it holds and the tasks running their handlers
    Completer (completer.py)   their results, committed in fenced batches
    HandOffs (hand_offs.py)    runs handed to it at commit, and its place on the waiting list
    Heartbeat (heartbeat.py)   the registry row and the runs' leases, kept fresh
    Listener (listening.py)    the LISTEN connection that brings wake-ups and hand-offs
and the side tasks beside them: the sweep timer, the heartbeat, the listener, leaving the
waiting list while deaf, and those it may be given (watching its supervisor, ending a dead
predecessor's leases, maintenance). A side task that dies stops the worker.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import os
import signal
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from uuid import UUID

import psycopg
import structlog
from psycopg_pool import AsyncConnectionPool

from conveyor import event_loop, metrics
from conveyor.db import CONNECT_TIMEOUT_SECONDS, KEEPALIVE_OPTIONS, brief
from conveyor.flow_control import FlowControl
from conveyor.listening import Listener, wake_channel
from conveyor.maintenance import Maintenance
from conveyor.pipeline import Pipeline, Stage
from conveyor.protocol import StageProtocol
from conveyor.settings import Settings
from conveyor.worker.completer import Completer
from conveyor.worker.database_errors import DB_ERRORS, DatabaseErrors
from conveyor.worker.dispatch import Dispatcher
from conveyor.worker.hand_offs import HAND_OFF, HandOffs
from conveyor.worker.heartbeat import Heartbeat
from conveyor.worker.in_flight import InFlight
from conveyor.worker.liveness import LivenessSlot
from conveyor.worker.sweep_timer import SweepTimer
from conveyor.worker.tally import StageTally
from conveyor.worker.task_ends import cancelled

log = structlog.get_logger("conveyor.worker")

POOL_WAIT_SECONDS = 5.0


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
        self.settings = settings
        self.pipeline = pipeline
        self.stage = stage
        self.url = url
        self.listen_url = listen_url or url
        self.worker_id = worker_id or new_worker_id(stage.name)
        self.channel = wake_channel(settings.schema, pipeline.name, stage.consumes)
        self.failed = False  # a side task died: the process exits non-zero, to be restarted
        self.stopping = asyncio.Event()
        self._labels = (pipeline.name, stage.name)
        self._log = log.bind(pipeline=pipeline.name, stage=stage.name, worker=self.worker_id)
        # A "run finished" line per run is built only when INFO is logged at all.
        enabled_for = getattr(self._log, "is_enabled_for", None)
        self._log_runs = enabled_for is None or bool(enabled_for(logging.INFO))
        self._build()

    # -- lifecycle -------------------------------------------------------------------------

    def _build(self) -> None:
        """The connections and the units, wired; nothing is opened or started yet."""
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
        # Handlers reach flow control whatever the stage declares (Run.acquire); claims go
        # through it only under limits.
        self.flow = FlowControl(
            self.pool,
            settings=self.settings,
            pipeline=self.pipeline,
            stage=self.stage,
            channel=self.channel,
        )
        self.protocol = StageProtocol(
            self.pool,
            schema=self.settings.schema,
            pipeline=self.pipeline,
            stage=self.stage,
            worker_id=self.worker_id,
            lease_seconds=self.settings.lease,
            hold_connections=True,
            flow=self.flow if self.flow.governs_claims else None,
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
        self._errors = errors = DatabaseErrors(
            pool=self.pool,
            listener=self.listener,
            stopping=self.stopping,
            sweep_interval=self.settings.sweep_interval,
            labels=self._labels,
            log=self._log,
        )
        # Every run this worker knows it holds, from its claim or hand-off until its result is
        # applied or it is given back. A run leased to it that is not here was handed to it
        # while its listener was away, and is released (HandOffs.release_unheard).
        held: set[UUID] = set()
        running: dict[UUID, asyncio.Task[None]] = {}  # the handler task of each run started
        self._wake = wake = asyncio.Event()
        self._slot_freed = slot_freed = asyncio.Event()
        # Per-run metrics are counted here and written a moment later, off the run's path.
        self._tally = StageTally(self._labels, lambda: len(self._in_flight.tasks))
        self._completer = Completer(
            self.protocol,
            tally=self._tally,
            held=held,
            running=running,
            slot_freed=slot_freed,
            errors=errors,
            log=self._log,
        )
        self._in_flight = InFlight(
            self.pipeline,
            self.stage,
            held=held,
            tasks=running,
            completer=self._completer,
            tally=self._tally,
            slot_freed=slot_freed,
            stopping=self.stopping,
            log=self._log,
            log_runs=self._log_runs,
            flow=self.flow,
            read_children=self.protocol.children if self.pipeline.joins(self.stage) else None,
        )
        self._hand_offs = HandOffs(
            self.worker_id,
            self.protocol,
            listener=self.listener,
            errors=errors,
            held=held,
            channel=self.channel,
            ttl_seconds=self.settings.lease,
            stopping=self.stopping,
            wake=wake,
            labels=self._labels,
            log=self._log,
        )
        self._hand_off_prefix = self._hand_offs.prefix
        self._dispatcher = Dispatcher(
            self.stage,
            self.protocol,
            in_flight=self._in_flight,
            hand_offs=self._hand_offs,
            errors=errors,
            wake=wake,
            slot_freed=slot_freed,
            log=self._log,
        )
        self._heartbeat = Heartbeat(
            self.protocol,
            lease_seconds=self.settings.lease,
            hand_offs=self._hand_offs,
            dispatcher=self._dispatcher,
            in_flight=self._in_flight,
            errors=errors,
            log=self._log,
        )
        self._sweep_timer = SweepTimer(
            self.listener,
            sweep_interval=self.settings.sweep_interval,
            sweep=self._dispatcher.sweep,
            liveness=self.liveness,
        )

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
        await self.pool.open(wait=False)
        self._log.info(
            "worker started",
            event_loop=event_loop.running_loop_name(),
            concurrency=self.stage.concurrency,
            batch=self.stage.batch,
            channel=self.channel,
        )
        helpers = [
            asyncio.create_task(self.listener.run(), name="listener"),
            asyncio.create_task(self._sweep_timer.run_forever(), name="sweep"),
            asyncio.create_task(self._heartbeat.beat_forever(), name="heartbeat"),
            asyncio.create_task(self._hand_offs.not_waiting_while_deaf(), name="deaf"),
        ]
        if self.parent_pid is not None:
            helpers.append(asyncio.create_task(self._watch_parent(), name="parent"))
        if self.replaces_pid is not None:
            helpers.append(asyncio.create_task(self._heartbeat.end_dead_leases(self.replaces_pid)))
        if self.maintain:
            # The leader's session lock needs a session: the direct (LISTEN) URL, not a pooler.
            # A lone worker serves no /metrics: its leader publishes no gauges.
            maintenance = Maintenance(
                self.settings, self.pipeline, self.listen_url, self.worker_id, publish_metrics=False
            )
            helpers.append(asyncio.create_task(maintenance.run(), name="maintenance"))
        completer = asyncio.create_task(self._completer.complete_forever(), name="completer")
        for task in [*helpers, completer]:
            task.add_done_callback(self._side_task_ended)
        try:
            await self._dispatcher.dispatch_until_stopped()
            await self._drain()
            await self._completer.finish(completer)
        finally:
            for task in helpers:
                task.cancel()
            await cancelled(helpers)
            self._completer.ready.set()
            completer.cancel()
            await cancelled([completer])
            try:
                await self._completer.flush(final=True)
            finally:
                self._tally.write()
            await cancelled(list(self._hand_offs.background))  # a second each, then cancelled
            # Off the registry first, so no hand-off can follow; then nothing leased to this
            # worker is left behind for the lease to expire (a hand-off it never heard).
            await self._forget()
            with contextlib.suppress(psycopg.Error, TimeoutError):
                await asyncio.wait_for(self._hand_offs.release_unheard(), timeout=2)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.flow.finish_freed_notices(), timeout=2)
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
                "worker stopping: draining in-flight runs", in_flight=len(self._in_flight.tasks)
            )
            self.stopping.set()
            self._dispatcher.stop()
            self._hand_offs.leave_soon()  # no more hand-offs: it is leaving

    def _on_notification(self, payload: str | None) -> None:
        """The listener's wake-ups: a reconnect, a hand-off (this worker's or a peer's), or a
        plain wake-up for whoever listens."""
        if payload is None:  # (re)connected: what was handed to it meanwhile went unheard
            self._hand_offs.unheard = True
        elif payload.startswith(HAND_OFF):
            if not payload.startswith(self._hand_off_prefix):
                return  # a peer's hand-off
            if not self._dispatcher.take_hand_off(payload[len(self._hand_off_prefix) :]):
                return  # taken with slots left, or refused: nothing to claim
        self._wake.set()

    async def _watch_parent(self) -> None:
        """A worker whose supervisor died exits instead of running on orphaned."""
        while os.getppid() == self.parent_pid:
            await asyncio.sleep(1.0)
        self._log.warning("supervisor is gone; stopping", supervisor_pid=self.parent_pid)
        self.stop()

    async def _forget(self) -> None:
        self._hand_offs.forgotten = True
        with contextlib.suppress(psycopg.Error, TimeoutError):  # the row expires by itself
            await asyncio.wait_for(self.protocol.forget(), timeout=2)

    # -- shutdown -----------------------------------------------------------------------------

    async def _drain(self) -> None:
        """Stop claiming; give in-flight handlers until the drain timeout, then release them."""
        tasks = self._in_flight.tasks
        deadline = time.monotonic() + self.settings.drain_timeout
        while tasks and time.monotonic() < deadline:
            self._slot_freed.clear()
            try:
                await asyncio.wait_for(self._slot_freed.wait(), deadline - time.monotonic())
            except TimeoutError:
                break
        leftover = dict(tasks)
        for run_id in leftover:
            self._in_flight.take_away(run_id)
        await asyncio.gather(*leftover.values(), return_exceptions=True)
        if leftover:
            try:
                released = await self.protocol.release(list(leftover))
                self._log.info("released unfinished runs", runs=released)
            except DB_ERRORS as exc:
                self._log.warning(
                    "could not release runs; their leases will expire", error=brief(exc)
                )
            except psycopg.Error as exc:
                await self._errors.refused("release", exc, back_off=False)


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
    # Everything made so far (modules, the pipeline, settings) lives as long as the process:
    # out of the collector's sight, a full collection no longer walks it again and again.
    gc.freeze()
    event_loop.run(worker.run(), settings.event_loop)
    if worker.failed:
        raise SystemExit(1)
