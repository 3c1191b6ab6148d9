"""Soak: the three-stage pipeline under a steady offered load, with retention pruning on and the
console open; how throughput, latency, table sizes, dead tuples, autovacuum and WAL move.

    python -m benchmarks.soak [--minutes 60] [--share 0.6 | --rate N] [--retention 5m]
                              [--out docs/soak]
    python -m benchmarks.soak --tiny     (about 20 s, a sample every 2 s: proves it works)

`conveyor run` moves the three-stage no-op pipeline (benchmarks/pipelines.py `three`) while a
feeder inserts its runs at a steady rate, a batch every 0.1 s. The rate is --rate runs/s or,
by default, --share (0.6) of (b): what the pipeline moves from a backlog, measured on the same
server just before the soak (`python -m benchmarks.throughput --three`, the best of two). The leader
prunes finished runs older than --retention (CONVEYOR_RETENTION) at each sweep (every 5 s), so
after the first retention cycle the tables should stop growing. `conveyor console` runs beside
it on a loopback port, and its overview page is fetched every 5 s, as an open tab refreshes.

Every 10 s one sample, a row of samples.csv in --out: runs offered and reaching DONE per
second; p50 and p99 end-to-end latency (created_at -> finished_at) of the runs finished in that
window; unfinished runs; total, table and index sizes of pipeline_runs and run_events; their
dead tuples and autovacuum counts; WAL written per second (the whole server's: run it alone);
the console's response time. At the end, one PNG chart per quantity beside the CSV
(benchmarks/soak_charts.py) and a summary: the first 10 minutes against the last 10 (a sixth of
a shorter soak), and sizes after the first retention cycle against the end.

It stops by itself after --minutes (Ctrl-C ends it early, keeping what was sampled); every
process started is stopped and the database dropped, whatever happens.
"""

from __future__ import annotations

import argparse
import csv
import math
import socket
import statistics
import sys
import threading
import time
import urllib.request
from dataclasses import dataclass, replace
from datetime import datetime
from pathlib import Path
from typing import Any

import psycopg

from benchmarks import pipelines, soak_charts, throughput
from benchmarks.harness import ROOT, BenchDatabase, Process, Scale, running, settle
from conveyor.settings import parse_duration

# The server's clock less a second: a run that finished before it has committed by then, so a
# window ending there is complete when it is read.
_READING = """
SELECT now() - interval '1 second',
       pg_wal_lsn_diff(pg_current_wal_lsn(), '0/0')::int8,
       (SELECT count(*) FROM conveyor.pipeline_runs WHERE finished_at IS NULL),
       pg_total_relation_size('conveyor.pipeline_runs'),
       pg_relation_size('conveyor.pipeline_runs'),
       pg_indexes_size('conveyor.pipeline_runs'),
       pg_total_relation_size('conveyor.run_events'),
       pg_relation_size('conveyor.run_events'),
       pg_indexes_size('conveyor.run_events')
"""
_TABLE_STATS = """
SELECT relname, n_dead_tup, autovacuum_count FROM pg_stat_user_tables
 WHERE schemaname = 'conveyor' AND relname IN ('pipeline_runs', 'run_events')
"""
_FINISHED = """
SELECT count(*),
       percentile_cont(ARRAY[0.5, 0.99]) WITHIN GROUP
           (ORDER BY extract(epoch FROM finished_at - created_at)::float8 * 1000)
  FROM conveyor.pipeline_runs
 WHERE finished_at >= %(start)s AND finished_at < %(end)s AND status = 'DONE'
"""
_INSERT = "INSERT INTO conveyor.pipeline_runs (pipeline) SELECT %s FROM generate_series(1, %s)"


@dataclass(frozen=True)
class Plan:
    seconds: float = 3600.0
    rate: float = 1800.0  # runs offered per second (main() sets it from --share or --rate)
    retention: float = 300.0  # CONVEYOR_RETENTION
    sweep: float = 5.0  # CONVEYOR_SWEEP_INTERVAL: the leader prunes at each
    interval: float = 10.0  # between two samples
    poll: float = 5.0  # between two fetches of the console's overview page

    @classmethod
    def tiny(cls) -> Plan:
        return cls(seconds=20.0, rate=300.0, retention=5.0, sweep=1.0, interval=2.0, poll=1.0)

    @property
    def span(self) -> float:
        """The stretch compared at the start and the end: 10 minutes, or a sixth."""
        return min(600.0, self.seconds / 6)


class Feeder(threading.Thread):
    """Inserts runs of the three-stage pipeline at a steady rate: every 0.1 s, in one statement,
    what is due by then (at most a second's worth, should it fall behind)."""

    TICK = 0.1

    def __init__(self, db: BenchDatabase, rate: float) -> None:
        super().__init__(name="soak-feeder", daemon=True)
        self.db = db
        self.rate = rate
        self.inserted = 0
        self.error: Exception | None = None
        self.finish = threading.Event()

    def run(self) -> None:
        try:
            with self.db.connect() as conn:
                started = time.monotonic()
                while not self.finish.is_set():
                    due = int(self.rate * (time.monotonic() - started)) - self.inserted
                    if due > 0:
                        count = min(due, max(1, int(self.rate)))
                        conn.execute(_INSERT, (pipelines.three.name, count))
                        self.inserted += count
                    self.finish.wait(self.TICK - (time.monotonic() - started) % self.TICK)
        except Exception as exc:
            self.error = exc

    def stop(self) -> None:
        self.finish.set()
        self.join()


class ConsolePoller(threading.Thread):
    """Fetches the console's overview page every `every` seconds; keeps the response times and
    the failures until the next sample takes them."""

    def __init__(self, url: str, every: float) -> None:
        super().__init__(name="soak-console", daemon=True)
        self.url = url
        self.every = every
        self.finish = threading.Event()
        self._lock = threading.Lock()
        self._times: list[float] = []
        self._errors = 0

    def wait_ready(self, console: Process, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if console.popen.poll() is not None:
                raise RuntimeError("conveyor console exited at start")
            try:
                with urllib.request.urlopen(self.url + "/healthz", timeout=5) as response:
                    if response.status == 200:
                        return
            except OSError:
                pass
            time.sleep(0.2)
        raise RuntimeError("conveyor console did not answer")

    def run(self) -> None:
        while not self.finish.is_set():
            started = time.monotonic()
            try:
                with urllib.request.urlopen(self.url + "/", timeout=30) as response:
                    response.read()
                    ok = response.status == 200
            except OSError:
                ok = False
            with self._lock:
                if ok:
                    self._times.append((time.monotonic() - started) * 1000)
                else:
                    self._errors += 1
            self.finish.wait(max(0.0, self.every - (time.monotonic() - started)))

    def take(self) -> tuple[float, int]:
        """Mean response time (ms) and failures since the last call."""
        with self._lock:
            times, errors = self._times, self._errors
            self._times, self._errors = [], 0
        return (statistics.fmean(times) if times else float("nan")), errors

    def stop(self) -> None:
        self.finish.set()
        self.join()


@dataclass(frozen=True)
class Mark:
    """Where one sample ended: the next window starts there."""

    at: float  # monotonic
    cut: datetime  # the server's clock, less a second
    wal: int  # bytes of WAL written by the server so far
    inserted: int


def _mark(conn: psycopg.Connection[Any], feeder: Feeder) -> tuple[Mark, dict[str, int]]:
    """Where the next window starts, and the queue and the tables' sizes now."""
    row = conn.execute(_READING).fetchone()
    assert row is not None
    cut, wal, unfinished, *sizes = row
    names = (
        "runs_total_bytes",
        "runs_heap_bytes",
        "runs_index_bytes",
        "events_total_bytes",
        "events_heap_bytes",
        "events_index_bytes",
    )
    return (
        Mark(time.monotonic(), cut, int(wal), feeder.inserted),
        {"unfinished": unfinished, **dict(zip(names, sizes, strict=True))},
    )


def take_sample(
    conn: psycopg.Connection[Any],
    before: Mark,
    started: float,
    feeder: Feeder,
    console: ConsolePoller,
) -> tuple[dict[str, float], Mark]:
    """One CSV row: the window since `before`, and the state at its end."""
    mark, state = _mark(conn, feeder)
    finished = conn.execute(_FINISHED, {"start": before.cut, "end": mark.cut}).fetchone()
    assert finished is not None
    done, quantiles = finished
    p50, p99 = quantiles or (float("nan"), float("nan"))
    stats = {name: (dead, vacuums) for name, dead, vacuums in conn.execute(_TABLE_STATS)}
    runs_dead, runs_vacuums = stats.get("pipeline_runs", (0, 0))
    events_dead, events_vacuums = stats.get("run_events", (0, 0))
    console_ms, console_errors = console.take()
    seconds = mark.at - before.at
    row = {
        "elapsed_s": mark.at - started,
        "offered_per_s": (mark.inserted - before.inserted) / seconds,
        "done_per_s": done / (mark.cut - before.cut).total_seconds(),
        "p50_ms": p50,
        "p99_ms": p99,
        **state,
        "runs_dead_tuples": runs_dead,
        "events_dead_tuples": events_dead,
        "runs_autovacuums": runs_vacuums,
        "events_autovacuums": events_vacuums,
        "wal_bytes_per_s": (mark.wal - before.wal) / seconds,
        "console_ms": console_ms,
        "console_errors": console_errors,
    }
    return {key: round(float(value), 3) for key, value in row.items()}, mark


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def soak(db: BenchDatabase, plan: Plan, out: Path) -> list[dict[str, float]]:
    """Run the soak, writing samples.csv into `out` as it goes; the samples."""
    out.mkdir(parents=True, exist_ok=True)
    port = _free_port()
    with db.connect() as conn:
        settle(conn)
        with (
            running(
                db,
                ["run"],
                pipeline="three",
                CONVEYOR_RETENTION=f"{plan.retention:g}s",
                CONVEYOR_SWEEP_INTERVAL=f"{plan.sweep:g}",
                CONVEYOR_METRICS_HOST="127.0.0.1",
                CONVEYOR_METRICS_PORT="0",  # any free port: nothing here reads it
            ) as supervisor,
            running(db, ["console", "--bind", f"127.0.0.1:{port}"], pipeline="three") as console,
        ):
            db.wait_idle_workers(conn, len(pipelines.three.stages))
            poller = ConsolePoller(f"http://127.0.0.1:{port}", plan.poll)
            poller.wait_ready(console)
            feeder = Feeder(db, plan.rate)
            feeder.start()
            poller.start()
            try:
                return _sample(conn, plan, feeder, poller, (supervisor, console), out)
            finally:
                feeder.stop()
                poller.stop()


def _sample(
    conn: psycopg.Connection[Any],
    plan: Plan,
    feeder: Feeder,
    poller: ConsolePoller,
    processes: tuple[Process, ...],
    out: Path,
) -> list[dict[str, float]]:
    rows: list[dict[str, float]] = []
    started = time.monotonic()
    mark, _ = _mark(conn, feeder)
    with (out / "samples.csv").open("w", newline="") as file:
        writer: csv.DictWriter[str] | None = None
        try:
            for index in range(1, int(plan.seconds / plan.interval + 1e-9) + 1):
                time.sleep(max(0.0, started + index * plan.interval - time.monotonic()))
                if feeder.error is not None:
                    raise RuntimeError(f"the feeder failed: {feeder.error}")
                if any(process.popen.poll() is not None for process in processes):
                    raise RuntimeError("conveyor run or conveyor console exited during the soak")
                row, mark = take_sample(conn, mark, started, feeder, poller)
                if writer is None:
                    writer = csv.DictWriter(file, fieldnames=list(row))
                    writer.writeheader()
                writer.writerow(row)
                file.flush()
                rows.append(row)
                print(
                    f"[{row['elapsed_s']:5.0f} s] {row['done_per_s']:,.0f} runs/s,"
                    f" p99 {row['p99_ms']:.0f} ms, {row['unfinished']:,.0f} unfinished,"
                    f" pipeline_runs {row['runs_total_bytes'] / soak_charts.MB:,.0f} MB",
                    file=sys.stderr,
                    flush=True,
                )
        except KeyboardInterrupt:
            print("interrupted: stopping, with what was sampled", file=sys.stderr)
    return rows


def _duration(seconds: float) -> str:
    return f"{seconds / 60:g} min" if seconds >= 60 else f"{seconds:.0f} s"


def _mean(values: list[float]) -> float:
    present = [value for value in values if value == value]  # nan: a window without runs
    return statistics.fmean(present) if present else float("nan")


def _median(values: list[float]) -> float:
    present = [value for value in values if value == value]
    return statistics.median(present) if present else float("nan")


def _size(row: dict[str, float], prefix: str) -> str:
    return (
        f"{row[f'{prefix}_total_bytes'] / soak_charts.MB:,.1f} MB"
        f" (indexes {row[f'{prefix}_index_bytes'] / soak_charts.MB:,.1f} MB)"
    )


def summary(rows: list[dict[str, float]], plan: Plan) -> list[str]:
    end = rows[-1]["elapsed_s"]
    first = [row for row in rows if row["elapsed_s"] <= plan.span + 1e-6] or rows[:1]
    last = [row for row in rows if row["elapsed_s"] > end - plan.span - 1e-6]
    span = _duration(plan.span)
    lines = [
        f"throughput: {_mean([r['done_per_s'] for r in first]):,.0f} runs/s in the first {span},"
        f" {_mean([r['done_per_s'] for r in last]):,.0f} runs/s in the last {span}"
        f" (offered {_mean([r['offered_per_s'] for r in rows]):,.0f} runs/s)",
        f"latency p99: {_median([r['p99_ms'] for r in first]):,.1f} ms first,"
        f" {_median([r['p99_ms'] for r in last]):,.1f} ms last; p50"
        f" {_median([r['p50_ms'] for r in first]):,.1f} ms first,"
        f" {_median([r['p50_ms'] for r in last]):,.1f} ms last"
        f" (median of the {plan.interval:g} s windows' figures)",
    ]
    cycle = next(
        (row for row in rows if row["elapsed_s"] >= plan.retention + plan.sweep - 1e-6), None
    )
    for table, prefix in (("pipeline_runs", "runs"), ("run_events", "events")):
        at_cycle = (
            f"{_size(cycle, prefix)} after the first retention cycle"
            f" (at {_duration(cycle['elapsed_s'])})"
            if cycle
            else "the soak ended before the first retention cycle"
        )
        lines.append(
            f"{table}: {at_cycle}, {_size(rows[-1], prefix)} at the end;"
            f" autovacuumed {rows[-1][f'{prefix}_autovacuums']:.0f} times"
        )
    wal = _mean([r["wal_bytes_per_s"] for r in rows]) / soak_charts.MB
    lines.append(f"WAL: {wal:,.1f} MB/s on average (the whole server's)")
    lines.append(
        f"console: overview page {_mean([r['console_ms'] for r in rows]):,.0f} ms on average,"
        f" {sum(r['console_errors'] for r in rows):.0f} fetches failed"
    )
    return lines


def _drain_rate(db: BenchDatabase, scale: Scale) -> float:
    """(b): runs/s the three-stage pipeline moves from a backlog, the best of two."""
    rates = [throughput.three(db, scale).runs_per_second for _ in range(2)]
    best = max(rates)
    print(
        f"(b) three stages from a backlog: {best:,.0f} runs/s"
        f" (best of {', '.join(f'{rate:,.0f}' for rate in rates)};"
        " python -m benchmarks.throughput --three)",
        file=sys.stderr,
    )
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, help="how long it runs (default 60)")
    parser.add_argument("--rate", type=float, help="runs offered per second")
    parser.add_argument(
        "--share", type=float, help="the rate as a share of (b), measured first (default 0.6)"
    )
    parser.add_argument("--retention", help="CONVEYOR_RETENTION, e.g. 300s or 5m (default 5m)")
    parser.add_argument(
        "--out", type=Path, default=ROOT / "docs" / "soak", help="samples.csv and the charts"
    )
    parser.add_argument("--tiny", action="store_true", help="about 20 s, a sample every 2 s")
    args = parser.parse_args()
    plan = Plan.tiny() if args.tiny else Plan()
    if args.minutes is not None:
        plan = replace(plan, seconds=args.minutes * 60)
    if args.rate is not None and args.share is not None:
        parser.error("--rate or --share, not both")
    if args.share is not None and not 0 < args.share <= 1:
        parser.error("--share is a fraction of (b): more than 0, at most 1")
    if args.rate is not None:
        plan = replace(plan, rate=args.rate)
    share = args.share
    if share is None and args.rate is None and not args.tiny:
        share = 0.6
    if args.retention is not None:
        try:
            plan = replace(plan, retention=parse_duration(args.retention))
        except ValueError as exc:
            parser.error(str(exc))
    if plan.seconds < plan.interval or not 0 < plan.rate < math.inf:
        parser.error(f"expected at least {plan.interval:g} s and a positive rate")
    if plan.retention <= plan.interval + 1:
        parser.error("--retention must outlast a sample window: a run is read before it is pruned")

    if share is not None:
        with BenchDatabase.create() as db:  # its own database: the soak's starts untouched
            plan = replace(
                plan, rate=share * _drain_rate(db, Scale.small() if args.tiny else Scale())
            )
        if not plan.rate > 0:
            raise SystemExit("(b) moved nothing: no rate to offer")
    print(
        f"soak: {_duration(plan.seconds)}, {plan.rate:,.0f} runs/s offered, retention"
        f" {_duration(plan.retention)}, the console's overview fetched every {plan.poll:g} s"
        + (f" ({share:g} of (b))" if share is not None else ""),
        file=sys.stderr,
    )
    with BenchDatabase.create() as db:
        rows = soak(db, plan, args.out)
    if not rows:
        raise SystemExit("no sample was taken")
    charts = soak_charts.draw(rows, args.out)
    for line in summary(rows, plan):
        print(line)
    print(f"samples: {args.out / 'samples.csv'}; {len(charts)} charts: {args.out}/*.png")


if __name__ == "__main__":
    main()
