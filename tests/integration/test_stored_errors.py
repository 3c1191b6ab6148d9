"""What a failed attempt stores (pipeline_runs.last_error, run_events.error) is masked like the
logs: a handler error quoting a database URL does not leave its password in the table."""

from __future__ import annotations

from collections.abc import Callable

import psycopg
import pytest
from psycopg.types.json import Jsonb

from tests.helpers import ConveyorProcess, fetch_all, scalar, wait_until

CHAIN = {"CONVEYOR_PIPELINE": "tests.pipelines:chain"}


@pytest.mark.timeout(90)
def test_a_handler_error_quoting_a_password_is_stored_masked(
    database_url: str, start_conveyor: Callable[..., ConveyorProcess]
) -> None:
    message = (
        "cannot reach postgresql://ops:s3cret-pw@db.internal:5432/app"
        " (also tried: host=db2 password=hunter2 dbname=app)"
    )
    worker = start_conveyor("run", CONVEYOR_STAGES="one=1", CONVEYOR_SWEEP_INTERVAL="0.5", **CHAIN)
    with psycopg.connect(database_url, autocommit=True) as conn:
        run_id = conn.execute(
            "INSERT INTO conveyor.pipeline_runs (pipeline, input)"
            " VALUES ('chain', %s) RETURNING id",
            (Jsonb({"n": 1, "fail_with": message}),),
        ).fetchone()[0]  # type: ignore[index]
    wait_until(
        lambda: (
            scalar(
                database_url, "SELECT status FROM conveyor.pipeline_runs WHERE id = %s", (run_id,)
            )
            == "FAILED"
        ),
        60,
        "the run to be FAILED",
    )
    last_error = scalar(
        database_url, "SELECT last_error FROM conveyor.pipeline_runs WHERE id = %s", (run_id,)
    )
    event_errors = [
        row[0]
        for row in fetch_all(
            database_url,
            "SELECT error FROM conveyor.run_events WHERE run_id = %s ORDER BY id",
            (run_id,),
        )
    ]
    assert len(event_errors) == 3  # every attempt's error, the last one FAILED
    for stored in [last_error, *event_errors]:
        assert "RuntimeError: cannot reach postgresql://ops:***@db.internal:5432/app" in stored
        assert "password=***" in stored
        assert "s3cret-pw" not in stored and "hunter2" not in stored
    assert "s3cret-pw" not in worker.log() and "hunter2" not in worker.log()
