"""Operator-side calls over a plain connection: submit, look, cancel, retry."""

from __future__ import annotations

import json
import math
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime
from typing import Any
from uuid import UUID

import psycopg
from psycopg.rows import dict_row
from psycopg.types.datetime import TimestamptzLoader
from psycopg.types.json import Jsonb, set_json_loads

from conveyor import queries
from conveyor.pipeline import Pipeline
from conveyor.reference import NAME as REFERENCE_PIPELINE
from conveyor.settings import MAX_DURATION_SECONDS

MAX_INPUT_BYTES = 1_000_000
# Deeper JSON read back is kept as PostgreSQL's text: Python's json recurses once per level, and
# jsonb holds whatever an SQL insert put there, thousands of levels deep.
MAX_JSON_DEPTH = 100


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
    pipeline: str = REFERENCE_PIPELINE,
    schema: str = "conveyor",
    priority: int = 0,
    delay_seconds: float = 0.0,
    idempotency_key: str | None = None,
) -> Submitted:
    """Start a run of `pipeline` (its name: `Pipeline.name`): the same as `INSERT INTO
    conveyor.pipeline_runs (pipeline, input) VALUES (...)`. With no pipeline named it starts
    what such an insert without one starts: the schema's default, the reference pipeline."""
    text = _input_json(input)
    _check_priority(priority)
    _check_delay(delay_seconds)
    try:
        row = conn.execute(
            queries.load(schema)["submit_run"],
            {
                "pipeline": pipeline,
                "input": Jsonb(input, dumps=lambda _: text),
                "priority": priority,
                "delay_seconds": max(delay_seconds, 0.0),
                "idempotency_key": idempotency_key,
            },
        ).fetchone()
    except psycopg.errors.DataError as exc:  # refused by the server (a NUL in the input)
        raise SubmitError(_refusal(exc)) from None
    assert row is not None
    return Submitted(row[0], row[1])


def submit_many(
    conn: psycopg.Connection[Any],
    inputs: Iterable[dict[str, Any]],
    *,
    pipeline: str = REFERENCE_PIPELINE,
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
        raise SubmitError(_refusal(exc)) from None
    return count


def _refusal(exc: psycopg.errors.DataError) -> str:
    """The server's reason in one line, with its context (for COPY, the line and column)."""
    where = " ".join((exc.diag.context or "").split())
    reason = exc.diag.message_primary or str(exc).strip()
    return f"{reason} ({where})" if where else reason


def _input_json(input: Any) -> str:
    """The run's input as JSON text, or SubmitError saying why it cannot be one."""
    if not isinstance(input, dict):
        raise SubmitError("input must be a JSON object")
    try:
        # NaN and Infinity are not JSON: jsonb refuses them. Unescaped, the text shows a lone
        # surrogate (from bytes that were not UTF-8), which jsonb refuses as well.
        text = json.dumps(input, allow_nan=False, ensure_ascii=False)
    except RecursionError:
        raise SubmitError("input is nested too deeply to write as JSON") from None
    except (TypeError, ValueError) as exc:
        raise SubmitError(f"input is not JSON-serialisable: {exc}") from None
    try:
        size = len(text.encode())
    except UnicodeEncodeError:
        raise SubmitError("input holds text that is not valid Unicode (a lone surrogate)") from None
    if size > MAX_INPUT_BYTES:
        raise SubmitError(f"input is {size} bytes; the limit is {MAX_INPUT_BYTES}")
    return text


def _check_priority(priority: int) -> None:
    if not -32768 <= priority <= 32767:
        raise SubmitError("priority must be between -32768 and 32767")


def _check_delay(seconds: float) -> None:
    """A negative delay is no delay; beyond a century (or NaN) the interval is a mistake."""
    if not math.isfinite(seconds) or seconds > MAX_DURATION_SECONDS:
        raise SubmitError(f"delay must be a number of seconds up to {MAX_DURATION_SECONDS:.0f}")


def status_counts(conn: psycopg.Connection[Any], schema: str) -> list[dict[str, Any]]:
    with conn.cursor(row_factory=dict_row) as cur:
        return cur.execute(queries.load(schema)["status_counts"]).fetchall()


def live_workers(conn: psycopg.Connection[Any], schema: str) -> list[dict[str, Any]]:
    with conn.cursor(row_factory=dict_row) as cur:
        return cur.execute(queries.load(schema)["live_workers"]).fetchall()


@dataclass(frozen=True)
class DeepJSON:
    """A jsonb value nested deeper than MAX_JSON_DEPTH: PostgreSQL's text of it (valid JSON)."""

    text: str


def get_run(conn: psycopg.Connection[Any], schema: str, run_id: UUID) -> dict[str, Any] | None:
    """The run's row. Whatever SQL stored in it reads back: JSON too deep for Python comes as
    DeepJSON, a timestamp beyond Python's datetime ('infinity') as PostgreSQL's text."""
    with conn.cursor(row_factory=dict_row) as cur:
        set_json_loads(_load_json, cur)
        cur.adapters.register_loader("timestamptz", _TolerantTimestamptz)
        return cur.execute(queries.load(schema)["get_run"], {"id": run_id}).fetchone()


def _load_json(data: str | bytes) -> Any:
    text = data if isinstance(data, str) else bytes(data).decode()
    if text.count("[") + text.count("{") <= MAX_JSON_DEPTH:  # cheap, and true of most values
        return json.loads(text)
    try:
        value = json.loads(text)
    except RecursionError:
        return DeepJSON(text)
    return DeepJSON(text) if _deeper_than(value, MAX_JSON_DEPTH) else value


def _deeper_than(value: Any, limit: int) -> bool:
    """Without recursion: the walk must not fail on what it guards against."""
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if not isinstance(item, dict | list):
            continue
        if depth > limit:
            return True
        children = item.values() if isinstance(item, dict) else item
        stack.extend((child, depth + 1) for child in children)
    return False


class _TolerantTimestamptz(TimestamptzLoader):
    def load(self, data: Any) -> datetime | str:  # type: ignore[override]
        try:
            return super().load(data)
        except psycopg.DataError:
            return bytes(data).decode("ascii", "replace")


def run_history(conn: psycopg.Connection[Any], schema: str, run_id: UUID) -> list[dict[str, Any]]:
    with conn.cursor(row_factory=dict_row) as cur:
        return cur.execute(queries.load(schema)["run_history"], {"id": run_id}).fetchall()


CHILDREN_SHOWN = 100  # a parent of 10,000 children lists its first ones and counts the rest


def children_of(
    conn: psycopg.Connection[Any], schema: str, run_id: UUID, limit: int = CHILDREN_SHOWN
) -> dict[str, Any]:
    """A run's children: how many (`total`), how many in each status (`by_status`), and the
    first `limit` of them in order (`first`: index, id, status)."""
    sql = queries.load(schema)
    with conn.cursor(row_factory=dict_row) as cur:
        counts = cur.execute(sql["run_children"], {"id": run_id}).fetchall()
        first = cur.execute(sql["first_children"], {"id": run_id, "limit": limit}).fetchall()
    by_status = {row["status"]: row["runs"] for row in counts}
    return {"total": sum(by_status.values()), "by_status": by_status, "first": first}


def route_of(history: list[dict[str, Any]]) -> list[str]:
    """The stages that moved the run on, in order, loops included: the attempts that ran (they
    have a duration) and completed, or failed for good. Retries, throttles, releases, rescues
    and commands are not visits."""
    return [
        h["stage"]
        for h in history
        if h["stage"] is not None
        and h.get("duration_seconds") is not None
        and (h.get("error") is None or h["to_status"] == "FAILED")
    ]


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
