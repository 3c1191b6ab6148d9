"""How a worker meets database errors: one place decides what "the database is away" means.

Two kinds, each answered its own way by every part of the worker:
- the database is away (a lost connection, a shutdown, a deadlock): logged, and the caller tries
  again after a short random pause; a read-only server also drops its connections;
- PostgreSQL refused a statement over a working connection: logged, counted, and the caller waits
  about a sweep interval before it tries again, since at once would only repeat the refusal.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
from typing import Any

import psycopg
from psycopg_pool import AsyncConnectionPool
from structlog.typing import FilteringBoundLogger

from conveyor import metrics
from conveyor.db import DATABASE_AWAY, brief, refusal, server_read_only
from conveyor.listening import Listener

# Errors a caller retries: the statement may well succeed on another connection, or later.
DB_ERRORS: tuple[type[Exception], ...] = (*DATABASE_AWAY, psycopg.errors.DeadlockDetected)


class DatabaseErrors:
    def __init__(
        self,
        *,
        pool: AsyncConnectionPool[Any],
        listener: Listener,
        stopping: asyncio.Event,
        sweep_interval: float,
        labels: tuple[str, str],
        log: FilteringBoundLogger,
    ) -> None:
        self._pool = pool
        self._listener = listener
        self._stopping = stopping
        self._sweep_interval = sweep_interval
        self._labels = labels
        self._log = log

    async def away(self, what: str, exc: BaseException) -> None:
        """The database did not answer `what`: pause briefly before the caller tries again."""
        self._log.warning("database error; will retry", during=what, error=brief(exc))
        if server_read_only(exc):
            # A standby, or a primary demoted by a failover: every connection to it is useless.
            # New ones (a multi-host URL with target_session_attrs=read-write) find the primary.
            self._listener.reconnect()
            await self._pool.drain()
        await asyncio.sleep(random.uniform(0.05, 0.5))

    async def refused(self, operation: str, exc: psycopg.Error, *, back_off: bool = True) -> None:
        """PostgreSQL refused a statement over a working connection: a malformed row, a broken
        schema, a missing privilege. Logged and counted, never the end of the worker (its
        restarts would meet the same refusal, and the crash-loop bound would stop them all).
        With `back_off`, the caller waits about a sweep interval (or until the worker stops)."""
        retry_in = self._sweep_interval * random.uniform(0.8, 1.2) if back_off else None
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
                    await self._stopping.wait()
