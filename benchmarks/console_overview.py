"""The console's overview query at 10k and 1M finished runs: what one refresh costs.

    python -m benchmarks.console_overview [--sizes 10000,1000000] [--repeat 30]

The history is seeded in SQL (finished runs spread over 30 days, one run_events row each, a small
queue of waiting and in-flight runs), vacuumed and analysed as autovacuum would leave it. The
overview statement is timed uncached, as the console's one refresh every few seconds runs it;
for contrast, the engine's `status_counts` (an exact GROUP BY over every row) is timed too.
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Any

import psycopg

from benchmarks.harness import BenchDatabase
from conveyor import queries
from conveyor.console.overview import OVERVIEW_PARAMETERS

HISTORY_DAYS = 30


def seed_history(
    conn: psycopg.Connection[Any], finished: int, *, queue: bool = True, schema: str = "conveyor"
) -> None:
    """Add `finished` finished runs (90% DONE, 5% FAILED, 5% CANCELLED) spread over 30 days up
    to now, one event each, and (with `queue`) 200 waiting and 20 in-flight runs; then VACUUM
    ANALYZE, as autovacuum would leave the tables.

    Triggers are off while seeding: this is history, nobody must be woken or told about it."""
    table = f"{schema}.pipeline_runs"
    conn.execute(f"ALTER TABLE {table} DISABLE TRIGGER USER")
    try:
        with conn.transaction():
            first = conn.execute(f"SELECT count(*) FROM {table}").fetchone()
            conn.execute(
                f"""
                WITH runs AS (
                    INSERT INTO {table}
                           (id, pipeline, status, input, outputs, created_at, updated_at,
                            finished_at, last_error)
                    SELECT (lpad(to_hex(floor(extract(epoch FROM t.at - interval '3 seconds')
                                              * 1000)::bigint), 12, '0')
                            || '7000' || '8' || lpad(to_hex(%(offset)s + n), 15, '0'))::uuid,
                           'agents', s.status, jsonb_build_object('question', 'seeded ' || n),
                           '{{}}', t.at - interval '3 seconds', t.at, t.at,
                           CASE WHEN s.status = 'FAILED' THEN 'seeded failure' END
                      FROM generate_series(1, %(count)s) n
                     CROSS JOIN LATERAL (SELECT now() - make_interval(
                            secs => (%(count)s - n) * %(span)s / %(count)s) AS at) t
                     CROSS JOIN LATERAL (SELECT CASE n %% 20 WHEN 0 THEN 'FAILED'
                                                 WHEN 1 THEN 'CANCELLED' ELSE 'DONE' END
                                              AS status) s
                    RETURNING id, pipeline, status, finished_at
                )
                INSERT INTO {schema}.run_events
                       (run_id, pipeline, stage, from_status, to_status, attempt, worker,
                        started_at, duration, created_at)
                SELECT id, pipeline, 'answer', 'ANSWERING', status, 1, 'answer-1-seeded',
                       finished_at - interval '1 second', interval '1 second', finished_at
                  FROM runs
                """,
                {
                    "count": finished,
                    "span": HISTORY_DAYS * 86400.0,
                    # time-ordered ids, as uuid_v7 makes them (the creation time's
                    # milliseconds first), append at the primary key's right edge
                    "offset": first[0] if first else 0,
                },
            )
            if queue:
                conn.execute(
                    f"""
                    INSERT INTO {table} (pipeline, status, input, lease_owner, lease_expires_at,
                                         attempt)
                    SELECT 'agents',
                           CASE WHEN n <= 20 THEN 'ANALYZING' ELSE 'NEW' END,
                           jsonb_build_object('question', 'waiting ' || n),
                           CASE WHEN n <= 20 THEN 'analyze-1-seeded' END,
                           CASE WHEN n <= 20 THEN now() + interval '30 seconds' END,
                           CASE WHEN n <= 20 THEN 1 ELSE 0 END
                      FROM generate_series(1, 220) n
                    """
                )
    finally:
        conn.execute(f"ALTER TABLE {table} ENABLE TRIGGER USER")
    conn.execute(f"VACUUM ANALYZE {table}")
    conn.execute(f"VACUUM ANALYZE {schema}.run_events")


def overview_statement(schema: str = "conveyor") -> str:
    return queries.load(schema)["console_overview"]


def _time(conn: psycopg.Connection[Any], statement: str, params: Any, repeat: int) -> list[float]:
    conn.execute(statement, params).fetchall()  # warm the cache, as a running console has it
    timings = []
    for _ in range(repeat):
        started = time.perf_counter()
        conn.execute(statement, params).fetchall()
        timings.append((time.perf_counter() - started) * 1000)
    return timings


def _summary(timings: list[float]) -> str:
    ordered = sorted(timings)
    p95 = ordered[min(len(ordered) - 1, int(len(ordered) * 0.95))]
    return f"p50 {statistics.median(ordered):7.2f} ms   p95 {p95:7.2f} ms"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="10000,1000000")
    parser.add_argument("--repeat", type=int, default=30)
    args = parser.parse_args()
    sizes = [int(size) for size in args.sizes.split(",")]
    overview = overview_statement()
    counts = queries.load("conveyor")["status_counts"]
    print(
        f"{'finished runs':>14}  {'console overview (one refresh)':<34}  exact GROUP BY (contrast)"
    )
    with BenchDatabase.create() as db, db.connect() as conn:
        conn.prepare_threshold = None  # as the console sends it: planned with its values
        seeded = 0
        for size in sizes:
            seed_history(conn, size - seeded, queue=seeded == 0)
            seeded = size
            fast = _time(conn, overview, OVERVIEW_PARAMETERS, args.repeat)
            slow = _time(conn, counts, None, max(3, args.repeat // 5))
            print(f"{size:>14,}  {_summary(fast):<34}  {_summary(slow)}")


if __name__ == "__main__":
    main()
