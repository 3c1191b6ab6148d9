"""The listener's health check against a real server: its ping is told apart from wake-ups."""

from __future__ import annotations

import asyncio

import psycopg
import pytest

from conveyor.worker.listener import Listener

CHANNEL = "conveyor.test.NEW"


def _notify(url: str, payload: str) -> None:
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("SELECT pg_notify(%s, %s)", (CHANNEL, payload))


async def _health_check_after(url: str, *payloads: str) -> tuple[int, list[str]]:
    """Connect a listener, commit `payloads` on its channel, then run one health check: the
    number of wake-ups it delivered, and the payloads it left unread."""
    woken = 0
    unread: list[str] = []

    def on_wake() -> None:
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
        async for notify in conn.notifies(timeout=0.2):
            unread.append(notify.payload)
    finally:
        await listener.close()
    return woken, unread


@pytest.mark.timeout(60)
def test_a_wake_up_arriving_during_the_health_check_is_delivered(database_url: str) -> None:
    assert asyncio.run(_health_check_after(database_url, "")) == (1, [])


@pytest.mark.timeout(60)
def test_every_wake_up_ahead_of_the_ping_is_delivered(database_url: str) -> None:
    assert asyncio.run(_health_check_after(database_url, "", "run-1", "run-2")) == (3, [])


@pytest.mark.timeout(60)
def test_a_peers_ping_is_neither_a_wake_up_nor_taken_for_the_own_ping(database_url: str) -> None:
    # Every worker of a stage listens on the same channel and hears its peers' pings.
    # The check waits for its own ping: not satisfied by the first ping it hears.
    assert asyncio.run(_health_check_after(database_url, "ping:a-peer", "ping")) == (0, [])
