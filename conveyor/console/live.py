"""Live updates: one LISTEN connection per console process, fanned out to browsers over SSE.

The connection listens on the observer channel `pipeline_events` ({id, status, operation} per
changed run). Changes are gathered for a short debounce window, then every subscriber gets one
`runs` message (the changed ids, or `all` when there were many), and the shared overview is
refreshed (at most once per its interval, with a trailing refresh so the last change shows) and
announced with one `overview` message. Browsers fetch what they show from the console, which
answers from the shared overview or one cheap query for one run or one page.

The connection is a worker's kind (conveyor/listening.py): it reconnects with backoff, and a
silent one proves itself by notifying itself (a `ping:<token>` payload on the channel, which
every conveyor listener skips). On return every subscriber is told `all`, since changes made
meanwhile were never heard ("reconnect, then re-read").

Payloads are read only while a browser streams, and until the next message says `all` anyway:
a busy pipeline notifies thousands of times a second. Any login may notify on the channel: a
payload read that the trigger would not send (oversized, not JSON, not an object of strings,
no run id) is logged and skipped, and so, by the listener, is one whose handling fails. The
listening and publishing tasks are watched: one that dies anyway is logged and replaced.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import socket
import time
from collections.abc import AsyncIterator, Callable, Coroutine
from typing import Any
from uuid import UUID

import structlog

from conveyor.console.overview import OverviewCache
from conveyor.db import brief
from conveyor.listening import Listener

log = structlog.get_logger("conveyor.console")

OBSERVER_CHANNEL = "pipeline_events"
DEBOUNCE_SECONDS = 0.5
MAX_IDS_PER_MESSAGE = 200  # beyond this a message says "all": pages re-read what they show
IDLE_REFRESH_SECONDS = 5.0  # ages and worker heartbeats move without notifications
KEEPALIVE_SECONDS = 15.0
MAX_PAYLOAD_CHARS = 1024  # the trigger's {id, status, operation} is about a hundred
MALFORMED_LOG_SECONDS = 10.0  # one line per interval, with the count: a flood is not a log flood
RESTART_DELAY_SECONDS = 1.0  # a task that dies at once is not restarted in a tight loop


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
        self.connected = asyncio.Event()
        self.reconnects = 0
        self._subscribers: set[asyncio.Queue[Message | None]] = set()
        self._changed_ids: set[str] = set()
        self._everything_changed = False
        self._wake = asyncio.Event()
        self._closing = False
        self._stopping = False
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._listened = False  # a listener has been connected before: a new one says `all`
        self.malformed = 0  # observer payloads skipped
        self._malformed_logged = 0
        self._malformed_logged_at = float("-inf")
        self.restarts = 0  # tasks that died and were replaced

    # -- lifecycle -----------------------------------------------------------------------------

    def start(self) -> None:
        self._spawn("console-listen", self._listen_forever)
        self._spawn("console-publish", self._publish_forever)

    async def stop(self) -> None:
        self._stopping = True
        self.end_streams()
        tasks = list(self._tasks.values())
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task

    def _spawn(self, name: str, run: Callable[[], Coroutine[Any, Any, None]]) -> None:
        task = asyncio.create_task(run(), name=name)
        self._tasks[name] = task
        task.add_done_callback(lambda done: self._task_ended(done, name, run))

    def _task_ended(
        self, task: asyncio.Task[None], name: str, run: Callable[[], Coroutine[Any, Any, None]]
    ) -> None:
        """Both tasks run forever: one that ends was not stopped, and is replaced."""
        if self._stopping or task.cancelled():
            return
        self.restarts += 1
        log.error(
            "console live task died; replacing it",
            task=name,
            error=brief(task.exception()),
            restarts=self.restarts,
            exc_info=task.exception(),
        )
        if name == "console-listen":
            self.connected.clear()
            self.broadcast(Message("listener", {"listening": False}))

        def respawn() -> None:
            if not self._stopping:
                self._spawn(name, run)

        asyncio.get_running_loop().call_later(RESTART_DELAY_SECONDS, respawn)

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
        # A busy pipeline notifies thousands of times a second: with nobody streaming, or with
        # the next message saying `all` already, the payload is not read at all.
        if not self._subscribers or self._everything_changed:
            return
        run_id = run_id_of(payload)
        if run_id is None:
            self._skip(payload)
            return
        if len(self._changed_ids) < MAX_IDS_PER_MESSAGE:
            self._changed_ids.add(run_id)
        else:
            self._everything_changed = True
        self._wake.set()

    def _skip(self, payload: str) -> None:
        self.malformed += 1
        now = time.monotonic()
        if now - self._malformed_logged_at < MALFORMED_LOG_SECONDS:
            return
        log.warning(
            "console skipped a malformed observer payload",
            channel=OBSERVER_CHANNEL,
            chars=len(payload),
            start=payload[:80],
            skipped=self.malformed - self._malformed_logged,  # since the last such line
        )
        self._malformed_logged, self._malformed_logged_at = self.malformed, now

    async def _listen_forever(self) -> None:
        """One listener on the observer channel. It reconnects by itself: this task ends only
        by a bug, and is then replaced, with a new connection."""
        listener = Listener(
            self.url,
            OBSERVER_CHANNEL,
            self._woken,
            health_interval=self.health_interval,
            health_timeout=self.health_timeout,
            application_name=f"conveyor-console-listen:{socket.gethostname()}-{os.getpid()}"[:63],
        )
        losses = asyncio.create_task(self._announce_losses(listener), name="console-losses")
        try:
            await listener.run()
        finally:
            losses.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await losses
            await listener.close()

    def _woken(self, payload: str | None) -> None:
        """The listener's callback: a payload, or None after every (re)connect."""
        if payload is None:
            self.note_listening()
        else:
            self.note_change(payload)

    def note_listening(self) -> None:
        """The listener is connected (again): after a reconnect, pages re-read everything."""
        if self._listened:
            self.reconnects += 1
            log.info("console listener reconnected", reconnects=self.reconnects)
            self._everything_changed = True  # what changed while we were away is unknown
            self._wake.set()
        self._listened = True
        self.connected.set()
        self.broadcast(Message("listener", {"listening": True}))

    async def _announce_losses(self, listener: Listener) -> None:
        """Tell the pages when the connection is lost (the listener logs it and reconnects)."""
        while True:
            await listener.connected.wait()
            await listener.disconnected.wait()
            if not listener.connected.is_set():
                self.connected.clear()
                self.broadcast(Message("listener", {"listening": False}))

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


def run_id_of(payload: str) -> str | None:
    """The run id of an observer payload, or None for anything the trigger does not send."""
    if len(payload) > MAX_PAYLOAD_CHARS:
        return None
    try:
        data = json.loads(payload)
    except (ValueError, RecursionError):
        return None
    if not isinstance(data, dict) or not isinstance(data.get("id"), str):
        return None
    if not all(isinstance(data.get(key, ""), str) for key in ("status", "operation")):
        return None
    try:
        return str(UUID(data["id"]))
    except ValueError:
        return None


def _offer(queue: asyncio.Queue[Message | None], message: Message | None) -> None:
    """A browser that does not keep up misses messages, never slows the others; the next
    message makes it re-read anyway."""
    with contextlib.suppress(asyncio.QueueFull):
        queue.put_nowait(message)
