"""The sweep timer claims on its interval, and at most every second while the listener is down
or unproven. A listener that connects during the first tick does not leave the timer on the
tightened interval for one more sweep: an idle worker that has just started sweeps once."""

from __future__ import annotations

import asyncio
from typing import Any, cast

import pytest

from conveyor.worker import sweep_timer
from conveyor.worker.sweep_timer import SweepTimer


class _Listener:
    def __init__(self) -> None:
        self.connected = asyncio.Event()


def _sweeps(monkeypatch: pytest.MonkeyPatch, *, connect_after: float | None, watch: float) -> int:
    """How many times an idle worker's sweep timer (a sweep interval of 5 s) claims in `watch`
    seconds, its listener connecting after `connect_after` seconds (None: never), with a tick
    of 50 ms."""
    monkeypatch.setattr(sweep_timer, "LIVENESS_TICK", 0.05)
    sweeps: list[float] = []

    async def scenario() -> None:
        listener = _Listener()
        timer = SweepTimer(
            cast(Any, listener),
            sweep_interval=5.0,
            sweep=lambda: sweeps.append(0.0),
            liveness=None,
        )
        running = asyncio.create_task(timer.run_forever())
        if connect_after is not None:
            await asyncio.sleep(connect_after)
            listener.connected.set()
        await asyncio.sleep(watch)
        running.cancel()

    asyncio.run(scenario())
    return len(sweeps)


def test_a_listener_that_connects_in_the_first_tick_gets_one_sweep(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # long enough for a second sweep on the tightened interval (a second, +-20%)
    assert _sweeps(monkeypatch, connect_after=0.01, watch=1.6) == 1


def test_while_the_listener_is_away_the_timer_sweeps_every_tick(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    assert 5 <= _sweeps(monkeypatch, connect_after=None, watch=0.5) <= 11
