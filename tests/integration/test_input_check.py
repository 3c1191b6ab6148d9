"""A run's input must be a JSON object. It is checked when it is written, by an insert or an
update of `input`, with check_violation under the name pipeline_runs_input_is_object, and not
at the engine's own updates (claims, completions, heartbeats), which never write it and would
otherwise read every run's input back to check it again (migration 019). A row that got past
the check (written with its triggers off) fails clearly in the worker."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import psycopg
import pytest

from tests.helpers import ConveyorProcess, scalar, wait_until

Start = Callable[..., ConveyorProcess]


@pytest.mark.parametrize("written", ["[1]", '"a question"', "3", "null"])
def test_an_input_that_is_not_an_object_is_refused_when_written(
    conn: psycopg.Connection[Any], written: str
) -> None:
    with pytest.raises(psycopg.errors.CheckViolation) as inserted, conn.transaction():
        conn.execute("INSERT INTO conveyor.pipeline_runs (input) VALUES (%s::jsonb)", (written,))
    assert inserted.value.diag.constraint_name == "pipeline_runs_input_is_object"
    assert "run input must be a JSON object" in str(inserted.value)

    row = conn.execute(
        "INSERT INTO conveyor.pipeline_runs (pipeline, input) VALUES ('checked', '{}') RETURNING id"
    ).fetchone()
    assert row is not None
    with pytest.raises(psycopg.errors.CheckViolation) as updated, conn.transaction():
        conn.execute(
            "UPDATE conveyor.pipeline_runs SET input = %s::jsonb WHERE id = %s", (written, row[0])
        )
    assert updated.value.diag.constraint_name == "pipeline_runs_input_is_object"


def test_no_input_is_still_refused_by_the_column(conn: psycopg.Connection[Any]) -> None:
    with pytest.raises(psycopg.errors.NotNullViolation), conn.transaction():
        conn.execute("INSERT INTO conveyor.pipeline_runs (input) VALUES (NULL)")


def test_no_update_of_a_run_locks_its_row_for_a_trigger(conn: psycopg.Connection[Any]) -> None:
    """A BEFORE UPDATE row trigger would have every update of a run (a completion, a release)
    lock the row first and log the lock, whatever columns it sets."""
    before_update = conn.execute(
        "SELECT tgname FROM pg_trigger WHERE tgrelid = 'conveyor.pipeline_runs'::regclass"
        " AND tgtype & (1 | 2 | 16) = (1 | 2 | 16)"  # row, before, update
    ).fetchall()
    assert before_update == []


def test_a_run_written_past_the_check_is_moved_and_failed_clearly(
    database_url: str, start_conveyor: Start
) -> None:
    with psycopg.connect(database_url, autocommit=True) as conn, conn.transaction():
        conn.execute("SET LOCAL session_replication_role = replica")  # its triggers off
        row = conn.execute(
            "INSERT INTO conveyor.pipeline_runs (pipeline, input) VALUES ('chain', '[1]')"
            " RETURNING id"
        ).fetchone()
    assert row is not None
    worker = start_conveyor(
        "run", CONVEYOR_STAGES="one=1,two=1,three=1", CONVEYOR_PIPELINE="tests.pipelines:chain"
    )

    def last_error() -> Any:
        return scalar(
            database_url,
            "SELECT last_error FROM conveyor.pipeline_runs WHERE id = %s AND status = 'FAILED'",
            (row[0],),
        )

    assert wait_until(last_error, 30, "the run FAILED") == "run input is not a JSON object"
    assert "Traceback" not in worker.log()
