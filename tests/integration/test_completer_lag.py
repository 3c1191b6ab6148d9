"""A worker whose completer falls behind (its commits wait: a busy or slow database) keeps the
leases of the runs whose results wait, and stops claiming once it holds twice its concurrency:
no run is rescued and run again, and the backlog waits in the database, not in its memory."""

from __future__ import annotations

import time
from collections.abc import Callable

import psycopg

from tests.helpers import ConveyorProcess, fetch_all, scalar, wait_until

CHAIN = {"CONVEYOR_PIPELINE": "tests.pipelines:chain"}


def test_results_waiting_for_their_commit_keep_their_leases_and_hold_back_claims(
    database_url: str, start_conveyor: Callable[..., ConveyorProcess]
) -> None:
    fetch_all(
        database_url,
        "INSERT INTO conveyor.pipeline_runs (pipeline, input)"
        " SELECT 'chain', jsonb_build_object('n', n) FROM generate_series(1, 30) n RETURNING id",
    )
    with psycopg.connect(database_url) as blocker:
        # Every completion writes its run_events rows: under this lock they all wait, while
        # claims, heartbeats and lease extensions (which write no event) go on.
        blocker.execute("LOCK TABLE conveyor.run_events IN SHARE MODE")
        worker = start_conveyor(
            "worker",
            "--stage",
            "one",
            CONVEYOR_LEASE="1.5",
            CONVEYOR_SWEEP_INTERVAL="0.2",
            CONVEYOR_ONE_CONCURRENCY="3",
            **CHAIN,
        )
        with psycopg.connect(database_url, autocommit=True) as watcher:
            wait_until(
                lambda: (
                    scalar(
                        database_url,
                        "SELECT count(*) FROM conveyor.pipeline_runs WHERE status = 'ONE_RUNNING'",
                    )
                    >= 6
                ),
                timeout=30,
                message=f"the worker claimed nothing:\n{worker.log()}",
            )
            most_leased = 0
            deadline = time.monotonic() + 4.5  # three leases
            while time.monotonic() < deadline:
                leased, expired = watcher.execute(
                    "SELECT count(*), count(*) FILTER (WHERE lease_expires_at < now())"
                    "  FROM conveyor.pipeline_runs WHERE status = 'ONE_RUNNING'"
                ).fetchone() or (0, 0)
                most_leased = max(most_leased, leased)
                assert expired == 0, f"a waiting result's lease expired:\n{worker.log()}"
                time.sleep(0.1)
        assert most_leased == 6  # twice its concurrency, results waiting included
        blocker.rollback()  # the commits go through
    wait_until(
        lambda: (
            scalar(
                database_url,
                "SELECT count(*) FROM conveyor.pipeline_runs WHERE status = 'ONE_DONE'",
            )
            == 30
        ),
        timeout=30,
        message=f"the runs did not all finish:\n{worker.log()}",
    )
    # each ran once: one attempt, never rescued, one completion event
    assert fetch_all(
        database_url,
        "SELECT count(*) FILTER (WHERE e.to_status = 'ONE_DONE'), count(*) FILTER"
        " (WHERE e.attempt > 1 OR e.to_status NOT IN ('ONE_RUNNING', 'ONE_DONE'))"
        "  FROM conveyor.run_events e",
    ) == [(30, 0)]
    assert "lease lost" not in worker.log()
