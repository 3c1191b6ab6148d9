"""One LISTEN connection that wakes its owner, checks its own health and reconnects: the
workers' wake-ups and the console's live updates."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import socket
import time
import uuid
from collections.abc import Callable
from typing import Any

import psycopg
import structlog
from psycopg import sql
from tenacity import AsyncRetrying, retry_if_exception_type, wait_exponential_jitter

from conveyor import metrics
from conveyor.db import CONNECT_TIMEOUT_SECONDS, DATABASE_AWAY, KEEPALIVE_OPTIONS, brief
from conveyor.metrics import WRITE_DELAY

log = structlog.get_logger("conveyor.listener")

# A listener proves its connection with a ping on a channel of its own, so that neither its peers
# nor an observer of the channel it serves (pipeline_events) ever hear it. Payloads that read as
# a ping on the served channel (sent by an older version) are not taken for a wake-up either.
_PING = "ping"
# Notifications the listener's owner could not handle are logged at most this often: any login
# may send them, as many as it likes.
_BAD_NOTIFICATION_LOG_SECONDS = 10.0


def wake_channel(schema: str, pipeline: str, status: str) -> str:
    """The channel a stage's waiting workers LISTEN on (at most 63 bytes, PostgreSQL's limit)."""
    channel = f"{schema}.{pipeline}.{status}"
    if len(channel.encode()) <= 63:
        return channel
    return "conveyor." + hashlib.sha1(channel.encode()).hexdigest()[:32]


class Listener:
    """Holds one autocommit connection that LISTENs on the wake channel.

    `on_wake` is called with the payload of every wake-up notification, and with None once
    after every (re)connect, because whatever was notified while disconnected is gone. Every
    `health_interval` seconds of silence the connection proves itself with a notification to
    itself, answered within `health_timeout`; a half-open socket fails that check and is
    replaced.
    """

    def __init__(
        self,
        url: str,
        channel: str,
        on_wake: Callable[[str | None], None],
        *,
        health_interval: float = 15.0,
        health_timeout: float = 5.0,
        application_name: str = "conveyor-listener",
        metric_labels: tuple[str, str] | None = None,
    ) -> None:
        self.application_name = application_name
        self.url = url
        self.channel = channel
        self.on_wake = on_wake
        self.health_interval = health_interval
        self.health_timeout = health_timeout
        self.connected = asyncio.Event()
        self.disconnected = asyncio.Event()  # the opposite, for those who wait for a loss
        self.disconnected.set()
        self.reconnects = 0
        self._last_heard = time.monotonic()  # the silence that calls for a health check
        self._heard_anything = False
        self._ping_payload = f"{_PING}:{uuid.uuid4().hex}"
        self._ping_channel = f"conveyor.{self._ping_payload}"
        self._ping_channel_name = self._ping_channel.encode()  # as libpq gives it: ASCII
        self._encoding = "utf-8"  # the connection's, read once it is made
        self._ping_answered = False
        self._conn: psycopg.AsyncConnection[Any] | None = None
        self._metrics = _ListenerMetrics(metric_labels) if metric_labels else None
        self.bad_notifications = 0
        self._next_bad_log = 0.0

    async def run(self) -> None:
        first = True
        while True:
            conn = await self._connect()
            if not first:
                self.reconnects += 1
                if self._metrics:
                    self._metrics.reconnected()
                log.info("listener reconnected", channel=self.channel, reconnects=self.reconnects)
            first = False
            self.on_wake(None)  # sweep now: notifications sent while we were away are lost
            try:
                await self._listen(conn)
            except _CONNECTION_ERRORS as exc:
                self.connected.clear()
                self.disconnected.set()
                if self._metrics:
                    self._metrics.disconnected()
                log.warning("listener connection lost", channel=self.channel, error=brief(exc))
                await conn.close()

    def reconnect(self) -> None:
        """Drop the connection now (its server went read-only, say): the listener connects
        again, through the URL's hosts, as after any loss."""
        if self._conn is not None and self.connected.is_set():
            log.warning("listener reconnecting: its server is read-only", channel=self.channel)
            _shut_down(self._conn)

    async def close(self) -> None:
        self.connected.clear()
        self.disconnected.set()
        if self._metrics:
            self._metrics.disconnected()
        if self._conn is not None:
            await self._conn.close()

    async def _connect(self) -> psycopg.AsyncConnection[Any]:
        """Connect and LISTEN, retried with backoff for as long as the database is away."""
        async for attempt in AsyncRetrying(
            retry=retry_if_exception_type(_CONNECTION_ERRORS),
            wait=wait_exponential_jitter(multiplier=0.05, max=5.0, jitter=0.2),
            before_sleep=self._log_retry,
        ):
            with attempt:
                conn = await psycopg.AsyncConnection.connect(
                    self.url,
                    autocommit=True,
                    application_name=self.application_name,
                    connect_timeout=CONNECT_TIMEOUT_SECONDS,
                    **KEEPALIVE_OPTIONS,
                )
                # What psycopg itself reads during a statement (the health ping) goes to
                # _heard; everything else is read by _read_arrived.
                conn.add_notify_handler(self._heard)
                try:
                    await conn.execute(
                        sql.SQL("LISTEN {}; LISTEN {}").format(
                            sql.Identifier(self.channel), sql.Identifier(self._ping_channel)
                        )
                    )
                except BaseException:
                    await conn.close()
                    raise
        self._conn = conn
        self._encoding = conn.info.encoding
        self.connected.set()
        self.disconnected.clear()
        if self._metrics:
            self._metrics.connected()
        return conn

    async def _listen(self, conn: psycopg.AsyncConnection[Any]) -> None:
        while True:
            await self._until_silent(conn)
            await self._check_health(conn)

    async def _until_silent(self, conn: psycopg.AsyncConnection[Any]) -> None:
        """Handle notifications as they arrive until `health_interval` passes without any.
        They are read straight from libpq, in a reader callback that stays registered:
        psycopg's notifies(timeout=...) wakes up every 0.1 s to poll (most of what an idle
        worker cost), and a wait set up per notification (a future, a timer, registering the
        socket and removing it again) cost ~0.1 ms of every wake-up on a CPU just woken."""
        loop = asyncio.get_running_loop()
        fd = conn.fileno()
        failed: asyncio.Future[None] = loop.create_future()

        def on_readable() -> None:
            try:
                self._read_arrived(conn)
                # Once more: uvloop stops polling a socket that reports an error (a reset, a
                # keepalive timeout) after this one call, which may have read what arrived just
                # before it. This read raises that error now; on a sound socket it finds nothing.
                self._read_arrived(conn)
            except BaseException as exc:  # a lost connection: raised below, like any error
                loop.remove_reader(fd)
                if not failed.done():
                    failed.set_exception(exc)

        loop.add_reader(fd, on_readable)
        try:
            quiet_for = self.health_interval
            while True:
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(quiet_for):
                        await asyncio.shield(failed)  # only ever ends by raising
                silent = time.monotonic() - self._last_heard
                if silent >= self.health_interval:
                    return
                quiet_for = self.health_interval - silent
        finally:
            loop.remove_reader(fd)

    async def _check_health(self, conn: psycopg.AsyncConnection[Any]) -> None:
        # On timeout the socket is shut down under the probe, which then fails at once.
        # Cancelling the probe instead would make psycopg try to cancel the query over the
        # same dead path first, and wait up to 10 s more before giving the connection up.
        deadline = asyncio.get_running_loop().call_later(
            self.health_timeout, self._give_up_on, conn
        )
        self._ping_answered = False
        try:
            # A wake-up that arrives before the ping is delivered like any other (psycopg
            # hands what it reads during the statement to _heard), not taken for the ping:
            # the run it announces would otherwise wait for the sweep.
            await conn.execute("SELECT pg_notify(%s, %s)", (self._ping_channel, self._ping_payload))
            while not self._ping_answered:
                await _readable(conn.fileno(), None)
                self._read_arrived(conn)
        finally:
            deadline.cancel()

    def _read_arrived(self, conn: psycopg.AsyncConnection[Any]) -> None:
        """Handle every notification that has arrived, without waiting for more. A closed or
        broken connection raises OperationalError here."""
        pgconn = conn.pgconn
        pgconn.consume_input()
        while (arrived := pgconn.notifies()) is not None:
            self._arrived(
                arrived.relname == self._ping_channel_name,
                arrived.extra.decode(self._encoding, "replace"),
            )

    def _heard(self, notify: psycopg.Notify) -> None:
        """A notification psycopg read during the health check's statement."""
        self._arrived(notify.channel == self._ping_channel, notify.payload)

    def _arrived(self, on_ping_channel: bool, payload: str) -> None:
        """Every notification. A wake-up goes to the owner before anything is noted: it may be
        a run on its way to its handler, on a CPU just woken, where every step shows."""
        ping = on_ping_channel or payload.startswith(_PING)
        if not ping:
            self._deliver(payload)
        elif payload == self._ping_payload:
            self._ping_answered = True
        self._last_heard = heard = time.monotonic()
        self._heard_anything = True
        if self._metrics:
            self._metrics.heard(heard, ping=ping)

    @property
    def last_notification_at(self) -> float:
        """When the listener last heard anything (a wake-up or a ping), as a Unix time; 0.0
        before the first."""
        if not self._heard_anything:
            return 0.0
        return _wall_time(self._last_heard)

    def _deliver(self, payload: str) -> None:
        """Hand a payload to the owner. Whatever it carries (any login may NOTIFY on any
        channel), a payload the owner cannot handle is logged and skipped: it never ends the
        listener."""
        try:
            self.on_wake(payload)
        except Exception as exc:
            self.bad_notifications += 1
            now = time.monotonic()
            if now >= self._next_bad_log:
                self._next_bad_log = now + _BAD_NOTIFICATION_LOG_SECONDS
                log.error(
                    "notification could not be handled; skipped",
                    channel=self.channel,
                    error=brief(exc),
                    error_type=type(exc).__name__,
                    payload_bytes=len(payload.encode(errors="replace")),
                    skipped=self.bad_notifications,
                )

    def _give_up_on(self, conn: psycopg.AsyncConnection[Any]) -> None:
        log.warning(
            "listener health check timed out; reconnecting",
            channel=self.channel,
            timeout=self.health_timeout,
        )
        _shut_down(conn)

    def _log_retry(self, state: Any) -> None:
        exc = state.outcome.exception() if state.outcome else None
        log.warning(
            "listener cannot connect; retrying",
            channel=self.channel,
            error=brief(exc),
            retry_in=round(state.next_action.sleep, 3) if state.next_action else None,
        )


class _ListenerMetrics:
    """The listener's side of the metrics: is it connected, when did it last hear anything.
    What it hears is counted, and written WRITE_DELAY later (tally.py says why): a wake-up's
    path to its handler is no place for writes to memory-mapped files."""

    def __init__(self, labels: tuple[str, str]) -> None:
        self.connected_gauge = metrics.LISTENERS_CONNECTED.labels(*labels)
        self.last_heard = metrics.LAST_NOTIFICATION.labels(*labels)
        self.notifications = metrics.NOTIFICATIONS.labels(*labels)
        self.reconnects = metrics.LISTENER_RECONNECTS.labels(*labels)
        self._heard_at: float | None = None
        self._unwritten = 0
        self._scheduled: asyncio.TimerHandle | None = None

    def connected(self) -> None:
        self.write()  # what was heard before: the gauge never goes back in time
        self.connected_gauge.set(1)
        self.last_heard.set(time.time())  # connecting proves the path, like a ping

    def disconnected(self) -> None:
        self.write()
        self.connected_gauge.set(0)

    def reconnected(self) -> None:
        self.reconnects.inc()

    def heard(self, when: float, *, ping: bool) -> None:
        """`when`: time.monotonic() when it was heard (a wall clock read is one step more on
        a run's path)."""
        self._heard_at = when
        if not ping:
            self._unwritten += 1
        if self._scheduled is None:
            self._scheduled = asyncio.get_running_loop().call_later(WRITE_DELAY, self.write)

    def write(self) -> None:
        if self._scheduled is not None:
            self._scheduled.cancel()
            self._scheduled = None
        if self._heard_at is not None:
            self.last_heard.set(_wall_time(self._heard_at))
            self._heard_at = None
        if self._unwritten:
            self.notifications.inc(self._unwritten)
            self._unwritten = 0


def _wall_time(monotonic: float) -> float:
    """The Unix time of a moment read from time.monotonic()."""
    return time.time() - (time.monotonic() - monotonic)


def _shut_down(conn: psycopg.AsyncConnection[Any]) -> None:
    """Fail the connection under whatever waits on it. On a duplicate of the descriptor:
    shutdown() acts on the connection itself, and closing the duplicate leaves psycopg's own
    descriptor for psycopg to close."""
    with (
        contextlib.suppress(OSError, psycopg.Error),
        socket.socket(fileno=os.dup(conn.pgconn.socket)) as sock,
    ):
        sock.shutdown(socket.SHUT_RDWR)


async def _readable(fd: int, timeout: float | None) -> bool:
    """Whether the socket has something to read within `timeout` seconds (None: no limit)."""
    loop = asyncio.get_running_loop()
    ready: asyncio.Future[None] = loop.create_future()

    def on_readable() -> None:
        if not ready.done():
            ready.set_result(None)

    loop.add_reader(fd, on_readable)
    try:
        async with asyncio.timeout(timeout):
            await ready
        return True
    except TimeoutError:
        return False
    finally:
        loop.remove_reader(fd)


# A read-only server (a standby, a demoted primary) answers but never hears a primary's commits.
_CONNECTION_ERRORS: tuple[type[Exception], ...] = (*DATABASE_AWAY, TimeoutError, OSError)
