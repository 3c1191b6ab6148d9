"""The supervisor stopped mid-load, politely (SIGTERM) or not (SIGKILL); a fresh one finishes."""

from __future__ import annotations

import signal
import time

import pytest

from tests.chaos.audit import WORKING, assert_each_once, audit
from tests.chaos.conftest import RecordCounts, Supervisors
from tests.chaos.load import CHILDREN, all_in, count_status, event_counts, is_running, submit
from tests.helpers import scalar, wait_until

RUNS = 300
STAGES = "one=2,two=2,three=2"


def _mid_load(url: str) -> bool:
    """Some runs are done and many are in a handler right now."""
    done, working = count_status(url, "DONE"), count_status(url, *WORKING)
    return bool(done and working and working >= 20)


@pytest.mark.chaos
@pytest.mark.timeout(150)
def test_sigterm_releases_in_flight_runs_and_a_fresh_supervisor_finishes(
    database_url: str, supervisors: Supervisors, record_counts: RecordCounts
) -> None:
    # Handlers outlast the drain timeout, so the drain must give runs back, not just wait.
    first = supervisors.start(CONVEYOR_STAGES=STAGES, CONVEYOR_DRAIN_TIMEOUT="0.2")
    submit(database_url, RUNS, sleep=0.5)
    wait_until(lambda: _mid_load(database_url), 60, "runs in flight")
    in_flight = count_status(database_url, *WORKING)

    first.signal(signal.SIGTERM)
    assert first.wait(60) == 0
    # Nothing is left leased: every in-flight run was completed or released by its worker.
    assert count_status(database_url, *WORKING) == 0
    leased = scalar(
        database_url,
        "SELECT count(*) FROM conveyor.pipeline_runs WHERE lease_owner IS NOT NULL",
    )
    assert leased == 0
    assert scalar(database_url, "SELECT count(*) FROM conveyor.workers") == 0
    released_at_stop = audit(database_url).released
    assert released_at_stop > 0
    stopped_done = count_status(database_url, "DONE")
    assert stopped_done is not None and stopped_done < RUNS

    second = supervisors.start(CONVEYOR_STAGES=STAGES)
    wait_until(lambda: all_in(database_url, RUNS, "DONE"), 90, f"{RUNS} runs DONE")
    result = audit(database_url)
    record_counts(
        in_flight_at_sigterm=in_flight,
        released_at_stop=released_at_stop,
        done_at_stop=stopped_done,
        **result.counts(),
    )
    assert_each_once(result, RUNS)
    assert result.rescues == 0, "nothing had to wait for a lease to expire"
    assert second.stop() == 0


@pytest.mark.chaos
@pytest.mark.timeout(150)
def test_sigkill_to_the_supervisor_its_workers_exit_and_a_new_one_finishes(
    database_url: str, supervisors: Supervisors, record_counts: RecordCounts
) -> None:
    first = supervisors.start(CONVEYOR_STAGES=STAGES, CONVEYOR_LEASE="3")
    wait_until(
        lambda: len(supervisors.remember_workers(first)) == CHILDREN, 60, "every child process"
    )
    workers = supervisors.remember_workers(first)
    submit(database_url, RUNS, sleep=0.2)
    wait_until(lambda: _mid_load(database_url), 60, "runs in flight")
    in_flight = count_status(database_url, *WORKING)

    first.signal(signal.SIGKILL)
    first.wait(10)
    killed_at = time.monotonic()
    # Orphaned workers notice their supervisor is gone, drain and exit on their own.
    wait_until(
        lambda: not any(is_running(pid) for pid in workers), 30, "the orphaned workers to exit"
    )
    orphans_exited_after = round(time.monotonic() - killed_at, 1)
    noticed = event_counts(first.log())["supervisor is gone; stopping"]
    assert noticed == 6

    second = supervisors.start(CONVEYOR_STAGES=STAGES, CONVEYOR_LEASE="3")
    wait_until(lambda: all_in(database_url, RUNS, "DONE"), 90, f"{RUNS} runs DONE")
    result = audit(database_url)
    record_counts(
        in_flight_at_sigkill=in_flight,
        orphans=len(workers),
        orphans_exited_after_seconds=orphans_exited_after,
        **result.counts(),
    )
    assert_each_once(result, RUNS)
    # The orphans committed what they finished and left nothing leased behind them.
    assert result.rescues == 0
    assert second.stop() == 0
