"""The supervisor's process handling with real forks and signals (no database involved)."""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from conveyor.supervisor.processes import Supervisor
from conveyor.worker.liveness import LivenessSlot


@pytest.fixture(autouse=True)
def restore_signal_handlers() -> Iterator[None]:
    saved = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    yield
    for signum, handler in saved.items():
        signal.signal(signum, handler)


def test_gives_up_with_exit_code_1_on_a_stage_that_keeps_crashing() -> None:
    def crash(name: str, liveness: LivenessSlot) -> None:
        os._exit(3)

    supervisor = Supervisor(
        {"doomed": 1}, crash, grace_seconds=1, max_consecutive_crashes=4, max_restart_delay=0.05
    )
    assert supervisor.run() == 1
    assert supervisor.slots[0].restarts == 3


def test_restarts_dead_children_and_stops_them_all_on_sigterm(tmp_path: Path) -> None:
    def child(name: str, liveness: LivenessSlot) -> None:
        (tmp_path / f"{name}-{os.getpid()}").touch()
        if len(list(tmp_path.glob("short-*"))) == 1 and name == "short":
            os._exit(0)  # the first "short" child dies at once and must be replaced
        while True:
            liveness.tick()
            time.sleep(0.1)

    def stop_when_restarted() -> None:
        deadline = time.monotonic() + 20
        while len(list(tmp_path.glob("short-*"))) < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=stop_when_restarted, daemon=True).start()
    supervisor = Supervisor({"short": 1, "long": 2}, child, grace_seconds=5)
    assert supervisor.run() == 0
    assert len(list(tmp_path.glob("short-*"))) == 2
    assert len(list(tmp_path.glob("long-*"))) == 2
    for marker in tmp_path.iterdir():
        pid = int(marker.name.split("-")[1])
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)  # reaped: no child left behind
