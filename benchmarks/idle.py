"""(f) what an idle worker costs, and (g) its resident memory idle and after a load.

    python -m benchmarks.idle [--seconds 30] [--throttled]

One `conveyor worker` at default settings (sweep every 5 s) with nothing to do. Counted over
the window:
- CPU: the worker process's user + system time from /proc/<pid>/stat, as a share of one core;
  the CPU of its PostgreSQL backends is shown beside it (what the server pays for it).
- Queries: every statement its backends send, from the server's own log. The bench database
  is set to `log_statement = all` before the worker connects, and the log lines are kept only
  for the pids of the worker's backends (application_name conveyor:<id> and
  conveyor-listen:<id>), then sorted by what they are (claim, rescue, beat, ...). A lone
  worker also competes for the pipeline's maintenance lead and, alone, leads it (rescues of
  expired leases, the registry's dead rows) on its conveyor-leader:<id> connection: those
  statements are counted apart, as what the maintenance costs. When the
  server log cannot be read (a remote server), the figure falls back to the committed
  transactions of the bench database in pg_stat_database (each statement the worker sends
  idle is one autocommit transaction; autovacuum may add a few).
Then a load of no-op runs goes through the same worker and its RSS is read again.

--throttled: the same worker held back by flow control instead of idle: its stage's key closed
for a day, 100 runs waiting behind it (the load is skipped).
"""

from __future__ import annotations

import argparse
import re
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from psycopg import sql

from benchmarks.harness import BenchDatabase, Scale, running
from benchmarks.procstat import cpu_seconds, rss_megabytes

COMMAND = "python -m benchmarks.idle"
SWEEP_INTERVAL = 5.0  # the default CONVEYOR_SWEEP_INTERVAL
_LOG_LINE = re.compile(r"^\S+ \S+ \S+ \[(\d+)\] LOG:  (?:statement|execute [^:]*): (.*)$")
_KINDS = (
    ("claim", "WITH candidates AS"),
    ("rescue", "WITH expired AS"),
    ("beat", 'INSERT INTO "conveyor".workers'),
    ("lease extension", 'UPDATE "conveyor".pipeline_runs'),
    ("listener ping", "SELECT pg_notify"),
    ("listen", "LISTEN"),
    ("leader lock", "SELECT pg_try_advisory_lock"),
    ("schema check", "SELECT coalesce(max(version)"),
    ("forget dead workers", 'DELETE FROM "conveyor".workers WHERE expires_at'),
    ("claim under limits", "WITH room AS"),
)
_MAINTENANCE = "conveyor-leader:"  # the application_name of the maintenance connection


@dataclass
class Idle:
    seconds: float
    cpu_percent: float
    backend_cpu_percent: float | None
    queries_per_minute: float
    source: str  # where the query count comes from
    by_kind: dict[str, int] = field(default_factory=dict)  # the worker's own statements
    maintenance_by_kind: dict[str, int] = field(default_factory=dict)  # the lead's
    rss_idle_mb: float = 0.0
    rss_loaded_mb: float = 0.0
    load_runs: int = 0

    @property
    def maintenance_per_minute(self) -> float:
        return sum(self.maintenance_by_kind.values()) / self.seconds * 60

    @property
    def claims_per_sweep(self) -> float:
        claims = self.by_kind.get("claim", 0) + self.by_kind.get("claim under limits", 0)
        return claims / (self.seconds / SWEEP_INTERVAL)


def _server_log(conn: Any) -> Path | None:
    """The embedded server writes its log to <data_directory>/log (pg_ctl -l)."""
    try:
        row = conn.execute("SHOW data_directory").fetchone()
    except Exception:
        return None
    path = Path(row[0]) / "log" if row else None
    try:
        if path is not None:
            path.open("rb").close()
            return path
    except OSError:
        pass
    return None


def _backend_pids(conn: Any, db: BenchDatabase) -> dict[int, str]:
    """The worker's backends: pid -> application_name."""
    rows = conn.execute(
        "SELECT pid, application_name FROM pg_stat_activity"
        " WHERE datname = %s AND application_name LIKE 'conveyor%%'",
        (db.name,),
    ).fetchall()
    return {row[0]: row[1] for row in rows}


def _transactions(conn: Any, db: BenchDatabase) -> int:
    conn.execute("SELECT pg_stat_clear_snapshot()")
    row = conn.execute(
        "SELECT xact_commit + xact_rollback FROM pg_stat_database WHERE datname = %s", (db.name,)
    ).fetchone()
    return int(row[0])


def _classify(text: str) -> str:
    for kind, start in _KINDS:
        if text.startswith(start):
            return kind
    return "other: " + text[:40]


def measure(
    db: BenchDatabase, scale: Scale, *, load_runs: int = 20_000, throttled: bool = False
) -> Idle:
    seconds = scale.idle_seconds
    with db.connect() as conn:
        db.reset(conn)
        if throttled:
            conn.execute(
                "INSERT INTO conveyor.limits (key, closed_until, closed_reason)"
                " VALUES ('bench:never-binding', now() + interval '1 day', 'benchmark')"
            )
            conn.execute(
                "INSERT INTO conveyor.pipeline_runs (pipeline)"
                " SELECT 'bench1' FROM generate_series(1, 100)"
            )
            load_runs = 0
        name = sql.Identifier(db.name)
        conn.execute(sql.SQL("ALTER DATABASE {} SET log_statement = 'all'").format(name))
        try:
            with running(
                db,
                ["worker", "--stage", "only"],
                pipeline="single_limited" if throttled else "single",
            ) as worker:
                db.wait_idle_workers(conn, 1)
                time.sleep(1.0)  # past start-up and the grace claim after going idle
                log = _server_log(conn)
                pids = _backend_pids(conn, db)
                log_start = log.stat().st_size if log else 0
                xacts_start = _transactions(conn, db)
                cpu_start = cpu_seconds(worker.pid)
                backend_start = sum(cpu_seconds(pid) for pid in pids) if log else None
                time.sleep(seconds)
                cpu = cpu_seconds(worker.pid) - cpu_start
                backend = (
                    sum(cpu_seconds(pid) for pid in pids) - backend_start
                    if backend_start is not None
                    else None
                )
                xacts = _transactions(conn, db) - xacts_start - 1  # the first read's own
                rss_idle = rss_megabytes(worker.pid)
                by_kind: Counter[str] = Counter()
                maintenance_by_kind: Counter[str] = Counter()
                if log:
                    with log.open("rb") as handle:
                        handle.seek(log_start)
                        chunk = handle.read().decode(errors="replace")
                    names = {str(pid): name for pid, name in pids.items()}
                    for line in chunk.splitlines():
                        match = _LOG_LINE.match(line)
                        if match and match.group(1) in names:
                            maintains = names[match.group(1)].startswith(_MAINTENANCE)
                            counted = maintenance_by_kind if maintains else by_kind
                            counted[_classify(match.group(2).strip())] += 1
                conn.execute(sql.SQL("ALTER DATABASE {} RESET log_statement").format(name))
                rss_loaded = rss_idle if throttled else _after_a_load(conn, worker.pid, load_runs)
        finally:
            conn.execute(sql.SQL("ALTER DATABASE {} RESET log_statement").format(name))
    queries = sum(by_kind.values()) + sum(maintenance_by_kind.values()) if log else xacts
    return Idle(
        seconds=seconds,
        cpu_percent=cpu / seconds * 100,
        backend_cpu_percent=backend / seconds * 100 if backend is not None else None,
        queries_per_minute=queries / seconds * 60,
        source="server log, worker backends" if log else "pg_stat_database transactions",
        by_kind=dict(by_kind),
        maintenance_by_kind=dict(maintenance_by_kind),
        rss_idle_mb=rss_idle,
        rss_loaded_mb=rss_loaded,
        load_runs=load_runs,
    )


def _kinds(counted: dict[str, int]) -> str:
    return ", ".join(f"{kind} {count}" for kind, count in sorted(counted.items()))


def _after_a_load(conn: Any, pid: int, runs: int) -> float:
    """The worker's RSS once `runs` no-op runs went through it (an insert wakes it like any
    submit would)."""
    conn.execute(
        "INSERT INTO conveyor.pipeline_runs (pipeline) SELECT 'bench1' FROM generate_series(1, %s)",
        (runs,),
    )
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        row = conn.execute(
            "SELECT count(*) FROM conveyor.pipeline_runs WHERE finished_at IS NULL"
        ).fetchone()
        if row and row[0] == 0:
            break
        time.sleep(0.1)
    return rss_megabytes(pid)


def describe(result: Idle) -> str:
    kinds = _kinds(result.by_kind)
    if result.maintenance_by_kind:
        kinds += (
            f"; of them the maintenance it leads, {result.maintenance_per_minute:.1f}/min:"
            f" {_kinds(result.maintenance_by_kind)}"
        )
    backend = (
        f"; its PostgreSQL backends {result.backend_cpu_percent:.2f}%"
        if result.backend_cpu_percent is not None
        else ""
    )
    return (
        f"(f) idle worker over {result.seconds:.0f} s: CPU {result.cpu_percent:.2f}% of a core"
        f"{backend}; {result.queries_per_minute:.1f} queries/min ({result.source}"
        f"{': ' + kinds if kinds else ''}); claims per {SWEEP_INTERVAL:g} s sweep interval:"
        f" {result.claims_per_sweep:.2f}\n"
        f"(g) worker RSS: {result.rss_idle_mb:.1f} MB idle, {result.rss_loaded_mb:.1f} MB after"
        f" {result.load_runs:,} runs"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=Scale().idle_seconds)
    parser.add_argument("--tiny", action="store_true", help="two seconds, for tests")
    parser.add_argument("--throttled", action="store_true", help="held back by a closed key")
    args = parser.parse_args()
    scale = Scale.small() if args.tiny else Scale(idle_seconds=args.seconds)
    with BenchDatabase.create() as db:
        result = measure(
            db, scale, load_runs=500 if args.tiny else 20_000, throttled=args.throttled
        )
    print(describe(result) + f" ({COMMAND})")


if __name__ == "__main__":
    main()
