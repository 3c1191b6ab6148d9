"""Reproduction of an engine bug; NOT part of the suite (the file name keeps pytest from
collecting it). Run it on purpose:

    .venv/bin/pytest tests/chaos/repro_kill_always_collateral.py -q -s

A run whose handler kills its worker every time (input kill_always) takes the runs that share
its worker process down with it: they are rescued with it (their `rescues` grows), re-claimed
with it (same run_after, same batch), killed again, and end FAILED after CONVEYOR_MAX_RESCUES
though their handlers never failed. Expected: only the killer run ends FAILED.
Move this scenario into test_poison_runs.py once the engine isolates rescued runs.
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
