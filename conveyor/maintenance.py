"""Leader-only chores: rescue expired leases, prune old runs, analyze a grown pipeline_runs,
forget dead workers.

Exactly one process per schema and pipeline leads: the one holding a session advisory lock on
its own connection. When that process dies its connection closes, the lock is released, and
another replica takes over at its next attempt. No user cron is involved.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Awaitable
from typing import Any

import psycopg
import structlog
from psycopg import sql

from conveyor import metrics, queries
from conveyor.db import DATABASE_AWAY, brief, connect_async, refusal
from conveyor.leader_metrics import LeaderMetrics
from conveyor.migrate import latest_version
from conveyor.pipeline import Pipeline, Stage
from conveyor.settings import Settings

log = structlog.get_logger("conveyor.maintenance")
SCHEMA_CHECK_SECONDS = 60.0
# pipeline_runs is analyzed once it holds more than twice the larger of the runs last counted in
# it and this: below, a plan that reads the whole table costs little.
ANALYZE_LEAST_ROWS = 1000
# Registry rows are forgotten an hour after their process stopped beating: looking every few
# minutes is prompt enough, where every tick would be a statement every few seconds for nothing.
FORGET_DEAD_WORKERS_SECONDS = 300.0


class Maintenance:
    def __init__(
        self,
        settings: Settings,
        pipeline: Pipeline,
        url: str,
        identity: str,
        *,
        publish_metrics: bool = True,
    ) -> None:
        """`publish_metrics`: whether the leader publishes the pipeline's gauges (queue depth,
        live workers...); a lone `conveyor worker` serves no /metrics, so it does not."""
        self.settings = settings
        self.publish_metrics = publish_metrics
        self.pipeline = pipeline
        self.url = url
        self.identity = identity
        self.sql = queries.load(settings.schema)
        self.is_leader = False
        self.connected = False
        self.schema_current = False
        self._statement = ""  # the one under way, for the log line when PostgreSQL refuses it
        self._leading_since = 0.0
        self._forget_dead_workers_at = 0.0  # monotonic; the first tick looks at once
        self.lock_name = f"conveyor.leader.{settings.schema}.{pipeline.name}"
        self.published = LeaderMetrics(pipeline, self.sql)

    @property
    def interval(self) -> float:
        # Rescue promptly after a lease expires, without hammering an idle database.
        return min(self.settings.sweep_interval, self.settings.lease / 2)

    async def run(self) -> None:
        failures = 0  # in a row: only the first of a streak is logged
        while True:
            try:
                async with await connect_async(
                    self.url, f"conveyor-leader:{self.identity}"
                ) as conn:
                    schema_checked_at = 0.0
                    while True:
                        try:
                            if time.monotonic() - schema_checked_at > SCHEMA_CHECK_SECONDS:
                                self.schema_current = await self._schema_is_current(conn)
                                schema_checked_at = time.monotonic()
                            self.connected = True
                            failures = 0
                            await self._lead_or_wait(conn)
                        except DATABASE_AWAY:
                            raise
                        except psycopg.Error as exc:
                            self._statement_refused(exc)
                        await asyncio.sleep(self.interval * random.uniform(0.8, 1.2))
            # The database away (a read-only server among them): the leader reconnects, and a
            # multi-host URL finds the primary.
            except DATABASE_AWAY as exc:
                if self.is_leader:
                    log.warning("leadership lost with the connection", error=brief(exc))
                    self.published.resign()
                elif self.connected or not failures:
                    log.warning("maintenance cannot reach the database", error=brief(exc))
                failures += 1
                self.connected = False
                self.is_leader = False
                await asyncio.sleep(random.uniform(0.5, 2.0))

    def _statement_refused(self, exc: psycopg.Error) -> None:
        """PostgreSQL refused a statement over a working connection (a malformed row, a broken
        schema). Logged and counted, and tried again next round; the leader keeps its lock.
        Raised instead, it would end this task without a word, and rescues with it."""
        log.error("statement failed", operation=self._statement, **refusal(exc))
        metrics.WORKER_ERRORS.labels(self.pipeline.name, "maintenance", self._statement).inc()

    @property
    def ready(self) -> bool:
        """Database reachable and migrated to what this code expects (the supervisor's /readyz)."""
        return self.connected and self.schema_current

    async def _schema_is_current(self, conn: psycopg.AsyncConnection[Any]) -> bool:
        self._statement = "schema_version"
        cur = await conn.execute(
            sql.SQL("SELECT coalesce(max(version), 0) FROM {}.schema_migrations").format(
                sql.Identifier(self.settings.schema)
            )
        )
        row = await cur.fetchone()
        current = bool(row and row[0] >= latest_version())
        if not current:
            log.warning("schema is behind this version: run `conveyor migrate`")
        return current

    async def _lead_or_wait(self, conn: psycopg.AsyncConnection[Any]) -> None:
        if not self.is_leader:
            self._statement = "leader_lock"
            cur = await conn.execute("SELECT pg_try_advisory_lock(hashtext(%s))", (self.lock_name,))
            row = await cur.fetchone()
            self.is_leader = bool(row and row[0])
            if not self.is_leader:
                self.published.follow()
                return
            log.info("leading maintenance", pipeline=self.pipeline.name, leader=self.identity)
            self._leading_since = time.monotonic()
        await self.tick(conn)

    async def tick(self, conn: psycopg.AsyncConnection[Any]) -> None:
        # Each step on its own: a statement refused for one stage (a malformed row) must not
        # stop the rescues of the other stages, the pruning or the queue gauges.
        # The rescue tells live workers from dead ones by the registry, an unlogged table that
        # is empty after a server crash or failover (when moves may have been lost). A new
        # leader first lets the live workers beat again (every third of a lease).
        if time.monotonic() - self._leading_since >= self.settings.lease / 2:
            for stage in self.pipeline.stages:
                await self._step("rescue_expired", self._rescue(conn, stage))
        if self.settings.retention is not None:
            await self._step("prune_finished", self.prune(conn, self.settings.retention))
        await self._step("analyze_runs_if_grown", self._analyze_if_grown(conn))
        if time.monotonic() >= self._forget_dead_workers_at:
            self._forget_dead_workers_at = time.monotonic() + FORGET_DEAD_WORKERS_SECONDS
            await self._step("forget_dead_workers", conn.execute(self.sql["forget_dead_workers"]))
        if self.publish_metrics:
            await self._step("leader_metrics", self.published.publish(conn))

    async def _step(self, statement: str, step: Awaitable[object]) -> None:
        self._statement = statement
        try:
            await step
        except DATABASE_AWAY:
            raise
        except psycopg.Error as exc:
            self._statement_refused(exc)

    async def _rescue(self, conn: psycopg.AsyncConnection[Any], stage: Stage) -> None:
        cur = await conn.execute(
            self.sql["rescue_expired"],
            {
                "pipeline": self.pipeline.name,
                "stage": stage.name,
                "consumes": stage.consumes,
                "working": stage.working,
                "max_rescues": self.settings.max_rescues,
                "max_attempts": stage.max_attempts,
            },
        )
        rescued = await cur.fetchall()
        for run_id, to_status, attempt, owner in rescued:
            log.warning(
                "run rescued",
                run_id=str(run_id),
                pipeline=self.pipeline.name,
                stage=stage.name,
                attempt=attempt,
                worker=owner,
                to_status=to_status,
            )
        if rescued:
            metrics.RESCUED.labels(self.pipeline.name, stage.name).inc(len(rescued))

    async def _analyze_if_grown(self, conn: psycopg.AsyncConnection[Any]) -> None:
        """Workers keep the plans they made for the table as it was: one made for a few runs
        reads the whole table for every completion, which a burst of runs then makes longer
        by the second. ANALYZE makes every session plan again, sooner than autovacuum would."""
        cur = await conn.execute(
            self.sql["analyze_runs_if_grown"], {"least_rows": ANALYZE_LEAST_ROWS}
        )
        row = await cur.fetchone()
        if row and row[0]:
            log.info("analyzed pipeline_runs: it has more than doubled since last counted")

    async def prune(self, conn: psycopg.AsyncConnection[Any], older_than: float) -> int:
        """Delete finished runs (and their events) older than the retention, in small batches."""
        total = 0
        while True:
            cur = await conn.execute(
                self.sql["prune_finished"],
                {"pipeline": self.pipeline.name, "older_than_seconds": older_than},
            )
            deleted = len(await cur.fetchall())
            total += deleted
            if deleted < 1000:
                break
        if total:
            log.info("pruned finished runs", runs=total)
        return total
