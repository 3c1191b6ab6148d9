"""2,000 runs through three stages while a killer SIGKILLs a random worker every 0.5-1 s."""

from __future__ import annotations

import pytest

from tests.chaos.audit import assert_each_once, audit
from tests.chaos.conftest import RecordCounts, Supervisors
from tests.chaos.load import CHILDREN, Feeder, Killer, all_in, event_counts, live_children
from tests.helpers import scalar, wait_until

RUNS = 2000
KILLING_SECONDS = 20.0


@pytest.mark.chaos
@pytest.mark.timeout(240)
def test_random_worker_sigkills_lose_nothing_and_every_worker_is_restarted(
    database_url: str, supervisors: Supervisors, record_counts: RecordCounts
) -> None:
    supervisor = supervisors.start(
        CONVEYOR_STAGES="one=2,two=2,three=2",
        CONVEYOR_LEASE="2",
        CONVEYOR_SWEEP_INTERVAL="0.5",
        # Random kills are not the runs' fault. A run caught on killed workers several times
        # (its rescues add up over its three stages) must not be given up as a crash-looper
        # here; test_poison_runs covers that bound.
        CONVEYOR_MAX_RESCUES="10",
    )
    wait_until(
        lambda: scalar(database_url, "SELECT count(*) FROM conveyor.workers") == 6,
        60,
        "six registered workers",
    )
    # The runs arrive over the whole killing window, and each stage takes a little time, so
    # every kill lands on a worker with runs in flight.
    feeder = Feeder(
        database_url, total=RUNS, batch=50, interval=KILLING_SECONDS * 50 / RUNS, sleep=0.05
    )
    killer = Killer(supervisor.pid, duration=KILLING_SECONDS)
    feeder.start()
    killer.start()
    feeder.join(KILLING_SECONDS + 60)
    killer.join(KILLING_SECONDS + 10)
    assert feeder.error is None and feeder.submitted == RUNS
    assert not killer.is_alive()
    kills = len(killer.killed)
    assert kills >= 0.75 * KILLING_SECONDS, "the killer kept killing"

    wait_until(lambda: all_in(database_url, RUNS, "DONE"), 150, f"{RUNS} runs DONE")
    # Every killed worker was replaced: one restart per kill, and the pool is whole again.
    wait_until(
        lambda: event_counts(supervisor.log())["worker process started"] == CHILDREN + kills,
        60,
        "a new worker process for every kill",
    )
    wait_until(lambda: len(live_children(supervisor.pid)) == CHILDREN, 30, "every child alive")
    events = event_counts(supervisor.log())
    assert events["worker process died; restarting"] == kills
    assert not set(killer.killed) & set(live_children(supervisor.pid))

    result = audit(database_url)
    record_counts(
        kills=kills,
        restarts=events["worker process started"] - 6,
        **result.counts(),
    )
    assert_each_once(result, RUNS)
    assert result.rescues > 0, "kills landed on runs in flight"
    assert supervisor.stop() == 0
