"""Fixtures of the chaos suite: supervisors under test, and the scenario counts for the report."""

from __future__ import annotations

import json
import os
import signal
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from benchmarks.procstat import children as children_of
from tests.chaos.load import CHAIN, is_running
from tests.helpers import ConveyorProcess, conveyor_env

SUMMARY_FILE = "chaos-summary.jsonl"
RecordCounts = Callable[..., None]
_recorded: list[dict[str, Any]] = []


@dataclass
class Supervisors:
    """Starts `conveyor run` for the chain pipeline; at teardown stops every supervisor and
    SIGKILLs any worker process it left behind (by the pids seen, never by name)."""

    database_url: str
    log_dir: Path
    started: list[ConveyorProcess] = field(default_factory=list)
    workers: set[int] = field(default_factory=set)

    def start(self, **env: str) -> ConveyorProcess:
        name = f"supervisor-{len(self.started)}.log"
        settings = {"CONVEYOR_PIPELINE": CHAIN, **env}
        process = ConveyorProcess(
            ["run"], conveyor_env(self.database_url, **settings), self.log_dir / name
        )
        self.started.append(process)
        return process

    def remember_workers(self, supervisor: ConveyorProcess) -> list[int]:
        pids = children_of(supervisor.pid)
        self.workers.update(pids)
        return pids

    def cleanup(self) -> None:
        for process in self.started:
            if process.process.poll() is None:
                self.remember_workers(process)
            process.stop(timeout=30)
        for pid in self.workers:
            if is_running(pid) and b"conveyor" in _cmdline(pid):
                os.kill(pid, signal.SIGKILL)


def _cmdline(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return b""


@pytest.fixture
def supervisors(database_url: str, tmp_path: Path) -> Iterator[Supervisors]:
    started = Supervisors(database_url, tmp_path)
    yield started
    started.cleanup()


@pytest.fixture
def record_counts(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> RecordCounts:
    """Record a scenario's counts: printed in the terminal summary and appended to
    <pytest basetemp>/chaos-summary.jsonl, so a closing note can quote them."""
    path = tmp_path_factory.getbasetemp() / SUMMARY_FILE

    def record(**counts: Any) -> None:
        entry = {"scenario": request.node.name, **counts}
        _recorded.append(entry)
        print("chaos:", json.dumps(entry))
        with path.open("a") as out:
            out.write(json.dumps(entry) + "\n")

    return record


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if not _recorded:
        return
    terminalreporter.section("chaos scenarios: counts")
    for entry in _recorded:
        scenario = entry["scenario"]
        counts = ", ".join(f"{k}={v}" for k, v in entry.items() if k != "scenario")
        terminalreporter.write_line(f"{scenario}: {counts}")
