"""A protocol statement that PostgreSQL refuses over a working connection (a malformed row, a
broken schema) is logged, counted and retried: the worker stays up and resumes once it is fixed."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import psycopg
import pytest

from conveyor.db import brief
from tests.helpers import ConveyorProcess, scalar, wait_until
from tests.observability.prom import metrics_port, sample, scrape

CHAIN = {"CONVEYOR_PIPELINE": "tests.pipelines:chain"}
INT_MAX = 2**31 - 1


def _failed_statements(process: ConveyorProcess, operation: str) -> list[dict[str, Any]]:
    found = []
    for line in process.log().splitlines():
        if '"statement failed"' in line:
            event = json.loads(line)
            if event.get("operation") == operation:
                found.append(event)
    return found


@pytest.mark.timeout(120)
def test_a_row_the_claim_cannot_take_leaves_the_worker_running(
    database_url: str, start_conveyor: Callable[..., ConveyorProcess]
) -> None:
    # The claim counts the attempt up: at the integer maximum, every claim of the stage that
    # reaches this row fails with "integer out of range" (a DataError, not a lost connection).
    run_id = scalar(
        database_url,
        "INSERT INTO conveyor.pipeline_runs (pipeline, input, attempt)"
        " VALUES ('chain', '{\"n\": 1}', %s) RETURNING id",
        (INT_MAX,),
    )
    supervisor = start_conveyor(
        "run", CONVEYOR_STAGES="one=1", CONVEYOR_SWEEP_INTERVAL="0.3", **CHAIN
    )
    port = metrics_port(supervisor)
    wait_until(
        lambda: len(_failed_statements(supervisor, "claim")) >= 3, 60, "three refused claims"
    )
    refused = _failed_statements(supervisor, "claim")[0]
    assert refused["level"] == "error"
    assert refused["error_type"] == "NumericValueOutOfRange"
    assert refused["sqlstate"] == "22003"
    assert refused["stage"] == "one"
    assert refused["retry_in"] > 0  # it backs off instead of hammering the database
    errors = sample(scrape(port), "conveyor_worker_errors_total", stage="one", operation="claim")
    assert errors is not None and errors >= 3
    # The same worker process all along: no crash, no restart, the supervisor still up.
    assert supervisor.process.poll() is None
    assert "worker process died" not in supervisor.log()
    assert sample(scrape(port), "conveyor_worker_restarts_total", stage="one") == 0

    # Repaired, the row is claimed by the next attempt and the run moves on.
    scalar(
        database_url,
        "UPDATE conveyor.pipeline_runs SET attempt = 0 WHERE id = %s RETURNING id",
        (run_id,),
    )
    wait_until(
        lambda: (
            scalar(
                database_url, "SELECT status FROM conveyor.pipeline_runs WHERE id = %s", (run_id,)
            )
            == "ONE_DONE"
        ),
        30,
        "the repaired run to pass stage one",
    )
    assert supervisor.stop() == 0


@pytest.mark.timeout(120)
def test_a_row_the_rescue_cannot_take_leaves_the_maintenance_leader_running(
    database_url: str, start_conveyor: Callable[..., ConveyorProcess]
) -> None:
    # An expired lease whose rescue count is at the integer maximum: the rescue counts it up,
    # so every rescue of the stage that reaches this row fails with "integer out of range".
    stuck = scalar(
        database_url,
        "INSERT INTO conveyor.pipeline_runs"
        " (pipeline, input, status, attempt, lease_owner, lease_expires_at, rescues)"
        " VALUES ('chain', '{}', 'ONE_RUNNING', 1, 'one-1-gone', now() - interval '1 h', %s)"
        " RETURNING id",
        (INT_MAX,),
    )
    supervisor = start_conveyor(
        "run", CONVEYOR_STAGES="one=1", CONVEYOR_SWEEP_INTERVAL="0.3", **CHAIN
    )
    port = metrics_port(supervisor)
    wait_until(
        lambda: len(_failed_statements(supervisor, "rescue_expired")) >= 3,
        60,
        "three refused rescues",
    )
    refused = _failed_statements(supervisor, "rescue_expired")[0]
    assert (refused["stage"], refused["sqlstate"]) == ("maintenance", "22003")
    errors = sample(
        scrape(port),
        "conveyor_worker_errors_total",
        stage="maintenance",
        operation="rescue_expired",
    )
    assert errors is not None and errors >= 3
    assert "worker process died" not in supervisor.log()

    # Repaired, the leader (still leading, still trying) rescues it and the stage runs it again.
    scalar(
        database_url,
        "UPDATE conveyor.pipeline_runs SET rescues = 0 WHERE id = %s RETURNING id",
        (stuck,),
    )
    wait_until(
        lambda: (
            scalar(
                database_url, "SELECT status FROM conveyor.pipeline_runs WHERE id = %s", (stuck,)
            )
            == "ONE_DONE"
        ),
        30,
        "the repaired run rescued and passed through stage one",
    )
    assert supervisor.stop() == 0


def test_a_refusal_is_logged_by_its_message_not_by_where_it_happened(database_url: str) -> None:
    """PostgreSQL ends an error with its CONTEXT (where: a function's line, a tuple being
    updated); the log line says what went wrong."""
    with psycopg.connect(database_url) as conn, pytest.raises(psycopg.Error) as refused:
        conn.execute("DO $$BEGIN RAISE EXCEPTION 'the gist'; END$$")
    assert "CONTEXT" in str(refused.value)
    assert brief(refused.value) == "the gist"
    assert brief(psycopg.OperationalError("one\nlast line")) == "last line"
