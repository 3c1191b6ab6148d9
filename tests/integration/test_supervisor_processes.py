"""The supervisor's process handling with real forks and signals (no database involved)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from conveyor.supervisor.processes import Supervisor
from conveyor.worker.liveness import LivenessSlot
from tests.helpers import ROOT


@pytest.fixture(autouse=True)
def restore_signal_handlers() -> Iterator[None]:
    saved = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    yield
    for signum, handler in saved.items():
        signal.signal(signum, handler)


def test_gives_up_with_exit_code_1_on_a_stage_that_keeps_crashing() -> None:
    def crash(name: str, liveness: LivenessSlot, died_pid: int | None) -> None:
        os._exit(3)

    supervisor = Supervisor(
        {"doomed": 1}, crash, grace_seconds=1, max_consecutive_crashes=4, max_restart_delay=0.05
    )
    assert supervisor.run() == 1
    assert supervisor.slots[0].restarts == 3


def test_restarts_dead_children_and_stops_them_all_on_sigterm(tmp_path: Path) -> None:
    def child(name: str, liveness: LivenessSlot, died_pid: int | None) -> None:
        (tmp_path / f"{name}-{os.getpid()}").write_text(str(died_pid))
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
    # The replacement is told which child it replaces (it ends the leases left behind).
    told = {int(m.name.split("-")[1]): m.read_text() for m in tmp_path.glob("short-*")}
    first, second = sorted(told, key=lambda pid: told[pid] != "None")
    assert (told[first], told[second]) == ("None", str(first))
    assert {m.read_text() for m in tmp_path.glob("long-*")} == {"None"}
    for marker in tmp_path.iterdir():
        pid = int(marker.name.split("-")[1])
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)  # reaped: no child left behind


_SIGNAL_DURING_A_LOG_LINE = """
import io, os, signal, structlog
from conveyor.supervisor.processes import Supervisor

class SignalledWhileWriting(io.StringIO):
    def write(self, text):
        if "trigger" in text:
            os.kill(os.getpid(), signal.SIGTERM)  # handled before write() returns
        return super().write(text)

structlog.configure(logger_factory=structlog.PrintLoggerFactory(SignalledWhileWriting()))
supervisor = Supervisor({"x": 1}, lambda *args: None, grace_seconds=1)
signal.signal(signal.SIGTERM, supervisor._on_signal)
structlog.get_logger().info("trigger")
assert supervisor.stopping and supervisor.stop_signal == signal.SIGTERM
print("returned")
"""


def test_a_stop_signal_in_the_middle_of_a_log_line_does_not_hang_the_supervisor() -> None:
    """SIGTERM may land while the supervisor writes a log line, under the logger's lock, which
    is not reentrant: a handler that logged would wait for it forever (seen in a test run)."""
    done = subprocess.run(
        [sys.executable, "-c", _SIGNAL_DURING_A_LOG_LINE],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=20,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "returned"
