"""Lone `conveyor worker` processes (one per container, no supervisor, no maintenance child):
workers SIGKILLed under load, the maintenance leader among them, and replacements started. A
surviving lone worker leads maintenance and rescues the dead workers' leases."""

from __future__ import annotations

import os
import random
import signal
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.chaos.audit import assert_each_once, audit
from tests.chaos.conftest import RecordCounts
from tests.chaos.load import CHAIN, Feeder, all_in, is_running, log_events
from tests.helpers import ConveyorProcess, conveyor_env, scalar, wait_until

RUNS = 1500
PER_STAGE = 2
STAGES = ("one", "two", "three")
KILLING_SECONDS = 15.0
SETTINGS = {
    "CONVEYOR_PIPELINE": CHAIN,
    # A short lease: the dead workers' runs are rescued within seconds.
    "CONVEYOR_LEASE": "3",
    "CONVEYOR_SWEEP_INTERVAL": "0.5",
    # Kills are not the runs' fault: a run caught on several killed workers is not given up.
    "CONVEYOR_MAX_RESCUES": "10",
}

_LEADER = """
SELECT a.application_name
  FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid
 WHERE l.locktype = 'advisory' AND l.granted AND a.datname = current_database()
   AND a.application_name LIKE 'conveyor-leader:%%'
"""


@dataclass
class LoneWorkers:
    """`conveyor worker --stage S` processes; at teardown each is stopped (SIGTERM, then
    SIGKILL), by its own pid."""

    database_url: str
    log_dir: Path
    started: list[tuple[str, ConveyorProcess]] = field(default_factory=list)

    def start(self, stage: str) -> ConveyorProcess:
        name = f"worker-{len(self.started)}-{stage}.log"
        process = ConveyorProcess(
            ["worker", "--stage", stage],
            conveyor_env(self.database_url, **SETTINGS),
            self.log_dir / name,
        )
        self.started.append((stage, process))
        return process

    def alive(self) -> list[tuple[str, ConveyorProcess]]:
        return [(stage, p) for stage, p in self.started if is_running(p.pid)]

    def by_pid(self, pid: int) -> tuple[str, ConveyorProcess] | None:
        return next(((s, p) for s, p in self.alive() if p.pid == pid), None)

    def cleanup(self) -> None:
        for _, process in self.started:
            if process.process.poll() is None:
                process.stop(timeout=30)


@pytest.fixture
def lone_workers(database_url: str, tmp_path: Path) -> Iterator[LoneWorkers]:
    started = LoneWorkers(database_url, tmp_path)
    yield started
    started.cleanup()


def _leader_pid(url: str) -> int | None:
    """The pid of the process holding the maintenance lock (its identity is stage-pid-nonce)."""
    name = scalar(url, _LEADER)
    return int(name.split(":", 1)[1].split("-")[1]) if name else None


def _wait_for_leader(url: str, timeout: float) -> int | None:
    deadline = time.monotonic() + timeout
    while (leader := _leader_pid(url)) is None and time.monotonic() < deadline:
        time.sleep(0.1)
    return leader


@pytest.mark.chaos
@pytest.mark.timeout(240)
def test_lone_workers_killed_under_load_are_rescued_by_a_surviving_lone_worker(
    database_url: str, lone_workers: LoneWorkers, record_counts: RecordCounts
) -> None:
    for stage in STAGES:
        for _ in range(PER_STAGE):
            lone_workers.start(stage)
    workers = len(STAGES) * PER_STAGE
    wait_until(
        lambda: scalar(database_url, "SELECT count(*) FROM conveyor.workers") == workers,
        60,
        "every lone worker registered",
    )
    # Not asserted here: without a leader the runs of the killed workers stay leased, and the
    # wait for DONE below says so.
    first_leader = _wait_for_leader(database_url, 10)

    feeder = Feeder(
        database_url, total=RUNS, batch=50, interval=KILLING_SECONDS * 50 / RUNS, sleep=0.05
    )
    feeder.start()
    killed: list[tuple[str, int]] = []
    leaders = [first_leader] if first_leader else []
    deadline = time.monotonic() + KILLING_SECONDS
    time.sleep(1.5)  # the first runs are in flight
    while time.monotonic() < deadline:
        # Every other kill takes the current leader down, so leadership has to move.
        leader = _leader_pid(database_url)
        if leader is not None and leader not in leaders:
            leaders.append(leader)
        candidates = lone_workers.alive()
        victim = lone_workers.by_pid(leader) if leader and len(killed) % 2 == 0 else None
        stage, process = victim or random.choice(candidates)
        os.kill(process.pid, signal.SIGKILL)
        killed.append((stage, process.pid))
        lone_workers.start(stage)  # a container restarted, with no memory of its runs
        time.sleep(random.uniform(1.5, 2.5))
    feeder.join(60)
    assert feeder.error is None and feeder.submitted == RUNS

    try:
        wait_until(lambda: all_in(database_url, RUNS, "DONE"), 120, f"{RUNS} runs DONE")
    except AssertionError as timeout:
        raise AssertionError(f"{timeout}; runs by status: {audit(database_url).statuses}") from None
    leader = _wait_for_leader(database_url, 30)
    assert leader, "a lone worker leads maintenance"
    if leader not in leaders:
        leaders.append(leader)
    # Several lone workers of several stages share one leader, and none of them died of it.
    alive = lone_workers.alive()
    assert len(alive) == workers, "every worker not killed is still up"
    assert lone_workers.by_pid(leader), "the leader is a live lone worker"
    assert {pid for _, pid in killed} & set(leaders), "a leader was killed"
    errors = [
        event
        for _, process in lone_workers.started
        for event in log_events(process.log())
        if event.get("level") == "error"
    ]
    result = audit(database_url)
    record_counts(
        workers=workers,
        kills=len(killed),
        leaders_seen=len(leaders),
        leaders_killed=len({pid for _, pid in killed} & set(leaders)),
        errors_logged=len(errors),
        **result.counts(),
    )
    assert_each_once(result, RUNS)
    assert result.rescues > 0, "kills landed on runs in flight, and they were rescued"
    assert not errors, errors[:5]
    for _, process in alive:
        assert process.stop() == 0
