"""Every figure of the performance issue, in one run, as a table (`make bench`).

    python -m benchmarks [--repeat N] [--tiny]

(i), the protocol in pure SQL with pgbench, is measured first on the same server and database,
and every engine figure is shown as a fraction of it. Each row names the command that measures
it alone. A fresh database is created and dropped at the end; every process started is stopped.
Throughput figures are the best of --repeat runs: on a shared machine interference only ever
slows a run down.
"""

from __future__ import annotations

import argparse
import functools
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from benchmarks import ceiling, idle, ingest, latency, throughput
from benchmarks.harness import BenchDatabase, Scale
from benchmarks.report import Row, floor_share, rate, ratio, share, table

T = TypeVar("T")


def best(repeat: int, measure: Callable[[], T], key: Callable[[T], float]) -> T:
    return max((measure() for _ in range(repeat)), key=key)


_STARTED = time.monotonic()


def progress(what: str) -> None:
    print(
        f"[{time.monotonic() - _STARTED:5.0f} s] measuring {what} ...", file=sys.stderr, flush=True
    )


def cpu(result: throughput.Throughput, who: str, whose: str) -> str:
    """The CPU time a throughput figure cost per run, in the worker and in the database."""
    return (
        f"{who} CPU {result.cpu_us_per_run:.0f} us/run,"
        f" {whose} database backends {result.db_cpu_us_per_run:.0f} us/run"
    )


def load_average() -> str:
    return Path("/proc/loadavg").read_text().split()[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=1, help="best of N for throughput figures")
    parser.add_argument("--tiny", action="store_true", help="a second per figure, for tests")
    args = parser.parse_args()
    scale = Scale.small() if args.tiny else Scale()
    repeat = args.repeat
    started, load_before = time.monotonic(), load_average()
    with BenchDatabase.create() as db:
        ceilings: dict[tuple[int, int, int, bool], ceiling.Ceiling] = {}

        def measure_ceiling(**config: Any) -> None:
            found = best(repeat, functools.partial(ceiling.measure, db, scale, **config), _rows)
            ceilings[found.batch, found.clients, found.stages, found.observer] = found

        # Each ceiling an engine figure is compared with is measured right before that figure,
        # so that the pair sees the same machine (load on a shared one changes by the minute).
        progress("(i) the pure-SQL ceiling with pgbench, batch 1 and two clients")
        for config in ceiling.CONFIGURATIONS:
            if config["batch"] == 1 or config.get("clients") == 2:
                measure_ceiling(**config)
        progress("(i) and (a) one worker process")
        measure_ceiling(batch=50)
        a_on = best(repeat, lambda: throughput.single(db, scale), _runs)
        a_info = best(repeat, lambda: throughput.single(db, scale, log_level="info"), _runs)
        measure_ceiling(batch=50, observer=False)
        a_off = best(repeat, lambda: throughput.single(db, scale, observer=False), _runs)
        progress("(i) and (b) three stages under the supervisor")
        measure_ceiling(batch=50, stages=3)
        b_on = best(repeat, lambda: throughput.three(db, scale), _runs)
        measure_ceiling(batch=50, stages=3, observer=False)
        b_off = best(repeat, lambda: throughput.three(db, scale, observer=False), _runs)
        progress(f"(e) one worker with {scale.million:,} finished runs in the table")
        # Its ratio is to (a) measured again right before it: the pair sees the same machine.
        pairs = [
            (throughput.single(db, scale), throughput.single(db, scale, history=scale.million))
            for _ in range(repeat)
        ]
        e_empty = max((empty for empty, _ in pairs), key=_runs)
        e = max((loaded for _, loaded in pairs), key=_runs)
        progress("(c) commit -> handler start")
        c = latency.commit_to_start(db, scale)
        progress("(d) end to end, three stages")
        d = latency.end_to_end(db, scale)
        d_floor = latency.statement_chain(db, scale)
        progress(f"(f), (g) an idle worker for {scale.idle_seconds:.0f} s, then a load")
        f = idle.measure(db, scale, load_runs=500 if args.tiny else 20_000)
        progress("(h) ingest")
        h = {
            (r.wake, r.observer, r.waiting_worker): r.rows_per_second
            for r in best_each(repeat, lambda: ingest.measure_all(db, scale))
        }
        h_bulk = max(ingest.bulk(db, scale, observer=True) for _ in range(repeat))
    rows = _rows_of(
        ceilings, a_on, a_off, a_info, b_on, b_off, e, e_empty, c, d, d_floor, f, h, h_bulk, scale
    )
    print(table(rows))
    print(
        f"\nOne run of {time.monotonic() - started:.0f} s; best of {repeat} for throughput; load"
        f" average {load_before} before, {load_average()} after (2 cores, shared: figures"
        " measured while other work ran are low)."
    )


def best_each(repeat: int, measure: Callable[[], list[ingest.Ingest]]) -> list[ingest.Ingest]:
    """Best of N for every configuration of a list measured together (interleaved runs)."""
    runs = [measure() for _ in range(repeat)]
    return [max(group, key=lambda r: r.rows_per_second) for group in zip(*runs, strict=True)]


def _configuration_order(c: ceiling.Ceiling) -> int:
    keys = [
        (cfg["batch"], cfg.get("clients", 1), cfg.get("stages", 1), cfg.get("observer", True))
        for cfg in ceiling.CONFIGURATIONS
    ]
    return keys.index((c.batch, c.clients, c.stages, c.observer))


def _rows(c: ceiling.Ceiling) -> float:
    return c.rows_per_second


def _runs(t: throughput.Throughput) -> float:
    return t.runs_per_second


def _rows_of(
    ceilings: dict[tuple[int, int, int, bool], ceiling.Ceiling],
    a_on: throughput.Throughput,
    a_off: throughput.Throughput,
    a_info: throughput.Throughput,
    b_on: throughput.Throughput,
    b_off: throughput.Throughput,
    e: throughput.Throughput,
    e_empty: throughput.Throughput,
    c: latency.Latency,
    d: latency.Latency,
    d_floor: latency.Latency,
    f: idle.Idle,
    h: dict[tuple[bool, bool, bool], float],
    h_bulk: float,
    scale: Scale,
) -> list[Row]:
    single_on, single_off = ceilings[50, 1, 1, True], ceilings[50, 1, 1, False]
    three_on, three_off = ceilings[50, 1, 3, True], ceilings[50, 1, 3, False]
    one_row = ceilings[1, 1, 1, True]
    two_clients = ceilings[50, 2, 1, True]
    rows = [
        Row(
            f"(i) pure SQL: {ceil.label}",
            rate(ceil.rows_per_second, "rows/s"),
            ceiling=f"claim {ceil.claim_ms:.2f} ms + complete {ceil.complete_ms:.2f} ms",
            command=ceiling.COMMAND,
        )
        for ceil in sorted(ceilings.values(), key=_configuration_order)
    ]
    single = f"{throughput.COMMAND} --single"
    rows += [
        Row(
            "(a) one worker process, batch 50",
            f"{rate(a_on.runs_per_second)} ({cpu(a_on, 'worker', 'its')})",
            ">= 10,000 runs/s, >= 0.5 of ceiling",
            # the worker claims and completes on two connections at once
            share(a_on.runs_per_second, single_on.rows_per_second, "i: batch 50, 1 client")
            + "; "
            + share(a_on.runs_per_second, two_clients.rows_per_second, "2 clients"),
            single,
        ),
        Row(
            "(a) ... observer off",
            f"{rate(a_off.runs_per_second)} ({cpu(a_off, 'worker', 'its')})",
            ceiling=share(a_off.runs_per_second, single_off.rows_per_second, "i: observer off"),
            command=single + " --observer-off",
        ),
        Row(
            "(a) ... worker at log level info (a JSON line per run)",
            f"{rate(a_info.runs_per_second)} ({cpu(a_info, 'worker', 'its')})",
            ceiling=share(a_info.runs_per_second, single_on.rows_per_second, "i: batch 50"),
            command=single + " --log-level info",
        ),
        Row(
            "(b) three stages, supervisor, 1 process each",
            f"{rate(b_on.runs_per_second)} (" + cpu(b_on, "workers'", "their") + ")",
            ">= 3,000 runs/s",
            ceiling=share(b_on.runs_per_second, three_on.rows_per_second, "i: three stages"),
            command=f"{throughput.COMMAND} --three",
        ),
        Row(
            "(b) ... observer off",
            f"{rate(b_off.runs_per_second)} (" + cpu(b_off, "workers'", "their") + ")",
            ceiling=share(b_off.runs_per_second, three_off.rows_per_second, "i: observer off"),
            command=f"{throughput.COMMAND} --three --observer-off",
        ),
        Row(
            "(c) commit -> handler start, idle worker",
            f"p50 {c.p50_ms:.2f} ms, p99 {c.p99_ms:.2f} ms"
            f" (from sending the INSERT: {c.submit_p50_ms:.2f} / {c.submit_p99_ms:.2f})",
            "p50 <= 1 ms, p99 <= 5 ms",
            # With a hand-off the commit itself leases the run: no claim to wait for.
            floor_share(one_row.claim_ms, c.p50_ms, "a one-row claim, i: batch 1, skipped"),
            latency.COMMAND,
        ),
        Row(
            "(d) end to end, three stages, single runs",
            f"p50 {d.p50_ms:.2f} ms, p99 {d.p99_ms:.2f} ms"
            f" (from sending the INSERT: {d.submit_p50_ms:.2f} / {d.submit_p99_ms:.2f})",
            "p50 <= 5 ms",
            ceiling=floor_share(
                d_floor.p50_ms,
                d.p50_ms,
                f"the same chain run by blocking statement loops, {latency.COMMAND} --chain",
            ),
            command=f"{latency.COMMAND} --three",
        ),
        Row(
            f"(e) (a) with {scale.million:,} finished runs",
            f"{rate(e.runs_per_second)}, ratio {ratio(e.runs_per_second, e_empty.runs_per_second)}"
            f" to (a) measured just before it ({rate(e_empty.runs_per_second)})",
            "ratio >= 0.9",
            ceiling=share(e.runs_per_second, single_on.rows_per_second, "i: batch 50, 1 client"),
            command=f"{throughput.COMMAND} --million",
        ),
        Row(
            "(f) idle worker (sweep every 5 s)",
            f"CPU {f.cpu_percent:.2f}%, {f.queries_per_minute:.0f} queries/min"
            f" ({f.maintenance_per_minute:.0f} of them the maintenance it leads),"
            f" {f.claims_per_sweep:.2f} claims per sweep interval",
            "< 0.5% CPU, <= 1 claim per sweep interval",
            command=idle.COMMAND,
        ),
        Row(
            "(g) worker RSS",
            f"{f.rss_idle_mb:.0f} MB idle, {f.rss_loaded_mb:.0f} MB after {f.load_runs:,} runs;"
            f" {a_on.rss_mb:.0f} MB at the end of (a)",
            "<= 80 MB",
            command=idle.COMMAND,
        ),
    ]
    for observer in (False, True):
        on, off = h[True, observer, False], h[False, observer, False]
        rows.append(
            Row(
                f"(h) ingest, 8 clients, wake-up trigger on/off, observer"
                f" {'on' if observer else 'off'}",
                f"ratio {ratio(on, off)} ({rate(on, 'rows/s')} vs {rate(off, 'rows/s')})",
                "ratio >= 0.8",
                ceiling=f"trigger off is the SQL reference: {rate(off, 'rows/s')}",
                command=ingest.COMMAND,
            )
        )
    rows += [
        Row(
            "(h) ... what the observer costs",
            f"ratio {ratio(h[True, True, False], h[True, False, False])} with it on",
            command=ingest.COMMAND,
        ),
        Row(
            "(h) ... a waiting worker that never claims",
            f"{rate(h[True, False, True], 'rows/s')} (every insert notifies)",
            command=ingest.COMMAND,
        ),
        Row(
            "bulk submit, COPY in one transaction (conveyor submit-many)",
            f"{rate(h_bulk, 'runs/s')} ({2_000 if scale.tiny else ingest.BULK_RUNS:,} runs,"
            f" observer on): {ratio(h_bulk, h[True, True, False])} of (h)'s one-run inserts",
            command=ingest.COMMAND,
        ),
    ]
    return rows


if __name__ == "__main__":
    main()
