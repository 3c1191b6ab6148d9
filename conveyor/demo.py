"""`conveyor demo`: load the bundled corpus into memory, ask it questions through the pipeline
(run by a child supervisor, as in production), and print every answer with its sources and the
time each stage took. Works with no model configured: the agents' offline defaults answer."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
import uuid
from typing import Any
from uuid import UUID

import click
from psycopg import sql

from conveyor import reference, runs
from conveyor.db import connect
from conveyor.pipeline import Pipeline
from conveyor.settings import Settings

QUESTIONS = [
    "What happens to a run when its worker is killed?",
    "How does a worker claim runs without two workers taking the same one?",
    "How do I start a run from another service with plain SQL?",
    "How is a failing handler retried?",
    "What does the sweep do?",
    "How do I make the answer stage use an LLM?",
]
# Asked one after the other once the first question's answer is in memory, in the same session:
# they only make sense with the exchanges before them ("it" is the worker), which the analyzer
# finds in the session's memory. The second asks for the last answer again, so the analyzer routes
# it past retrieval, straight to the answer stage.
FOLLOW_UPS = ["And what if it keeps dying?", "What was that again?"]
TERMINAL = ("DONE", "FAILED", "CANCELLED")
WIDTH = 100


def run_demo(settings: Settings, pipeline: Pipeline, url: str, count: int) -> int:
    _load_corpus(settings, url)
    questions = [QUESTIONS[i % len(QUESTIONS)] for i in range(count or len(QUESTIONS))]
    session = f"demo-{uuid.uuid4().hex[:8]}"
    first = [(q, session if i == 0 else None) for i, q in enumerate(questions)]
    ids = _submit(url, settings.schema, pipeline, first)
    click.echo(f"submitted {len(ids)} questions to pipeline {pipeline.name!r}; starting workers")
    env = {**os.environ, "CONVEYOR_DATABASE_URL": url, "CONVEYOR_LOG_LEVEL": "warning"}
    supervisor = subprocess.Popen([sys.executable, "-m", "conveyor", "run"], env=env)
    try:
        finished = _wait_with_progress(url, settings.schema, ids, timeout=180.0)
        for follow_up in FOLLOW_UPS:
            if not finished:
                break
            click.echo(f"follow-up in session {session}: {follow_up}")
            follow = _submit(url, settings.schema, pipeline, [(follow_up, session)])
            finished = _wait_with_progress(url, settings.schema, follow, timeout=60.0)
            ids += follow
    finally:
        supervisor.send_signal(signal.SIGTERM)
        try:
            supervisor.wait(timeout=60)
        except subprocess.TimeoutExpired:
            supervisor.kill()
            supervisor.wait()
    with connect(url, autocommit=True) as conn:
        results = [_print_answer(conn, settings.schema, run_id, pipeline) for run_id in ids]
    click.echo("")
    done = sum(results)
    click.echo(f"{done}/{len(ids)} answered")
    return 0 if finished and done == len(ids) else 1


def _load_corpus(settings: Settings, url: str) -> None:
    loaded, notes = reference.load_bundled_corpus(url, settings.schema)
    added = sum(1 for item in loaded if item.status != "unchanged")
    chunks = sum(item.chunks for item in loaded)
    click.echo(
        f"memory: {len(loaded)} documents of the bundled corpus, {chunks} chunks "
        f"({added} loaded now, {len(loaded) - added} already there)"
    )
    for note in notes:
        click.echo(f"note: {note}")


def _submit(
    url: str, schema: str, pipeline: Pipeline, questions: list[tuple[str, str | None]]
) -> list[UUID]:
    with connect(url, autocommit=True) as conn:
        return [
            runs.submit(
                conn, pipeline.text_input(q, session=s), pipeline=pipeline.name, schema=schema
            ).id
            for q, s in questions
        ]


def _wait_with_progress(url: str, schema: str, ids: list[UUID], timeout: float) -> bool:
    """A live line on a terminal; elsewhere (logs, CI) one line whenever the counts change."""
    live = sys.stdout.isatty()
    deadline = time.monotonic() + timeout
    query = sql.SQL(
        "SELECT status, count(*) FROM {}.pipeline_runs WHERE id = ANY(%s) GROUP BY 1"
    ).format(sql.Identifier(schema))
    last = ""
    with connect(url, autocommit=True) as conn:
        while True:
            counts: dict[str, int] = dict(conn.execute(query, (ids,)).fetchall())  # type: ignore[arg-type]
            done = sum(n for s, n in counts.items() if s in TERMINAL)
            bar = "#" * (20 * done // len(ids))
            detail = "  ".join(f"{s}={n}" for s, n in sorted(counts.items()))
            line = f"  [{bar:<20}] {done}/{len(ids)} finished   {detail}"
            if live:
                click.echo(f"\r{line}".ljust(WIDTH), nl=False)
            elif line != last:
                click.echo(line)
            last = line
            if done == len(ids):
                if live:
                    click.echo("")
                return True
            if time.monotonic() > deadline:
                click.echo(("\n" if live else "") + "  timed out waiting for the runs")
                return False
            time.sleep(0.1)


def _print_answer(conn: Any, schema: str, run_id: UUID, pipeline: Pipeline) -> bool:
    run = runs.get_run(conn, schema, run_id)
    assert run is not None
    history = runs.run_history(conn, schema, run_id)
    click.echo("")
    session = run["input"].get("session_id")
    click.echo(
        f"Q: {run['input'].get('question')}" + (f"   (session {session})" if session else "")
    )
    if not pipeline.succeeded(run["status"]):
        error = (run["last_error"] or "").strip().splitlines()[-1:] or ["no error recorded"]
        click.echo(f"   {run['status']}: {error[0]}")
        return False
    final = run["outputs"].get(pipeline.stages[-1].name) or {}
    answer = str(final.get("answer", final))
    click.echo(textwrap.fill(answer, WIDTH, initial_indent="A: ", subsequent_indent="   "))
    for source in final.get("sources", []):
        click.echo(f"   [{source.get('ref', '?')}] {_describe_source(source)}")
    route = runs.route_of(history)
    if route != [stage.name for stage in pipeline.stages]:  # a stage routed it another way
        click.echo(f"   route: {' -> '.join(route)}")
    click.echo(f"   {_timings(run, history)}")
    return True


def _describe_source(source: dict[str, Any]) -> str:
    where = str(source.get("source", "?"))
    if source.get("heading"):
        where += f" > {source['heading']}"
    if source.get("kind") == "message":
        where += " (an earlier answer in this session)"
    elif source.get("position") is not None:
        where += f" (chunk {source['position']})"
    return where


def _timings(run: dict[str, Any], history: list[dict[str, Any]]) -> str:
    """Per stage: handler time of the successful attempt (and how many attempts it took)."""
    parts = []
    for event in history:
        if event["stage"] and event["duration_seconds"] is not None and event["error"] is None:
            attempts = f", attempt {event['attempt']}" if (event["attempt"] or 1) > 1 else ""
            model = f", {event['model']}" if event.get("model") else ""
            parts.append(
                f"{event['stage']} {event['duration_seconds'] * 1000:.1f}ms{attempts}{model}"
            )
    total = (run["finished_at"] - run["created_at"]).total_seconds() * 1000
    return f"{' | '.join(parts)}  (total {total:.0f}ms, run {run['id']})"
