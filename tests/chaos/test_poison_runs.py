"""Runs that can never succeed end FAILED, boundedly, and hold up no other run."""

from __future__ import annotations

import pytest

from tests.chaos.audit import assert_each_once, audit
from tests.chaos.conftest import RecordCounts, Supervisors
from tests.chaos.load import CHILDREN, count_status, event_counts, live_children, submit
from tests.helpers import fetch_all, wait_until

RUNS = 400
MAX_RESCUES = 2
STAGES = "one=2,two=2,three=2"


def _history(url: str, run_id: object) -> list[tuple[object, ...]]:
    return fetch_all(
        url,
        "SELECT attempt, to_status, error FROM conveyor.run_events WHERE run_id = %s ORDER BY id",
        (run_id,),
    )


@pytest.mark.chaos
@pytest.mark.timeout(120)
def test_poison_run_fails_after_its_attempts_and_blocks_no_other_run(
    database_url: str, supervisors: Supervisors, record_counts: RecordCounts
) -> None:
    supervisor = supervisors.start(CONVEYOR_STAGES=STAGES, CONVEYOR_SWEEP_INTERVAL="0.5")
    half = RUNS // 2
    submit(database_url, half, sleep=0.05)
    [poison] = submit(database_url, 1, first=half + 1, always_fail=True)
    submit(database_url, RUNS - half - 1, first=half + 2, sleep=0.05)

    wait_until(
        lambda: count_status(database_url, "DONE", "FAILED") == RUNS, 90, "every run finished"
    )
    result = audit(database_url, failed={poison})
    history = _history(database_url, poison)
    record_counts(poison_attempts=len(history), **result.counts())
    assert_each_once(result, RUNS, failed=1)
    # Three attempts (stage one's max_attempts), each failure recorded, the error kept.
    assert [(attempt, to) for attempt, to, _ in history] == [(1, "NEW"), (2, "NEW"), (3, "FAILED")]
    assert all("RuntimeError: poison run" in str(error) for *_, error in history)
    assert event_counts(supervisor.log())["worker process died; restarting"] == 0
    assert supervisor.stop() == 0


@pytest.mark.chaos
@pytest.mark.timeout(120)
def test_run_that_kills_its_worker_every_time_fails_after_bounded_rescues(
    database_url: str, supervisors: Supervisors, record_counts: RecordCounts
) -> None:
    supervisor = supervisors.start(
        CONVEYOR_STAGES=STAGES,
        CONVEYOR_LEASE="2",
        CONVEYOR_SWEEP_INTERVAL="0.5",
        CONVEYOR_MAX_RESCUES=str(MAX_RESCUES),
    )
    [killer] = submit(database_url, 1, kill_always=True)

    wait_until(lambda: count_status(database_url, "FAILED") == 1, 90, "the killer run FAILED")
    history = _history(database_url, killer)
    rescues, error = fetch_all(
        database_url, "SELECT rescues, last_error FROM conveyor.pipeline_runs"
    )[0]
    # Every death of a worker was answered with a new process.
    wait_until(lambda: len(live_children(supervisor.pid)) == CHILDREN, 60, "every child alive")
    deaths = event_counts(supervisor.log())["worker process died; restarting"]
    record_counts(killer_rescues=rescues, worker_deaths=deaths, runs=1, duplicates=0, lost=0)
    # Each execution killed its worker; the lease ran out and the run was rescued, until the
    # bound: MAX_RESCUES times back to NEW, then FAILED. Never a completed transition.
    assert [to for _, to, _ in history] == ["NEW"] * MAX_RESCUES + ["FAILED"]
    assert all("stopped beating" in str(e) for *_, e in history)
    assert rescues == MAX_RESCUES + 1
    assert "stopped beating" in error
    assert deaths == MAX_RESCUES + 1
    assert supervisor.stop() == 0
