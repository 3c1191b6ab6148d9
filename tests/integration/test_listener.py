"""The listener's health check against a real server: its ping is told apart from wake-ups; on
each loop a worker may run on."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
import threading
import time
from collections.abc import Callable

import psycopg
import pytest

from conveyor import event_loop
from conveyor.event_loop import EVENT_LOOPS
from conveyor.listening import Listener
from tests.chaos.proxy import upstream_of

pytestmark = pytest.mark.parametrize("loop_name", EVENT_LOOPS)

CHANNEL = "conveyor.test.NEW"


def _notify(url: str, payload: str) -> None:
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("SELECT pg_notify(%s, %s)", (CHANNEL, payload))


async def _health_check_after(url: str, *payloads: str) -> tuple[int, list[str]]:
    """Connect a listener, commit `payloads` on its channel, then run one health check: the
    number of wake-ups it delivered, and the payloads it left unread."""
    woken = 0
    unread: list[str] = []

    def on_wake(payload: str | None) -> None:
        nonlocal woken
        woken += 1

    listener = Listener(url, CHANNEL, on_wake, health_interval=3600, health_timeout=10)
    conn = await listener._connect()
    try:
        for payload in payloads:
            await asyncio.to_thread(_notify, url, payload)
        # Committed before the ping is sent, these reach the listener ahead of it: they stand
        # for notifications that arrive while the check waits for its ping.
        await listener._check_health(conn)
        assert listener.connected.is_set()
        # Whatever is still on the connection, read past the listener (which hands everything
        # it reads to on_wake or takes it for its ping).
        await asyncio.sleep(0.2)
        conn.pgconn.consume_input()
        while (left := conn.pgconn.notifies()) is not None:
            unread.append(left.extra.decode())
    finally:
        await listener.close()
    return woken, unread


@pytest.mark.timeout(60)
def test_a_wake_up_arriving_during_the_health_check_is_delivered(
    database_url: str, loop_name: str
) -> None:
    assert event_loop.run(_health_check_after(database_url, ""), loop_name) == (1, [])


@pytest.mark.timeout(60)
def test_every_wake_up_ahead_of_the_ping_is_delivered(database_url: str, loop_name: str) -> None:
    assert event_loop.run(_health_check_after(database_url, "", "run-1", "run-2"), loop_name) == (
        3,
        [],
    )


@pytest.mark.timeout(60)
def test_a_peers_ping_is_neither_a_wake_up_nor_taken_for_the_own_ping(
    database_url: str, loop_name: str
) -> None:
    # Every worker of a stage listens on the same channel and hears its peers' pings.
    # The check waits for its own ping: not satisfied by the first ping it hears.
    assert event_loop.run(_health_check_after(database_url, "ping:a-peer", "ping"), loop_name) == (
        0,
        [],
    )


async def _wait_for(condition: Callable[[], bool], timeout: float = 10.0) -> None:
    async with asyncio.timeout(timeout):
        while not condition():
            await asyncio.sleep(0.01)


async def _idle_listener_hears_wake_ups_and_survives_termination(url: str) -> None:
    heard: list[str | None] = []

    listener = Listener(url, CHANNEL, heard.append, health_interval=3600, health_timeout=10)
    task = asyncio.create_task(listener.run())
    try:
        await asyncio.wait_for(listener.connected.wait(), 10)
        assert heard == [None]  # connected: sweep, whatever was sent before is gone
        for payload in ("", "run-1", "ping:a-peer"):
            await asyncio.to_thread(_notify, url, payload)
        await _wait_for(lambda: len(heard) == 3)
        assert heard == [None, "", "run-1"]  # the payloads, and no peer's ping
        assert listener.last_notification_at > 0

        # The server ends the connection under the idle listener: read as a loss, reconnected.
        assert listener._conn is not None
        pid = listener._conn.info.backend_pid
        with psycopg.connect(url, autocommit=True) as admin:
            admin.execute("SELECT pg_terminate_backend(%s)", (pid,))
        await _wait_for(lambda: listener.reconnects == 1)
        await _wait_for(lambda: len(heard) == 4)
        assert heard[3] is None  # reconnected: sweep again
        await asyncio.to_thread(_notify, url, "")
        await _wait_for(lambda: len(heard) == 5)
        assert not task.done()
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await listener.close()


@pytest.mark.timeout(60)
def test_an_idle_listener_delivers_wake_ups_and_reconnects_when_its_backend_ends(
    database_url: str, loop_name: str
) -> None:
    event_loop.run(_idle_listener_hears_wake_ups_and_survives_termination(database_url), loop_name)


@pytest.mark.timeout(60)
def test_an_observer_of_the_channel_never_hears_a_health_ping(
    database_url: str, loop_name: str
) -> None:
    """pipeline_events carries one JSON object per changed run: the console's pings stay off it."""

    async def check_health_while_observed() -> list[str]:
        with psycopg.connect(database_url, autocommit=True) as observer:
            observer.execute(f'LISTEN "{CHANNEL}"')
            listener = Listener(database_url, CHANNEL, lambda _: None, health_interval=3600)
            conn = await listener._connect()
            try:
                await listener._check_health(conn)
                await listener._check_health(conn)
            finally:
                await listener.close()
            return [n.payload for n in observer.notifies(timeout=0.5)]

    assert event_loop.run(check_health_while_observed(), loop_name) == []


class _ResettingProxy:
    """Loopback TCP to the server; reset() ends every client connection with a TCP reset."""

    def __init__(self, url: str) -> None:
        self._upstream = upstream_of(url)
        self._server = socket.create_server(("127.0.0.1", 0))
        self.port = self._server.getsockname()[1]
        self._clients: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._server.accept()
            except OSError:
                return  # closed
            if isinstance(self._upstream, str):
                upstream = socket.socket(socket.AF_UNIX)
                upstream.connect(self._upstream)
            else:
                upstream = socket.create_connection(self._upstream)
            self._clients.append(client)
            for source, sink in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(source, sink), daemon=True).start()

    @staticmethod
    def _pump(source: socket.socket, sink: socket.socket) -> None:
        try:
            while data := source.recv(65536):
                sink.sendall(data)
        except OSError:
            pass
        finally:
            for end in (source, sink):
                end.close()

    def reset(self) -> None:
        for client in self._clients:
            # Closed with a zero linger: a reset, not a FIN, the error a dead NAT or proxy
            # leaves. The pump reading the client closes it, once this wakes its read.
            with contextlib.suppress(OSError):  # already closed by its pump
                client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                client.shutdown(socket.SHUT_RD)
        self._clients.clear()

    def close(self) -> None:
        self.reset()
        self._server.close()


async def _wake_up_then_reset(url: str) -> None:
    heard: list[str | None] = []
    proxy = _ResettingProxy(url)
    proxied = psycopg.conninfo.make_conninfo(url, host="127.0.0.1", port=str(proxy.port))
    listener = Listener(proxied, CHANNEL, heard.append, health_interval=3600, health_timeout=10)
    task = asyncio.create_task(listener.run())
    try:
        await asyncio.wait_for(listener.connected.wait(), 10)

        reset = threading.Event()

        def arrive_then_reset() -> None:
            _notify(url, "run-1")
            time.sleep(0.2)  # the proxy passed the wake-up on
            proxy.reset()
            reset.set()

        def hold_the_loop() -> None:
            threading.Thread(target=arrive_then_reset).start()
            assert reset.wait(10)
            time.sleep(0.1)  # the reset reached the listener's socket

        # The loop is held while a wake-up arrives and the reset follows it: the listener then
        # finds both on its socket at once.
        asyncio.get_running_loop().call_soon(hold_the_loop)
        await _wait_for(lambda: "run-1" in heard, 5)
        await _wait_for(lambda: listener.reconnects == 1, 5)  # the reset read as a loss at once
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await listener.close()
        proxy.close()


@pytest.mark.timeout(60)
def test_a_reset_right_behind_a_wake_up_is_a_loss_read_at_once(
    database_url: str, loop_name: str
) -> None:
    event_loop.run(_wake_up_then_reset(database_url), loop_name)
