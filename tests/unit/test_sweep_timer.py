"""The sweep timer claims on its interval, and at most every second while the listener is down
or unproven. A listener that connects during the first tick does not leave the timer on the
tightened interval for one more sweep: an idle worker that has just started sweeps once."""

from __future__ import annotations

import asyncio

import pytest

from conveyor.worker import loop
from tests.helpers import unstarted_worker


def _sweeps(monkeypatch: pytest.MonkeyPatch, *, connect_after: float | None, watch: float) -> int:
    """How many times an idle worker's sweep timer claims in `watch` seconds, its listener
    connecting after `connect_after` seconds (None: never), with a tick of 50 ms."""
    monkeypatch.setattr(loop, "_LIVENESS_TICK", 0.05)
    worker = unstarted_worker()
    sweeps: list[float] = []
    monkeypatch.setattr(worker._dispatcher, "sweep", lambda: sweeps.append(0.0))

    async def scenario() -> None:
        timer = asyncio.create_task(worker._sweep_timer())
        if connect_after is not None:
            await asyncio.sleep(connect_after)
            worker.listener.connected.set()
        await asyncio.sleep(watch)
        timer.cancel()

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
