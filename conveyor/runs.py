"""Operator-side calls over a plain connection: submit, look, cancel, retry."""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any
from uuid import UUID

import psycopg
from psycopg.rows import dict_row
from psycopg.types.json import Jsonb

from conveyor import queries
from conveyor.pipeline import Pipeline

MAX_INPUT_BYTES = 1_000_000


class SubmitError(ValueError):
    """The run was not accepted; the message says why."""


@dataclass(frozen=True)
class Submitted:
    id: UUID
    created: bool  # False: an existing run with the same idempotency key was returned


def submit(
    conn: psycopg.Connection[Any],
    input: dict[str, Any],
    *,
    pipeline: str = "agents",
    schema: str = "conveyor",
    priority: int = 0,
    delay_seconds: float = 0.0,
    idempotency_key: str | None = None,
) -> Submitted:
    """Start a run: the same as `INSERT INTO conveyor.pipeline_runs (input) VALUES (...)`."""
    _input_json(input)
    _check_priority(priority)
    row = conn.execute(
        queries.load(schema)["submit_run"],
        {
            "pipeline": pipeline,
            "input": Jsonb(input),
            "priority": priority,
            "delay_seconds": max(delay_seconds, 0.0),
            "idempotency_key": idempotency_key,
        },
    ).fetchone()
    assert row is not None
    return Submitted(row[0], row[1])


def submit_many(
    conn: psycopg.Connection[Any],
    inputs: Iterable[dict[str, Any]],
    *,
    pipeline: str = "agents",
    schema: str = "conveyor",
    priority: int = 0,
) -> int:
    """Start one run per input in one transaction, with COPY: all of them, or none and a
    SubmitError naming the first bad one (`run N`, counted from 1). The inputs are streamed,
    not held. Returns how many runs were started."""
    _check_priority(priority)
    count = 0
    try:
        with (
            conn.transaction(),
            conn.cursor().copy(queries.load(schema)["submit_copy"]) as copy,
        ):
            for count, run_input in enumerate(inputs, 1):
                try:
                    text = _input_json(run_input)
                except SubmitError as exc:
                    raise SubmitError(f"run {count}: {exc}") from None
                copy.write_row((pipeline, text, priority))
    except psycopg.errors.DataError as exc:  # refused by the server: its context names the row
        where = exc.diag.context or ""
        raise SubmitError(f"{exc.diag.message_primary or exc} ({where.strip()})") from None
    return count


def _input_json(input: Any) -> str:
    """The run's input as JSON text, or SubmitError saying why it cannot be one."""
    if not isinstance(input, dict):
        raise SubmitError("input must be a JSON object")
    try:
        text = json.dumps(input, allow_nan=False)  # NaN and Infinity are not JSON: jsonb refuses
    except (TypeError, ValueError) as exc:
        raise SubmitError(f"input is not JSON-serialisable: {exc}") from exc
    size = len(text.encode())
    if size > MAX_INPUT_BYTES:
        raise SubmitError(f"input is {size} bytes; the limit is {MAX_INPUT_BYTES}")
    return text


def _check_priority(priority: int) -> None:
    if not -32768 <= priority <= 32767:
        raise SubmitError("priority must be between -32768 and 32767")


def status_counts(conn: psycopg.Connection[Any], schema: str) -> list[dict[str, Any]]:
    with conn.cursor(row_factory=dict_row) as cur:
        return cur.execute(queries.load(schema)["status_counts"]).fetchall()


def live_workers(conn: psycopg.Connection[Any], schema: str) -> list[dict[str, Any]]:
    with conn.cursor(row_factory=dict_row) as cur:
        return cur.execute(queries.load(schema)["live_workers"]).fetchall()


def get_run(conn: psycopg.Connection[Any], schema: str, run_id: UUID) -> dict[str, Any] | None:
    with conn.cursor(row_factory=dict_row) as cur:
        return cur.execute(queries.load(schema)["get_run"], {"id": run_id}).fetchone()


def run_history(conn: psycopg.Connection[Any], schema: str, run_id: UUID) -> list[dict[str, Any]]:
    with conn.cursor(row_factory=dict_row) as cur:
        return cur.execute(queries.load(schema)["run_history"], {"id": run_id}).fetchall()


def cancel(conn: psycopg.Connection[Any], schema: str, run_id: UUID, actor: str) -> bool:
    rows = conn.execute(
        queries.load(schema)["cancel_run"], {"id": run_id, "actor": actor}
    ).fetchall()
    return bool(rows)


def retry(
    conn: psycopg.Connection[Any],
    schema: str,
    pipeline: Pipeline,
    run_id: UUID,
    actor: str,
    from_stage: str | None = None,
) -> bool:
    """Re-run a FAILED or CANCELLED run from a named stage, or from the stage it failed in."""
    if from_stage is None:
        row = conn.execute(queries.load(schema)["failed_stage"], {"id": run_id}).fetchone()
        from_stage = row[0] if row and row[0] else pipeline.stages[0].name
    stage = pipeline.stage(from_stage)
    rows = conn.execute(
        queries.load(schema)["retry_run"],
        {"id": run_id, "consumes": stage.consumes, "stage": stage.name, "actor": actor},
    ).fetchall()
    return bool(rows)


def retry_failed(
    conn: psycopg.Connection[Any],
    schema: str,
    pipeline: Pipeline,
    actor: str,
    stage: str | None = None,
) -> int:
    """Retry every FAILED run of the pipeline (that failed in `stage`, when given)."""
    if stage is not None:
        pipeline.stage(stage)  # an unknown stage is an error, not "nothing to retry"
    rows = conn.execute(
        queries.load(schema)["failed_runs"], {"pipeline": pipeline.name, "stage": stage}
    ).fetchall()
    return sum(
        retry(conn, schema, pipeline, run_id, actor, stage or failed_stage)
        for run_id, failed_stage in rows
    )


def prune(conn: psycopg.Connection[Any], schema: str, older_than_seconds: float) -> int:
    """Delete finished runs older than the given age, in batches; return how many."""
    total = 0
    while True:
        deleted = len(
            conn.execute(
                queries.load(schema)["prune_finished"],
                {"pipeline": None, "older_than_seconds": older_than_seconds},
            ).fetchall()
        )
        total += deleted
        if deleted < 1000:
            return total
