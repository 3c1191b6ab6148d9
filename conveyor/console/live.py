"""Live updates: one LISTEN connection per console process, fanned out to browsers over SSE.

The connection listens on the observer channel `pipeline_events` ({id, status, operation} per
changed run). Changes are gathered for a short debounce window, then every subscriber gets one
`runs` message (the changed ids, or `all` when there were many), and the shared overview is
refreshed (at most once per its interval, with a trailing refresh so the last change shows) and
announced with one `overview` message. Browsers fetch what they show from the console, which
answers from the shared overview or one cheap query for one run or one page.

A lost connection is re-established with backoff, like a worker's listener; on return every
subscriber is told `all`, since changes made meanwhile were never heard ("reconnect, then
re-read"). A silent connection proves itself by notifying itself on a private channel.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import secrets
import socket
import time
from collections.abc import AsyncIterator
from typing import Any

import psycopg
import structlog
from psycopg import sql
from tenacity import AsyncRetrying, retry_if_exception_type, wait_exponential_jitter

from conveyor.console.overview import OverviewCache
from conveyor.db import CONNECT_TIMEOUT_SECONDS, KEEPALIVE_OPTIONS, brief

log = structlog.get_logger("conveyor.console")

OBSERVER_CHANNEL = "pipeline_events"
DEBOUNCE_SECONDS = 0.5
MAX_IDS_PER_MESSAGE = 200  # beyond this a message says "all": pages re-read what they show
IDLE_REFRESH_SECONDS = 5.0  # ages and worker heartbeats move without notifications
KEEPALIVE_SECONDS = 15.0
_CONNECTION_ERRORS = (psycopg.OperationalError, psycopg.InterfaceError, TimeoutError, OSError)


class Message:
    """One server-sent event, encoded once and shared by every subscriber."""

    def __init__(self, event: str, data: dict[str, Any]) -> None:
        self.encoded = f"event: {event}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n"


class LiveHub:
    def __init__(
        self,
        url: str,
        overview: OverviewCache,
        *,
        health_interval: float = 15.0,
        health_timeout: float = 5.0,
    ) -> None:
        self.url = url
        self.overview = overview
        self.health_interval = health_interval
        self.health_timeout = health_timeout
        self.ping_channel = f"conveyor_console_{os.getpid()}_{secrets.token_hex(4)}"
        self.connected = asyncio.Event()
        self.reconnects = 0
        self._subscribers: set[asyncio.Queue[Message | None]] = set()
        self._changed_ids: set[str] = set()
        self._everything_changed = False
        self._wake = asyncio.Event()
        self._closing = False
        self._tasks: list[asyncio.Task[None]] = []

    # -- lifecycle -----------------------------------------------------------------------------

    def start(self) -> None:
        self._tasks = [
            asyncio.create_task(self._listen_forever(), name="console-listen"),
            asyncio.create_task(self._publish_forever(), name="console-publish"),
        ]

    async def stop(self) -> None:
        self.end_streams()
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task

    def end_streams(self) -> None:
        """Close every browser's stream (server shutdown): EventSource reconnects by itself."""
        self._closing = True
        for queue in list(self._subscribers):
            _offer(queue, None)

    # -- browsers ------------------------------------------------------------------------------

    @property
    def subscribers(self) -> int:
        return len(self._subscribers)

    async def stream(self) -> AsyncIterator[str]:
        """One browser's event stream; ends when the browser leaves or the server stops."""
        queue: asyncio.Queue[Message | None] = asyncio.Queue(maxsize=32)
        self._subscribers.add(queue)
        try:
            yield "retry: 2000\n\n"
            state = "open" if self.connected.is_set() else "degraded"
            yield Message("hello", {"listening": state == "open"}).encoded
            while not self._closing:
                try:
                    message = await asyncio.wait_for(queue.get(), KEEPALIVE_SECONDS)
                except TimeoutError:
                    yield ": keepalive\n\n"
                    continue
                if message is None:
                    return
                yield message.encoded
        finally:
            self._subscribers.discard(queue)

    def broadcast(self, message: Message) -> None:
        for queue in list(self._subscribers):
            _offer(queue, message)

    # -- the observer channel ------------------------------------------------------------------

    def note_change(self, payload: str) -> None:
        try:
            run_id = str(json.loads(payload)["id"])
        except (ValueError, KeyError, TypeError):
            self._everything_changed = True
        else:
            if len(self._changed_ids) < MAX_IDS_PER_MESSAGE:
                self._changed_ids.add(run_id)
            else:
                self._everything_changed = True
        self._wake.set()

    async def _listen_forever(self) -> None:
        first = True
        while True:
            conn = await self._connect()
            if not first:
                self.reconnects += 1
                log.info("console listener reconnected", reconnects=self.reconnects)
                self._everything_changed = True  # what changed while we were away is unknown
                self._wake.set()
            first = False
            try:
                await self._listen(conn)
            except _CONNECTION_ERRORS as exc:
                self.connected.clear()
                self.broadcast(Message("listener", {"listening": False}))
                log.warning("console listener connection lost", error=brief(exc))
                with contextlib.suppress(Exception):
                    await conn.close()

    async def _connect(self) -> psycopg.AsyncConnection[Any]:
        async for attempt in AsyncRetrying(
            retry=retry_if_exception_type(_CONNECTION_ERRORS),
            wait=wait_exponential_jitter(multiplier=0.05, max=5.0, jitter=0.2),
            before_sleep=_log_retry,
        ):
            with attempt:
                conn = await psycopg.AsyncConnection.connect(
                    self.url,
                    autocommit=True,
                    application_name=(
                        f"conveyor-console-listen:{socket.gethostname()}-{os.getpid()}"[:63]
                    ),
                    connect_timeout=CONNECT_TIMEOUT_SECONDS,
                    **KEEPALIVE_OPTIONS,
                )
                try:
                    for channel in (OBSERVER_CHANNEL, self.ping_channel):
                        await conn.execute(sql.SQL("LISTEN {}").format(sql.Identifier(channel)))
                except BaseException:
                    await conn.close()
                    raise
        self.connected.set()
        self.broadcast(Message("listener", {"listening": True}))
        return conn

    async def _listen(self, conn: psycopg.AsyncConnection[Any]) -> None:
        while True:
            heard = False
            async for notify in conn.notifies(timeout=self.health_interval):
                heard = True
                if notify.channel == OBSERVER_CHANNEL:
                    self.note_change(notify.payload)
            if not heard:
                await self._check_health(conn)

    async def _check_health(self, conn: psycopg.AsyncConnection[Any]) -> None:
        """A half-open socket hears nothing forever: ask the server to echo, or reconnect."""
        async with asyncio.timeout(self.health_timeout):
            await conn.execute("SELECT pg_notify(%s, 'ping')", (self.ping_channel,))
            async for notify in conn.notifies():
                if notify.channel == OBSERVER_CHANNEL:
                    self.note_change(notify.payload)
                else:
                    return

    # -- debounced publishing --------------------------------------------------------------------

    async def _publish_forever(self) -> None:
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), IDLE_REFRESH_SECONDS)
            if self._wake.is_set():
                await asyncio.sleep(DEBOUNCE_SECONDS)  # gather a burst into one message
                self._wake.clear()
                ids, everything = self._changed_ids, self._everything_changed
                self._changed_ids, self._everything_changed = set(), False
                if everything:
                    self.broadcast(Message("runs", {"all": True}))
                elif ids:
                    self.broadcast(Message("runs", {"ids": sorted(ids)}))
            if self._subscribers:  # nobody looking: nothing to refresh
                await self._refresh_overview()

    async def _refresh_overview(self) -> None:
        # Trailing edge: a change just after the last refresh is shown once the interval is up.
        wait = self.overview.max_age - self.overview.age
        if wait > 0:
            await asyncio.sleep(wait)
        started = time.monotonic()
        try:
            overview = await self.overview.refresh(older_than=self.overview.max_age)
        except Exception as exc:  # the database is away: say so, keep publishing
            log.warning("overview refresh failed", error=brief(exc))
            self.broadcast(Message("overview", {"error": True}))
            await asyncio.sleep(1.0)
            return
        self.broadcast(
            Message(
                "overview",
                {
                    "generated_at": overview.generated_at,
                    "seconds": round(time.monotonic() - started, 4),
                },
            )
        )


def _offer(queue: asyncio.Queue[Message | None], message: Message | None) -> None:
    """A browser that does not keep up misses messages, never slows the others; the next
    message makes it re-read anyway."""
    with contextlib.suppress(asyncio.QueueFull):
        queue.put_nowait(message)


def _log_retry(state: Any) -> None:
    exc = state.outcome.exception() if state.outcome else None
    log.warning(
        "console listener cannot connect; retrying",
        error=brief(exc),
        retry_in=round(state.next_action.sleep, 3) if state.next_action else None,
    )
