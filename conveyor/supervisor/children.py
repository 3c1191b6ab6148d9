"""What runs in a forked child: a worker for one stage, or the maintenance process."""

from __future__ import annotations

import asyncio
import contextlib
import os

import structlog

from conveyor import event_loop
from conveyor.db import listen_url
from conveyor.maintenance import Maintenance
from conveyor.pipeline import Pipeline
from conveyor.settings import Settings
from conveyor.supervisor.processes import MAINTENANCE
from conveyor.worker.liveness import LivenessSlot
from conveyor.worker.loop import new_worker_id, run_worker


def start_child(
    settings: Settings,
    pipeline: Pipeline,
    url: str,
    name: str,
    liveness: LivenessSlot,
    supervisor_pid: int,
    died_pid: int | None = None,
) -> None:
    structlog.contextvars.clear_contextvars()
    structlog.contextvars.bind_contextvars(pid=os.getpid())
    if name == MAINTENANCE:
        event_loop.run(
            _maintain(settings, pipeline, url, liveness, supervisor_pid), settings.event_loop
        )
        return
    run_worker(
        settings,
        pipeline,
        pipeline.stage(name),
        url,
        listen_url=listen_url(settings, url),
        parent_pid=supervisor_pid,
        liveness=liveness,
        replaces_pid=died_pid,
    )


async def _maintain(
    settings: Settings, pipeline: Pipeline, url: str, liveness: LivenessSlot, supervisor_pid: int
) -> None:
    import signal

    # The leader's session lock needs a session: the direct (LISTEN) URL, not a pooler.
    maintenance = Maintenance(
        settings, pipeline, listen_url(settings, url), new_worker_id(MAINTENANCE)
    )
    structlog.contextvars.bind_contextvars(
        pipeline=pipeline.name, stage=MAINTENANCE, worker=maintenance.identity
    )
    task = asyncio.create_task(maintenance.run())
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    while not stop.is_set() and os.getppid() == supervisor_pid:
        liveness.tick()
        liveness.set_listening(maintenance.ready)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), timeout=1.0)
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
