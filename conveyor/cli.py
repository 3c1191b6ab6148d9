"""The `conveyor` command: thin click commands that parse, call and print."""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import IO, Any
from uuid import UUID, uuid4

import click
import psycopg

from conveyor import _embedded, migrate, runs
from conveyor.agents.cli import memory_group
from conveyor.cli_errors import Callback, checked_text, fail, one_line_errors
from conveyor.console.cli import console_command
from conveyor.db import DatabaseUnavailable, connect, database_url, listen_url
from conveyor.logs import configure_logging
from conveyor.pipeline import Pipeline, PipelineError, load_pipeline
from conveyor.settings import DAY, MAX_DURATION_SECONDS, WEEK, ConfigError, Settings
from conveyor.worker.liveness import LivenessSlot


def seconds_between(minimum: float, maximum: float) -> Callback:
    """A click callback for a float option: inf, NaN and a typo's 1e308 would end in a traceback
    (an interval or a sleep out of range) or in a wait that never ends."""

    def check(ctx: click.Context, param: click.Parameter, value: float) -> float:
        if not minimum <= value <= maximum:  # NaN fails it too
            raise click.BadParameter(
                f"expected a number of seconds from {minimum:.10g} to {maximum:.10g}, not {value:g}"
            )
        return value

    return check


PRIORITY = click.IntRange(-32768, 32767)  # smallint


@dataclass
class App:
    settings: Settings
    _pipeline: Pipeline | None = None
    _url: str | None = None

    @property
    def pipeline(self) -> Pipeline:
        if self._pipeline is None:
            self._pipeline = load_pipeline(self.settings.pipeline).with_settings(self.settings)
        return self._pipeline

    @property
    def url(self) -> str:
        if self._url is None:
            self._url = database_url(self.settings)
        return self._url

    def connect(self) -> psycopg.Connection[Any]:
        return connect(self.url, autocommit=True)

    def check_stages(self) -> dict[str, int]:
        """The processes per stage to run; an unknown stage in CONVEYOR_STAGES is an error."""
        plan = self.settings.stages or {stage.name: 1 for stage in self.pipeline.stages}
        known = [stage.name for stage in self.pipeline.stages]
        for name in plan:
            if name not in known:
                raise ConfigError(
                    "CONVEYOR_STAGES",
                    ",".join(f"{k}={v}" for k, v in plan.items()),
                    f"pipeline {self.pipeline.name!r} has no stage {name!r} "
                    f"(stages: {', '.join(known)})",
                )
        return plan


# Known failures print one line and exit 2: no traceback for a bad setting.
clear_errors = one_line_errors(PipelineError, runs.SubmitError)


@click.group()
@click.pass_context
def cli(ctx: click.Context) -> None:
    """conveyor: multi-stage pipelines on PostgreSQL."""
    try:
        settings = Settings.from_env()
    except ConfigError as exc:
        fail(str(exc))
    configure_logging(settings.log_format, settings.log_level)
    ctx.obj = App(settings)


pass_app = click.make_pass_decorator(App)


@cli.command("migrate")
@click.option(
    "--roles",
    is_flag=True,
    help="Also create the least-privilege roles "
    "conveyor_worker and conveyor_reader (sql/roles.sql).",
)
@pass_app
@clear_errors
def migrate_command(app: App, roles: bool) -> None:
    """Create or upgrade the schema (safe to run concurrently)."""
    with app.connect() as conn:
        applied = migrate.migrate(conn, app.settings.schema)
        if roles:
            migrate.apply_roles(conn, app.settings.schema)
            click.echo(
                f"roles conveyor_worker and conveyor_reader granted on schema {app.settings.schema}"
            )
    if applied:
        click.echo(f"applied {', '.join(applied)} to schema {app.settings.schema}")
    else:
        click.echo(f"schema {app.settings.schema} is up to date")


def _ensure_schema(app: App) -> None:
    """The embedded database migrates itself; a configured one must be migrated on purpose."""
    with app.connect() as conn:
        if migrate.is_current(conn, app.settings.schema):
            return
        if app.settings.database_url is None:
            migrate.migrate(conn, app.settings.schema)
            return
    raise DatabaseUnavailable(
        f"schema {app.settings.schema!r} is not migrated to the latest version: "
        "run `conveyor migrate` first"
    )


@cli.command("run")
@pass_app
@clear_errors
def run_command(app: App) -> None:
    """Run the supervisor: worker processes for every configured stage, one maintenance
    process, and /metrics, /healthz, /readyz on CONVEYOR_METRICS_PORT."""
    from conveyor.supervisor.multiproc import prepare_metrics_dir, remove_owned_metrics_dir

    prepare_metrics_dir()
    from conveyor.supervisor.children import start_child
    from conveyor.supervisor.processes import MAINTENANCE, Supervisor

    plan = {name: n for name, n in app.check_stages().items() if n}
    _ensure_schema(app)
    url = app.url
    # Children and the handlers they run find the same database, embedded or not.
    os.environ.setdefault("CONVEYOR_DATABASE_URL", url)
    supervisor_pid = os.getpid()

    def start(name: str, liveness: LivenessSlot, died_pid: int | None) -> None:
        start_child(app.settings, app.pipeline, url, name, liveness, supervisor_pid, died_pid)

    supervisor = Supervisor(
        {**plan, MAINTENANCE: 1},
        start,
        grace_seconds=app.settings.drain_timeout + 5.0,
        metrics_port=app.settings.metrics_port,
        pipeline=app.pipeline.name,
    )
    try:
        code = supervisor.run()
    finally:
        if os.getpid() == supervisor_pid:
            remove_owned_metrics_dir()
    sys.exit(code)


@cli.command("worker")
@click.option("--stage", "stage_name", required=True, help="The stage this process serves.")
@pass_app
@clear_errors
def worker_command(app: App, stage_name: str) -> None:
    """Run one worker process for one stage."""
    from conveyor.worker.loop import run_worker

    stage = app.pipeline.stage(stage_name)
    _ensure_schema(app)
    # No supervisor runs maintenance beside a lone worker: it competes for the lead itself
    # (one leader per schema and pipeline), or a dead worker's runs would never be rescued.
    run_worker(
        app.settings,
        app.pipeline,
        stage,
        app.url,
        listen_url=listen_url(app.settings, app.url),
        maintain=True,
    )


@cli.command("submit")
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
    """Submit a question (TEXT) as a new run of the pipeline."""
    payload: dict[str, Any] = {"question": text}
    if session:
        payload["session_id"] = session
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
    if run["status"] != app.pipeline.final_status:
        sys.exit(1)


@cli.command("submit-many")
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


@cli.command("status")
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
                click.echo(_table(("PIPELINE", "STATUS", "RUNS", "OLDEST DUE"), rows))
                _print_workers(runs.live_workers(conn, app.settings.schema))
            if not watch:
                return
            time.sleep(interval)


@cli.command("show")
@click.argument("run_id", type=click.UUID)
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@pass_app
@clear_errors
def show_command(app: App, run_id: UUID, as_json: bool) -> None:
    """A run: its input, outputs and full transition history."""
    with app.connect() as conn:
        run = runs.get_run(conn, app.settings.schema, run_id)
        if run is None:
            click.echo(f"conveyor: no run {run_id}", err=True)
            sys.exit(1)
        history = runs.run_history(conn, app.settings.schema, run_id)
    _print_run(app, run, history, as_json)


@cli.command("cancel")
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


@cli.command("retry")
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


@cli.command("prune")
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


@cli.command("demo")
@click.option(
    "--questions",
    type=click.IntRange(0, 1000),
    default=0,
    help="How many questions (default: the bundled set).",
)
@pass_app
@clear_errors
def demo_command(app: App, questions: int) -> None:
    """Run the reference pipeline end to end on a handful of questions."""
    from conveyor.demo import run_demo

    app.check_stages()
    _ensure_schema(app)
    sys.exit(run_demo(app.settings, app.pipeline, app.url, questions))


@cli.command("observer")
@click.argument("state", type=click.Choice(["on", "off", "status"]), default="status")
@pass_app
@clear_errors
def observer_command(app: App, state: str) -> None:
    """Switch the `pipeline_events` observer channel for this database (default: on)."""
    with app.connect() as conn:
        if state != "status":
            migrate.set_observer(conn, app.settings.schema, enabled=state == "on")
        enabled = migrate.observer_enabled(conn, app.settings.schema)
    click.echo(f"pipeline_events observer is {'on' if enabled else 'off'}")


@cli.command("bench", context_settings={"ignore_unknown_options": True})
@click.argument("args", nargs=-1, type=click.UNPROCESSED)
def bench_command(args: tuple[str, ...]) -> None:
    """Run the benchmark harness of a source checkout (`python -m benchmarks ARGS`)."""
    import subprocess
    from pathlib import Path

    checkout = Path(__file__).resolve().parent.parent
    if not (checkout / "benchmarks" / "__main__.py").exists():
        fail("bench needs a source checkout (benchmarks/ is not in the wheel)")
    sys.exit(subprocess.call([sys.executable, "-m", "benchmarks", *args], cwd=checkout))


@cli.group("embedded")
def embedded_group() -> None:
    """The embedded PostgreSQL used when no database URL is set."""


@embedded_group.command("url")
@pass_app
@clear_errors
def embedded_url(app: App) -> None:
    """Start the embedded server if needed and print its URL."""
    click.echo(_embedded.ensure_running(app.settings.data_dir))


@embedded_group.command("stop")
@pass_app
def embedded_stop(app: App) -> None:
    """Stop the embedded server."""
    stopped = _embedded.stop(app.settings.data_dir)
    click.echo("stopped" if stopped else "not running")


def _print_workers(workers: list[dict[str, Any]]) -> None:
    """Processes whose heartbeat is fresh: one that stops beating drops out of this list."""
    click.echo("")
    if not workers:
        click.echo("no live workers")
        return
    rows = [
        (
            w["pipeline"],
            w["stage"],
            w["worker_id"],
            f"{w['hostname']}:{w['pid']}",
            f"{w['beat_age_seconds']:.1f}s ago",
            "idle" if w["waiting"] else "busy",
        )
        for w in workers
    ]
    click.echo(_table(("PIPELINE", "STAGE", "WORKER", "HOST:PID", "LAST BEAT", "STATE"), rows))


cli.add_command(memory_group)


def _actor() -> str:
    return f"cli:{os.environ.get('USER', 'unknown')}@{os.uname().nodename}"


def _table(header: tuple[str, ...], rows: Sequence[tuple[Any, ...]]) -> str:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    lines = [
        "  ".join(str(v).ljust(w) for v, w in zip(r, widths, strict=True)).rstrip()
        for r in [header, *rows]
    ]
    return "\n".join(lines)


def _print_run(app: App, run: dict[str, Any], history: list[dict[str, Any]], as_json: bool) -> None:
    if as_json:
        click.echo(_run_json(run, history))
        return
    click.echo(f"run       {run['id']}  ({run['pipeline']})")
    click.echo(f"status    {run['status']}  attempt {run['attempt']}  rescues {run['rescues']}")
    click.echo(f"input     {_json_text(run['input'])}")
    outputs = run["outputs"]
    if isinstance(outputs, runs.DeepJSON):
        click.echo(f"outputs   {outputs.text}")
    else:
        for stage, output in outputs.items():
            click.echo(f"{stage:<9} {_json_text(output)}")
    if run["last_error"]:
        click.echo(f"error     {run['last_error'].splitlines()[-1]}")
    if history:
        rows = [
            (
                h["created_at"].strftime("%H:%M:%S.%f")[:-3],
                h["stage"] or "",
                f"{h['from_status'] or ''} -> {h['to_status']}",
                str(h["attempt"] or ""),
                "" if h["duration_seconds"] is None else f"{h['duration_seconds'] * 1000:.1f}ms",
                h["worker"] or "",
                (h["error"] or "").splitlines()[-1][:60] if h["error"] else "",
            )
            for h in history
        ]
        click.echo("")
        click.echo(
            _table(("AT", "STAGE", "TRANSITION", "ATTEMPT", "DURATION", "WORKER", "ERROR"), rows)
        )


def _json_text(value: Any) -> str:
    """JSON too deep for Python to write is printed as PostgreSQL wrote it."""
    return value.text if isinstance(value, runs.DeepJSON) else json.dumps(value)


def _run_json(run: dict[str, Any], history: list[dict[str, Any]]) -> str:
    """The run as one JSON document; a DeepJSON value goes in as PostgreSQL's text (json.dumps
    would recurse once per level), in place of a unique marker."""
    deep = {key: value.text for key, value in run.items() if isinstance(value, runs.DeepJSON)}
    markers = {key: f"conveyor-deep-json-{uuid4().hex}" for key in deep}
    text = json.dumps({**run, **markers, "history": history}, default=str, indent=2)
    for key, marker in markers.items():
        text = text.replace(json.dumps(marker), deep[key], 1)
    return text


cli.add_command(console_command)


def main() -> None:
    cli(prog_name="conveyor")
