"""The commands about runs: submit, submit-many, status, show, cancel, retry, prune."""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Iterator
from typing import IO, Any
from uuid import UUID

import click
import psycopg

from conveyor import runs
from conveyor.commands.context import (
    PRIORITY,
    App,
    checked_text,
    clear_errors,
    fail,
    pass_app,
    seconds_between,
)
from conveyor.commands.output import print_run, print_workers, table
from conveyor.settings import DAY, MAX_DURATION_SECONDS, WEEK


@click.command("submit")
@click.argument("text", callback=checked_text(blank=False))
@click.option(
    "--session",
    default=None,
    callback=checked_text(),
    help="Session id: follow-up questions share memory.",
)
@click.option("--priority", type=PRIORITY, default=0, show_default=True, help="Higher runs sooner.")
@click.option(
    "--delay",
    default=0.0,
    callback=seconds_between(0, MAX_DURATION_SECONDS),
    show_default=True,
    help="Seconds before it may start.",
)
@click.option(
    "--key", "idempotency_key", callback=checked_text(blank=False), help="Idempotency key."
)
@click.option("--wait", is_flag=True, help="Wait until the run finishes and print it.")
@click.option(
    "--timeout",
    default=300.0,
    callback=seconds_between(0, WEEK),
    show_default=True,
    help="Seconds --wait waits.",
)
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@pass_app
@clear_errors
def submit_command(
    app: App,
    text: str,
    session: str | None,
    priority: int,
    delay: float,
    idempotency_key: str | None,
    wait: bool,
    timeout: float,
    as_json: bool,
) -> None:
    """Submit TEXT as a new run of the pipeline (its input as the pipeline builds it from text:
    {"question": TEXT} for the reference pipeline)."""
    payload = app.pipeline.text_input(text, session=session)
    with app.connect() as conn:
        submitted = runs.submit(
            conn,
            payload,
            pipeline=app.pipeline.name,
            schema=app.settings.schema,
            priority=priority,
            delay_seconds=delay,
            idempotency_key=idempotency_key,
        )
        if not wait:
            if as_json:
                click.echo(json.dumps({"id": str(submitted.id), "created": submitted.created}))
            else:
                click.echo(str(submitted.id))
            return
        run = _wait_for(conn, app, submitted.id, timeout)
    _print_run(app, run, [], as_json)
    if not app.pipeline.succeeded(run["status"]):
        sys.exit(1)


def _wait_for(
    conn: psycopg.Connection[Any], app: App, run_id: UUID, timeout: float
) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        run = runs.get_run(conn, app.settings.schema, run_id)
        if run is None:  # pruned or deleted while we waited
            fail(f"run {run_id} no longer exists")
        if run["finished_at"] is not None or time.monotonic() > deadline:
            return run
        time.sleep(0.05)


def _print_run(app: App, run: dict[str, Any], history: list[dict[str, Any]], as_json: bool) -> None:
    print_run(run, history, as_json)


@click.command("submit-many")
# Bytes that are not UTF-8 become lone surrogates, found on their line instead of in a chunk.
@click.argument("source", type=click.File("r", encoding="utf-8", errors="surrogateescape"))
@click.option("--priority", type=PRIORITY, default=0, show_default=True, help="Higher runs sooner.")
@pass_app
@clear_errors
def submit_many_command(app: App, source: IO[str], priority: int) -> None:
    """Submit one run per line of SOURCE (a file, or - for standard input): each line is a
    run's input, a JSON object. One transaction with COPY: all of them, or none and the reason,
    naming the line."""
    with app.connect() as conn:
        count = runs.submit_many(
            conn,
            _json_lines(source),
            pipeline=app.pipeline.name,
            schema=app.settings.schema,
            priority=priority,
        )
    click.echo(f"{count} runs submitted")


def _json_lines(source: IO[str]) -> Iterator[Any]:
    """Each line's JSON value; run N is line N, so a blank line is an error too."""
    for number, line in enumerate(source, 1):
        yield _json_line(number, line)


def _json_line(number: int, line: str) -> Any:
    try:
        line.encode("utf-8")
    except UnicodeEncodeError:
        raise runs.SubmitError(f"run {number}: not UTF-8 text") from None
    if not line.strip():
        raise runs.SubmitError(f"run {number}: a blank line, not a JSON object")
    try:
        return json.loads(line)
    except json.JSONDecodeError as exc:
        raise runs.SubmitError(f"run {number}: not JSON: {exc.msg} (column {exc.colno})") from None
    except RecursionError:
        raise runs.SubmitError(f"run {number}: JSON nested too deeply to read") from None


@click.command("status")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.option("--watch", is_flag=True, help="Refresh every --interval seconds.")
@click.option(
    "--interval",
    default=2.0,
    callback=seconds_between(0.1, DAY),
    show_default=True,
    help="Seconds between refreshes.",
)
@pass_app
@clear_errors
def status_command(app: App, as_json: bool, watch: bool, interval: float) -> None:
    """Runs per pipeline and status, with the age of the oldest due run, and the live workers."""
    with app.connect() as conn:
        while True:
            counts = runs.status_counts(conn, app.settings.schema)
            if as_json:
                click.echo(json.dumps(counts, default=str))
            else:
                if watch:
                    click.clear()
                rows = [
                    (
                        c["pipeline"],
                        c["status"],
                        str(c["runs"]),
                        "" if c["oldest_seconds"] is None else f"{c['oldest_seconds']:.1f}s",
                    )
                    for c in counts
                ]
                click.echo(table(("PIPELINE", "STATUS", "RUNS", "OLDEST DUE"), rows))
                print_workers(runs.live_workers(conn, app.settings.schema))
            if not watch:
                return
            time.sleep(interval)


@click.command("show")
@click.argument("run_id", type=click.UUID)
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@pass_app
@clear_errors
def show_command(app: App, run_id: UUID, as_json: bool) -> None:
    """A run: its input, outputs, children and full transition history."""
    with app.connect() as conn:
        run = runs.get_run(conn, app.settings.schema, run_id)
        if run is None:
            click.echo(f"conveyor: no run {run_id}", err=True)
            sys.exit(1)
        history = runs.run_history(conn, app.settings.schema, run_id)
        children = runs.children_of(conn, app.settings.schema, run_id)
    print_run(run, history, as_json, children)


@click.command("cancel")
@click.argument("run_id", type=click.UUID)
@pass_app
@clear_errors
def cancel_command(app: App, run_id: UUID) -> None:
    """Cancel an unfinished run (a run in flight is interrupted)."""
    with app.connect() as conn:
        if not runs.cancel(conn, app.settings.schema, run_id, actor=_actor()):
            click.echo(f"conveyor: run {run_id} is not unfinished (or does not exist)", err=True)
            sys.exit(1)
    click.echo(f"cancelled {run_id}")


@click.command("retry")
@click.argument("run_id", type=click.UUID, required=False)
@click.option(
    "--failed",
    "all_failed",
    is_flag=True,
    help="Every FAILED run (with --stage: those that failed in that stage).",
)
@click.option(
    "--stage",
    default=None,
    help="Re-run from this stage, keeping earlier outputs (default: the stage it failed in).",
)
@pass_app
@clear_errors
def retry_command(app: App, run_id: UUID | None, all_failed: bool, stage: str | None) -> None:
    """Put a FAILED or CANCELLED run (RUN_ID) or every FAILED run (--failed) back in line."""
    if (run_id is None) == (not all_failed):
        raise click.UsageError("give either RUN_ID or --failed")
    with app.connect() as conn:
        if all_failed:
            count = runs.retry_failed(conn, app.settings.schema, app.pipeline, _actor(), stage)
            click.echo(f"retrying {count} failed runs")
            return
        assert run_id is not None
        if not runs.retry(conn, app.settings.schema, app.pipeline, run_id, _actor(), stage):
            click.echo(f"conveyor: run {run_id} is not FAILED or CANCELLED", err=True)
            sys.exit(1)
    click.echo(f"retrying {run_id}")


@click.command("prune")
@click.option(
    "--older-than",
    "older_than",
    required=True,
    help="Finished runs older than this (e.g. 7d, 12h, 90m) are deleted.",
)
@pass_app
@clear_errors
def prune_command(app: App, older_than: str) -> None:
    """Delete finished runs and their history older than a duration."""
    from conveyor.settings import parse_duration

    try:
        seconds = parse_duration(older_than)
    except ValueError:
        seconds = float("inf")
    if seconds > MAX_DURATION_SECONDS:
        raise click.BadParameter(
            "expected a duration like 7d, 12h, 90m, at most 36500d", param_hint="--older-than"
        )
    with app.connect() as conn:
        total = runs.prune(conn, app.settings.schema, seconds)
    click.echo(f"pruned {total} finished runs older than {older_than}")


def _actor() -> str:
    return f"cli:{os.environ.get('USER', 'unknown')}@{os.uname().nodename}"


COMMANDS = [
    submit_command,
    submit_many_command,
    status_command,
    show_command,
    cancel_command,
    retry_command,
    prune_command,
]
