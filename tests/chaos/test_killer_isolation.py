"""A run whose handler kills its worker every time must not take other runs down with it.

Runs in flight on the killed worker are rescued with it. Were they claimed beside it again, the
killer would kill them again until they too ran out of rescues. A rescued run therefore runs
alone (claim_batch's `alone`), so only the killer ends FAILED.
"""

from __future__ import annotations

import pytest

from tests.chaos.audit import assert_each_once, audit
from tests.chaos.conftest import Supervisors
from tests.chaos.load import count_status, submit
from tests.helpers import fetch_all, wait_until

RUNS = 400
MAX_RESCUES = 2


@pytest.mark.chaos
@pytest.mark.timeout(120)
def test_killer_run_drags_no_other_run_into_failed(
    database_url: str, supervisors: Supervisors
) -> None:
    supervisors.start(
        CONVEYOR_STAGES="one=2,two=2,three=2",
        CONVEYOR_LEASE="2",
        CONVEYOR_SWEEP_INTERVAL="0.5",
        CONVEYOR_MAX_RESCUES=str(MAX_RESCUES),
    )
    half = RUNS // 2
    submit(database_url, half, sleep=0.05)
    [killer] = submit(database_url, 1, first=half + 1, kill_always=True)
    submit(database_url, RUNS - half - 1, first=half + 2, sleep=0.05)

    wait_until(
        lambda: count_status(database_url, "DONE", "FAILED") == RUNS, 90, "every run finished"
    )
    collateral = fetch_all(
        database_url,
        "SELECT r.input->>'n', r.rescues,"
        " array_agg(e.worker ORDER BY e.id) FILTER (WHERE e.error LIKE 'lease expired%%')"
        "  FROM conveyor.pipeline_runs r JOIN conveyor.run_events e ON e.run_id = r.id"
        " WHERE r.status = 'FAILED' AND r.id <> %s GROUP BY r.id",
        (killer,),
    )
    killer_workers = fetch_all(
        database_url,
        "SELECT array_agg(worker ORDER BY id) FROM conveyor.run_events WHERE run_id = %s",
        (killer,),
    )[0][0]
    print(f"\nkiller run rescued from workers {killer_workers}")
    for n, rescues, workers in collateral:
        print(f"innocent run n={n} FAILED after {rescues} rescues from workers {workers}")
    assert_each_once(audit(database_url, failed={killer}), RUNS, failed=1)
