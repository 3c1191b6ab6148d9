"""The commands that run or set up conveyor: migrate, run, worker, demo, observer, bench, and the
embedded server."""

from __future__ import annotations

import os
import sys

import click

from conveyor import _embedded, migrate
from conveyor.commands.context import App, clear_errors, ensure_schema, fail, pass_app
from conveyor.db import listen_url
from conveyor.worker.liveness import LivenessSlot


@click.command("migrate")
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
        granted = migrate.roles_granted(conn, app.settings.schema)
        if roles:
            migrate.apply_roles(conn, app.settings.schema)
            click.echo(
                f"roles conveyor_worker and conveyor_reader granted on schema {app.settings.schema}"
            )
    if applied:
        click.echo(f"applied {', '.join(applied)} to schema {app.settings.schema}")
        if not roles and granted:
            click.echo("roles conveyor_worker and conveyor_reader granted what it added")
    else:
        click.echo(f"schema {app.settings.schema} is up to date")


@click.command("run")
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
    ensure_schema(app)
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
        metrics_host=app.settings.metrics_host,
        pipeline=app.pipeline.name,
    )
    try:
        code = supervisor.run()
    finally:
        if os.getpid() == supervisor_pid:
            remove_owned_metrics_dir()
    sys.exit(code)


@click.command("worker")
@click.option("--stage", "stage_name", required=True, help="The stage this process serves.")
@pass_app
@clear_errors
def worker_command(app: App, stage_name: str) -> None:
    """Run one worker process for one stage."""
    from conveyor.worker.loop import run_worker

    stage = app.pipeline.stage(stage_name)
    ensure_schema(app)
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


@click.command("demo")
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
    ensure_schema(app)
    sys.exit(run_demo(app.settings, app.pipeline, app.url, questions))


@click.command("observer")
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


@click.command("bench", context_settings={"ignore_unknown_options": True})
@click.argument("args", nargs=-1, type=click.UNPROCESSED)
def bench_command(args: tuple[str, ...]) -> None:
    """Run the benchmark harness of a source checkout (`python -m benchmarks ARGS`)."""
    import subprocess
    from pathlib import Path

    checkout = Path(__file__).resolve().parents[2]  # conveyor/commands/ -> the checkout
    if not (checkout / "benchmarks" / "__main__.py").exists():
        fail("bench needs a source checkout (benchmarks/ is not in the wheel)")
    sys.exit(subprocess.call([sys.executable, "-m", "benchmarks", *args], cwd=checkout))


@click.group("embedded")
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


COMMANDS: list[click.Command] = [
    migrate_command,
    run_command,
    worker_command,
    demo_command,
    observer_command,
    bench_command,
    embedded_group,
]
