"""Test helpers: the server under test, conveyor processes, waiting on conditions (not sleeping)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import psycopg
from psycopg import conninfo

ROOT = Path(__file__).resolve().parent.parent
T = TypeVar("T")


@dataclass
class PgServer:
    admin_url: str
    data_dir: Path | None = None  # set for the embedded server, which tests may restart

    def url_for(self, dbname: str) -> str:
        return conninfo.make_conninfo(self.admin_url, dbname=dbname)

    def stop(self, mode: str = "fast") -> None:
        """Stop the server: "fast" shuts it down cleanly, "immediate" is a crash (unflushed
        commits are lost, unlogged tables emptied, WAL replayed at the next start)."""
        from conveyor import _embedded

        assert self.data_dir is not None, "only the embedded server can be restarted"
        _embedded.stop(self.data_dir, mode=mode)

    def start(self) -> None:
        from conveyor import _embedded

        assert self.data_dir is not None
        _embedded.ensure_running(self.data_dir)


def wait_until(
    predicate: Callable[[], T], timeout: float, message: str = "condition", interval: float = 0.05
) -> T:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {message}")
        time.sleep(interval)


def conveyor_env(database_url: str, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CONVEYOR_")}
    env.update(
        {
            "CONVEYOR_DATABASE_URL": database_url,
            "CONVEYOR_LOG_FORMAT": "json",
            "CONVEYOR_LOG_LEVEL": "info",
            "CONVEYOR_METRICS_PORT": "0",  # an ephemeral port: tests never fight over 9464
            "PYTHONPATH": str(ROOT),
        }
    )
    env.update(extra)
    return env


@dataclass
class ConveyorProcess:
    """A `python -m conveyor ...` child with its output in a log file."""

    args: list[str]
    env: dict[str, str]
    log_path: Path
    process: subprocess.Popen[bytes] = field(init=False)

    def __post_init__(self) -> None:
        self._log = open(self.log_path, "wb")  # noqa: SIM115 - closed in wait()
        self.process = subprocess.Popen(
            [sys.executable, "-m", "conveyor", *self.args],
            env=self.env,
            cwd=ROOT,
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )

    @property
    def pid(self) -> int:
        return self.process.pid

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def signal(self, signum: int) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signum)

    def wait(self, timeout: float = 60) -> int:
        try:
            return self.process.wait(timeout=timeout)
        finally:
            self._log.close()

    def stop(self, timeout: float = 60) -> int:
        self.signal(signal.SIGTERM)
        try:
            return self.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            return self.wait(10)


def conveyor_command(
    database_url: str,
    *args: str,
    stdin: str | None = None,
    cwd: Path = ROOT,
    timeout: float = 60,
    **env: str,
) -> subprocess.CompletedProcess[str]:
    """Run `conveyor ARGS` to its end against the test database: its exit code and output."""
    return subprocess.run(
        [sys.executable, "-m", "conveyor", *args],
        env=conveyor_env(database_url, **env),
        cwd=cwd,
        input=stdin,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def fetch_all(url: str, query: str, params: Any = None) -> list[tuple[Any, ...]]:
    with psycopg.connect(url, autocommit=True) as conn:
        return conn.execute(query, params).fetchall()


def scalar(url: str, query: str, params: Any = None) -> Any:
    rows = fetch_all(url, query, params)
    return rows[0][0] if rows else None


def leased_run(url: str, pipeline: str, status: str, worker: str, lease_seconds: int) -> Any:
    """A run leased to `worker` in `status`, inserted with the triggers off: as a hand-off
    leaves it, with no notification sent. Returns its id."""
    with psycopg.connect(url, autocommit=True) as conn, conn.transaction():
        conn.execute("SET LOCAL session_replication_role = replica")
        row = conn.execute(
            "INSERT INTO conveyor.pipeline_runs"
            " (pipeline, status, lease_owner, lease_expires_at, attempt)"
            " VALUES (%s, %s, %s, now() + make_interval(secs => %s), 1) RETURNING id",
            (pipeline, status, worker, lease_seconds),
        ).fetchone()
    assert row is not None
    return row[0]


def insert_skipping_run(conn: psycopg.Connection[Any]) -> Any:
    """A DONE run of the reference pipeline whose analyze, on its second attempt, routed it
    straight to CONTEXT_READY (assemble skipped), with its history as the engine writes it.
    Returns its id."""
    row = conn.execute(
        "INSERT INTO conveyor.pipeline_runs (status, input, outputs, finished_at)"
        ' VALUES (\'DONE\', \'{"question": "q"}\', \'{"analyze": {}, "answer": {}}\', now())'
        " RETURNING id"
    ).fetchone()
    assert row is not None
    conn.execute(
        "INSERT INTO conveyor.run_events (run_id, pipeline, stage, from_status, to_status,"
        " attempt, error, duration) VALUES"
        " (%(id)s, 'agents', NULL, NULL, 'NEW', NULL, NULL, NULL),"
        " (%(id)s, 'agents', 'analyze', 'ANALYZING', 'NEW', 1, 'TimeoutError: slow', '1s'),"
        " (%(id)s, 'agents', 'analyze', 'NEW', 'CONTEXT_READY', 2, NULL, '10ms'),"
        " (%(id)s, 'agents', 'answer', 'CONTEXT_READY', 'DONE', 1, NULL, '10ms')",
        {"id": row[0]},
    )
    return row[0]


async def _noop(run: Any) -> dict[str, Any]:
    return {}


def unstarted_worker() -> Any:
    """A Worker for a one-stage no-op pipeline, built and never run: nothing connects until it
    runs, so its parts can be driven one at a time."""
    # Imported here: every other helper drives conveyor from outside, as a process.
    from conveyor.pipeline import Pipeline, Stage
    from conveyor.settings import Settings
    from conveyor.worker.loop import Worker

    pipeline = Pipeline("unstarted", [Stage("only", _noop, "NEW", "DONE")])
    settings = Settings.from_env({})
    return Worker(settings, pipeline, pipeline.stages[0], url="postgresql://nobody@127.0.0.1:9/x")
