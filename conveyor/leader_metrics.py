"""What the maintenance leader publishes about the whole pipeline, once per tick.

One query for the queue (served by the claim's partial index), one for the worker registry, the
server's NOTIFY queue fill, and the cancellations recorded since the last tick. Workers never
run these: a hundred workers must not mean a hundred aggregates per scrape.

A process that stops leading sets its gauges to NaN ("unknown here"): across hosts, `max by`
then reads the current leader's values, never a former leader's frozen ones.
"""

from __future__ import annotations

import math
from typing import Any

import psycopg
from prometheus_client import Gauge

from conveyor import metrics
from conveyor.pipeline import Pipeline


class LeaderMetrics:
    def __init__(self, pipeline: Pipeline, sql: dict[str, str]) -> None:
        self.pipeline = pipeline
        self.sql = sql
        # Every unfinished status a stage owns: its input and its working status, and the
        # status its runs wait in for their children.
        self._stage_of = {
            status: stage.name
            for stage in pipeline.stages
            for status in (stage.consumes, stage.working, stage.waiting)
            if status
        }
        # A parent waiting for its children is due to no worker: its age is no stall.
        self._waiting = {stage.waiting for stage in pipeline.stages if stage.waiting}
        self._published: set[tuple[Gauge, tuple[str, ...]]] = set()
        self._statuses: set[str] = set()
        self._cancels = _CancelCounter(self)

    async def publish(self, conn: psycopg.AsyncConnection[Any]) -> None:
        name = self.pipeline.name
        metrics.MAINTENANCE_LEADER.labels(name).set(1)
        for stage in self.pipeline.stages:
            metrics.RESCUED.labels(name, stage.name)
            metrics.CANCELLED.labels(name, stage.name)

        cur = await conn.execute(self.sql["queue_depth"], {"pipeline": name})
        found = {
            status: (due, scheduled, oldest)
            for status, due, scheduled, oldest in await cur.fetchall()
        }
        # Statuses with no runs left (the stages' own, and any seen before) read zero, not
        # the last value seen.
        self._statuses |= {*self._stage_of, *found}
        for status in self._statuses:
            due, scheduled, oldest = found.get(status, (0, 0, 0.0))
            if status in self._waiting:
                oldest = 0.0
            labels = (name, self.stage_of(status), status)
            self._set(metrics.QUEUE_DEPTH, labels, due)
            self._set(metrics.QUEUE_SCHEDULED, labels, scheduled)
            self._set(metrics.QUEUE_OLDEST_AGE, labels, oldest)

        cur = await conn.execute(self.sql["live_workers_per_stage"], {"pipeline": name})
        alive = dict(await cur.fetchall())
        for stage in self.pipeline.stages:
            self._set(metrics.WORKERS_ALIVE, (name, stage.name), alive.get(stage.name, 0))

        cur = await conn.execute(self.sql["notification_queue_usage"])
        row = await cur.fetchone()
        self._set(metrics.NOTIFICATION_QUEUE_USAGE, (), row[0] if row else 0.0)

        await self._cancels.count(conn)
        await self._publish_limits(conn)

    async def _publish_limits(self, conn: psycopg.AsyncConnection[Any]) -> None:
        """Every key of the limits table (shared by all pipelines): what it allows, how many
        places are taken, until when it is closed."""
        cur = await conn.execute(self.sql["limit_states"])
        for key, cap, rpm, tpm, closed_until, held in await cur.fetchall():
            self._set(metrics.LIMIT_IN_FLIGHT, (key,), held)
            self._set(metrics.LIMIT_CLOSED_UNTIL, (key,), closed_until)
            for kind, allowed in (
                ("max_in_flight", cap),
                ("requests_per_minute", rpm),
                ("tokens_per_minute", tpm),
            ):
                self._set(
                    metrics.LIMIT_ALLOWED, (key, kind), math.nan if allowed is None else allowed
                )

    def resign(self) -> None:
        """Leadership lost: what this process last measured is no longer the truth."""
        for gauge, labels in self._published:
            (gauge.labels(*labels) if labels else gauge).set(math.nan)
        metrics.MAINTENANCE_LEADER.labels(self.pipeline.name).set(0)
        self._cancels.reset()

    def follow(self) -> None:
        """Not leading (yet): say so, so that 'no leader anywhere' is visible."""
        metrics.MAINTENANCE_LEADER.labels(self.pipeline.name).set(0)

    def stage_of(self, status: str) -> str:
        return self._stage_of.get(status, "")

    def _set(self, gauge: Gauge, labels: tuple[str, ...], value: float) -> None:
        (gauge.labels(*labels) if labels else gauge).set(value)
        self._published.add((gauge, labels))


class _CancelCounter:
    """Counts CANCELLED events in run_events past a mark (cancels come from short-lived CLI
    processes and the console, which cannot keep a counter a scrape would see).

    The query looks back one extra tick and skips ids already counted: an event whose id was
    assigned before the mark but whose transaction committed after it is still counted once.
    Cancels between the previous leader's last tick and this one's first are not counted.
    """

    def __init__(self, owner: LeaderMetrics) -> None:
        self.owner = owner
        self._marks: tuple[int, int] | None = None
        self._counted: set[int] = set()

    def reset(self) -> None:
        self._marks = None
        self._counted.clear()

    async def count(self, conn: psycopg.AsyncConnection[Any]) -> None:
        cur = await conn.execute(self.owner.sql["newest_event"])
        row = await cur.fetchone()
        newest = int(row[0]) if row else 0
        if self._marks is None:  # first tick as leader: what came before is not ours to count
            self._marks = (newest, newest)
            return
        oldest_mark = self._marks[0]
        cur = await conn.execute(
            self.owner.sql["cancelled_since"],
            {"pipeline": self.owner.pipeline.name, "after": oldest_mark},
        )
        for event_id, from_status in await cur.fetchall():
            if event_id in self._counted:
                continue
            self._counted.add(event_id)
            stage = self.owner.stage_of(from_status or "")
            metrics.CANCELLED.labels(self.owner.pipeline.name, stage).inc()
        self._marks = (self._marks[1], newest)
        self._counted = {i for i in self._counted if i > self._marks[0]}
