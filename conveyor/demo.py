"""`conveyor demo`: submit questions, run the pipeline in a child supervisor, show the answers."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from typing import Any
from uuid import UUID

import click

from conveyor import runs
from conveyor.db import connect
from conveyor.pipeline import Pipeline
from conveyor.settings import Settings

QUESTIONS = [
    "How does a worker claim runs without two workers taking the same one?",
    "What happens to a run when its worker is killed?",
    "How do I start a run from another service with plain SQL?",
    "Which metrics show that the LISTEN connection is unhealthy?",
    "How is a failing handler retried?",
    "What does the sweep do?",
]


def run_demo(settings: Settings, pipeline: Pipeline, url: str, count: int) -> int:
    questions = [QUESTIONS[i % len(QUESTIONS)] for i in range(count or len(QUESTIONS))]
    with connect(url, autocommit=True) as conn:
        ids = [
            runs.submit(conn, {"question": q}, pipeline=pipeline.name, schema=settings.schema).id
            for q in questions
        ]
    click.echo(f"submitted {len(ids)} runs to pipeline {pipeline.name!r}; starting workers")
    env = {**os.environ, "CONVEYOR_DATABASE_URL": url, "CONVEYOR_LOG_LEVEL": "warning"}
    supervisor = subprocess.Popen([sys.executable, "-m", "conveyor", "run"], env=env)
    try:
        finished = _wait_with_progress(url, settings.schema, ids, timeout=120.0)
    finally:
        supervisor.send_signal(signal.SIGTERM)
        supervisor.wait(timeout=60)
    with connect(url, autocommit=True) as conn:
        for run_id in ids:
            _print_answer(conn, settings.schema, run_id, pipeline)
    return 0 if finished else 1


def _wait_with_progress(url: str, schema: str, ids: list[UUID], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    with connect(url, autocommit=True) as conn:
        while True:
            rows = conn.execute(
                f"SELECT status, count(*) FROM {_table(schema)} WHERE id = ANY(%s) GROUP BY 1",
                (ids,),
            ).fetchall()
            counts = dict(rows)
            done = sum(n for s, n in counts.items() if s in ("DONE", "FAILED", "CANCELLED"))
            line = "  ".join(f"{s}={n}" for s, n in sorted(counts.items()))
            click.echo(f"\r  {done}/{len(ids)} finished   {line}".ljust(100), nl=False)
            if done == len(ids):
                click.echo("")
                return True
            if time.monotonic() > deadline:
                click.echo("\n  timed out waiting for the runs")
                return False
            time.sleep(0.1)


def _table(schema: str) -> str:
    from conveyor.db import schema_identifier

    return f"{schema_identifier(schema)}.pipeline_runs"


def _print_answer(conn: Any, schema: str, run_id: UUID, pipeline: Pipeline) -> None:
    run = runs.get_run(conn, schema, run_id)
    assert run is not None
    history = runs.run_history(conn, schema, run_id)
    timings = "  ".join(
        f"{h['stage']} {h['duration_seconds'] * 1000:.1f}ms"
        for h in history
        if h["stage"] and h["duration_seconds"] is not None and h["error"] is None
    )
    total = (
        (run["finished_at"] - run["created_at"]).total_seconds() * 1000 if run["finished_at"] else 0
    )
    click.echo("")
    click.echo(f"Q: {run['input'].get('question')}")
    final = run["outputs"].get(pipeline.stages[-1].name) or {}
    if run["status"] != pipeline.final_status:
        click.echo(f"   {run['status']}: {(run['last_error'] or '').splitlines()[-1:]}")
        return
    click.echo(f"A: {final.get('answer', json.dumps(final))}")
    for source in final.get("sources", []):
        click.echo(f"   [{source.get('ref', '?')}] {source.get('source', '')}")
    click.echo(f"   {run_id}  total {total:.1f}ms  ({timings})")
