"""Commit -> handler start latency with idle workers.

    python -m benchmarks.latency [--runs 300]

Starts one worker for a one-stage no-op pipeline on the embedded PostgreSQL, waits until it is
idle, then inserts runs one at a time (autocommit: the INSERT and its commit are one round trip)
and reads each handler's start time from run_events. Two figures: from the commit's
acknowledgement to the handler's start (commit -> start), and from the moment the client sent the
INSERT (submit -> start, which adds the insert and its flush to disk).
"""

from __future__ import annotations

import argparse
import time

from benchmarks.harness import BenchDatabase, start_conveyor


def measure(db: BenchDatabase, runs: int, pipeline: str = "single") -> dict[str, float]:
    worker = start_conveyor(db, ["worker", "--stage", "only"], pipeline=pipeline)
    try:
        with db.connect() as conn:
            db.wait_idle_workers(conn, 1)
            from_commit, from_submit = [], []
            for _ in range(runs):
                sent = time.time()
                run_id = conn.execute(
                    "INSERT INTO conveyor.pipeline_runs (pipeline) VALUES ('bench1') RETURNING id"
                ).fetchone()[0]  # type: ignore[index]
                committed = time.time()
                started = db.wait_started(conn, run_id)
                from_commit.append(started - committed)
                from_submit.append(started - sent)
                time.sleep(0.01)  # let the worker go idle again, as a fresh arrival would find it
    finally:
        worker.stop()
    return {
        "commit_p50_ms": percentile(from_commit, 0.50) * 1000,
        "commit_p99_ms": percentile(from_commit, 0.99) * 1000,
        "submit_p50_ms": percentile(from_submit, 0.50) * 1000,
        "submit_p99_ms": percentile(from_submit, 0.99) * 1000,
        "runs": runs,
    }


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(len(ordered) * q))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=300)
    args = parser.parse_args()
    with BenchDatabase.create() as db:
        result = measure(db, args.runs)
    print(
        f"commit -> handler start, idle worker: p50 {result['commit_p50_ms']:.2f} ms, "
        f"p99 {result['commit_p99_ms']:.2f} ms; submit -> start: p50 "
        f"{result['submit_p50_ms']:.2f} ms, p99 {result['submit_p99_ms']:.2f} ms "
        f"({args.runs} runs; python -m benchmarks.latency)"
    )


if __name__ == "__main__":
    main()
