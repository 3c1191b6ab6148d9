"""Claims and completions keep their pool connections between calls (hold_connections): losing
those connections mid-stream costs retries, never a lost or doubled transition."""

from __future__ import annotations

import time
from collections.abc import Callable

import psycopg

from tests.helpers import ConveyorProcess, fetch_all, scalar, wait_until

Start = Callable[..., ConveyorProcess]


def test_pool_backends_killed_mid_stream_every_run_moves_once_per_stage(
    database_url: str, start_conveyor: Start
) -> None:
    run = start_conveyor(
        "run",
        CONVEYOR_PIPELINE="tests.pipelines:chain",
        CONVEYOR_LEASE="2",
        CONVEYOR_SWEEP_INTERVAL="0.5",
    )
    wait_until(
        lambda: scalar(database_url, "SELECT count(*) FROM conveyor.workers WHERE waiting") == 3,
        30,
        "three idle workers",
    )
    killed = 0
    with psycopg.connect(database_url, autocommit=True) as conn:
        for wave in range(6):
            conn.execute(
                "INSERT INTO conveyor.pipeline_runs (pipeline, input)"
                " SELECT 'chain', jsonb_build_object('n', n, 'sleep', 0.005)"
                " FROM generate_series(%s::int, %s::int) n",
                (wave * 100, wave * 100 + 99),
            )
            time.sleep(0.1)
            # the pool connections (held ones included), not the listeners
            row = conn.execute(
                "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity"
                " WHERE application_name LIKE 'conveyor:%%'"
            ).fetchone()
            killed += row[0] if row else 0
    assert killed >= 6
    wait_until(
        lambda: (
            scalar(database_url, "SELECT count(*) FROM conveyor.pipeline_runs") == 600
            and scalar(
                database_url, "SELECT count(*) FROM conveyor.pipeline_runs WHERE status <> 'DONE'"
            )
            == 0
        ),
        90,
        "600 runs DONE",
    )
    moves = fetch_all(
        database_url,
        "SELECT to_status, count(*), count(DISTINCT run_id) FROM conveyor.run_events"
        " WHERE (stage, to_status) IN (('one', 'ONE_DONE'), ('two', 'TWO_DONE'), ('three', 'DONE'))"
        " GROUP BY to_status ORDER BY 1",
    )
    assert moves == [("DONE", 600, 600), ("ONE_DONE", 600, 600), ("TWO_DONE", 600, 600)]
    assert "database error; will retry" in run.log()
