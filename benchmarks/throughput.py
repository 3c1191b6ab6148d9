"""(a), (b), (e): no-op runs per second moved by conveyor workers from a backlog.

    python -m benchmarks.throughput --single    (a) one worker process, one stage, batch 50
    python -m benchmarks.throughput --single --batch 500    (a) with claims of up to 500 runs
    python -m benchmarks.throughput --single --input-kb 16  (a) with runs of 16 kB inputs
    python -m benchmarks.throughput --versus-batch 500      (a) at batch 500 beside batch 50
    python -m benchmarks.throughput --three     (b) supervisor, one process per stage
    python -m benchmarks.throughput --million   (e) (a) with 1,000,000 finished runs, ratio to (a)
    python -m benchmarks.throughput --limits    (a) beside (a) under one and two limits that
                                                never bind
    add --observer-off to switch the pipeline_events observer triggers off, --log-level info to
    have the worker log its "run finished" line for every run (the default level of conveyor)

A backlog is queued first, the worker started, and completions are counted in run_events over a
few seconds of steady state (after the first completion and a warm-up), from outside the workers.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

from benchmarks.harness import (
    BATCH,
    BenchDatabase,
    Scale,
    batch_settings,
    fill,
    measure_rate,
    running,
    set_observer,
    settle,
)
from benchmarks.procstat import rss_megabytes
from benchmarks.report import ratio

COMMAND = "python -m benchmarks.throughput"
_RATE_GUESS = 30_000  # queue for this rate, so that a fast worker never runs dry
# --limits, --versus-batch: seconds counted per figure, and ABBA blocks (two pairs each)
_PAIRED_WINDOW = 6.0
_TWO_LIMITS = "two limits (a stage cap and a key with a rate)"
_PAIRED_BLOCKS = 3


@dataclass(frozen=True)
class Throughput:
    runs_per_second: float
    cpu_us_per_run: float  # worker processes' CPU time per run moved (a steady cost figure)
    db_cpu_us_per_run: float  # the CPU time of their database backends per run moved
    rss_mb: float  # the worker's resident memory at the end of the window (one-stage only)


def single(
    db: BenchDatabase,
    scale: Scale,
    *,
    observer: bool = True,
    history: int = 0,
    log_level: str = "warning",
    pipeline: str = "single",
    batch: int = BATCH,
    input_kb: int = 0,
) -> Throughput:
    """One `conveyor worker` process for a one-stage no-op pipeline: claims of up to `batch`
    runs, twice as many slots (batch 50 and 100 slots as the pipeline declares them); runs
    with an input of `input_kb` kB (else `{}`)."""
    with db.connect() as conn:
        db.reset(conn)
        set_observer(conn, on=observer)
        if history:
            fill(conn, "bench1", history, finished=True)
        guess = _RATE_GUESS * (2 if batch > BATCH else 1) * 4 // (4 + input_kb // 4)
        fill(conn, "bench1", scale.backlog(guess), input_kb=input_kb)
        settle(conn)
        with running(
            db,
            ["worker", "--stage", "only"],
            pipeline=pipeline,
            CONVEYOR_LOG_LEVEL=log_level,
            CONVEYOR_LOG_FORMAT="json",
            **batch_settings(batch),
        ) as worker:
            rate = measure_rate(conn, scale, pids=(worker.pid,))
            rss = rss_megabytes(worker.pid)
    return Throughput(rate.per_second, rate.cpu_us_per_run, rate.db_cpu_us_per_run, rss)


def three(db: BenchDatabase, scale: Scale, *, observer: bool = True) -> Throughput:
    """`conveyor run`: the supervisor with one worker process per stage of a three-stage
    no-op pipeline; runs/s reaching DONE."""
    with db.connect() as conn:
        db.reset(conn)
        set_observer(conn, on=observer)
        fill(conn, "bench3", scale.backlog(_RATE_GUESS // 3))
        settle(conn)
        with running(db, ["run"], pipeline="three") as supervisor:
            rate = measure_rate(conn, scale, pids=(supervisor.pid,))
    return Throughput(rate.per_second, rate.cpu_us_per_run, rate.db_cpu_us_per_run, 0.0)


def _spread(results: list[Throughput]) -> str:
    rates = [r.runs_per_second for r in results]
    return f"{min(rates):,.0f}-{max(rates):,.0f}"


def interleaved(figures: list[Callable[[], Throughput]], blocks: int) -> list[list[Throughput]]:
    """Figures measured in blocks that run them in turn and then in reverse (ABBA, ABCCBA):
    on a machine whose speed drifts by ten percent and more, drift falls on all alike. The
    n-th results of any two figures are neighbours in time. One list of results per figure."""
    results: list[list[Throughput]] = [[] for _ in figures]
    order = list(range(len(figures)))
    for _ in range(blocks):
        for which in [*order, *reversed(order)]:
            results[which].append(figures[which]())
    return results


def _pairwise(ones: list[Throughput], twos: list[Throughput]) -> str:
    """The second's rate over the first's, neighbour by neighbour: their median and range (n/a
    where a tiny run counted nothing). Each ratio is of two runs next to each other in time,
    so the machine's drift cancels better than in a ratio of medians."""
    pairs = [(a.runs_per_second, b.runs_per_second) for a, b in zip(ones, twos, strict=True)]
    ratios = [b / a for a, b in pairs if a]
    if not ratios:
        return "n/a"
    return f"median {statistics.median(ratios):.2f} ({min(ratios):.2f}-{max(ratios):.2f})"


def _cpu(results: list[Throughput]) -> str:
    worker = statistics.median(r.cpu_us_per_run for r in results)
    backends = statistics.median(r.db_cpu_us_per_run for r in results)
    return f"{worker:.0f} + {backends:.0f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    which = parser.add_mutually_exclusive_group(required=True)
    which.add_argument("--single", action="store_true", help="(a) one worker, one stage")
    which.add_argument("--three", action="store_true", help="(b) three stages, supervisor")
    which.add_argument("--million", action="store_true", help="(e) with 1,000,000 finished runs")
    which.add_argument("--limits", action="store_true", help="(a) under limits never binding")
    which.add_argument(
        "--versus-batch", type=int, metavar="N", help="(a) at batch N beside (a) at batch 50"
    )
    parser.add_argument("--observer-off", action="store_true", help="pipeline_events off")
    parser.add_argument(
        "--log-level", default="warning", help="the worker's (info: a JSON line per run)"
    )
    parser.add_argument(
        "--batch", type=int, default=BATCH, help="--single: most runs a claim takes (slots: 2x)"
    )
    parser.add_argument(
        "--input-kb", type=int, default=0, help="--single: each run's input, kB (else {})"
    )
    parser.add_argument("--tiny", action="store_true", help="a second per figure, for tests")
    args = parser.parse_args()
    for flag, size in (("--batch", args.batch), ("--versus-batch", args.versus_batch)):
        if size is not None and not 1 <= size <= 5000:
            parser.error(f"{flag}: from 1 to 5000")
    if args.batch != BATCH and not args.single:
        parser.error("--batch goes with --single (--versus-batch N compares N with 50)")
    if args.input_kb and not (args.single and 1 <= args.input_kb <= 64):
        parser.error("--input-kb goes with --single, from 1 to 64")
    scale = Scale.small() if args.tiny else Scale()
    observer = not args.observer_off
    suffix = f" ({'observer off' if args.observer_off else 'observer on'})"
    # --limits, --versus-batch: differences of some ten percent on a machine whose speed
    # drifts by as much: longer windows, interleaved; medians.
    paired = scale if args.tiny else dataclasses.replace(scale, window=_PAIRED_WINDOW)
    with BenchDatabase.create() as db:
        if args.single:
            result = single(
                db,
                scale,
                observer=observer,
                log_level=args.log_level,
                batch=args.batch,
                input_kb=args.input_kb,
            )
            inputs = f", {args.input_kb} kB inputs" if args.input_kb else ""
            print(
                f"(a) one worker process, batch {args.batch}{inputs}:"
                f" {result.runs_per_second:,.0f} runs/s{suffix};"
                f" worker CPU {result.cpu_us_per_run:.0f} us per run, its database"
                f" backends {result.db_cpu_us_per_run:.0f} us per run;"
                f" RSS after the load {result.rss_mb:.0f} MB"
            )
        elif args.three:
            result = three(db, scale, observer=observer)
            print(
                f"(b) three stages, supervisor: {result.runs_per_second:,.0f} runs/s{suffix};"
                f" worker CPU {result.cpu_us_per_run:.0f} us per run (three processes), their"
                f" database backends {result.db_cpu_us_per_run:.0f} us per run"
            )
        elif args.limits:
            plain, one, two = interleaved(
                [
                    lambda: single(db, paired, observer=observer),
                    lambda: single(db, paired, observer=observer, pipeline="single_rate_limited"),
                    lambda: single(db, paired, observer=observer, pipeline="single_limited"),
                ],
                _PAIRED_BLOCKS,
            )
            free = statistics.median(r.runs_per_second for r in plain)
            print(
                f"(a) without limits: {free:,.0f} runs/s{suffix} (median of {len(plain)};"
                f" {_spread(plain)}; CPU per run, worker + backends {_cpu(plain)} us)"
            )
            for held, what in ((one, "one limit (a key with a rate)"), (two, _TWO_LIMITS)):
                rate = statistics.median(r.runs_per_second for r in held)
                print(
                    f"(a) under {what}, never binding: {rate:,.0f} runs/s, ratio"
                    f" {ratio(rate, free)} (neighbour by neighbour {_pairwise(plain, held)};"
                    f" {_spread(held)}; CPU per run {_cpu(held)} us)"
                )
        elif args.versus_batch is not None:
            size = args.versus_batch
            narrow, wide = interleaved(
                [
                    lambda: single(db, paired, observer=observer),
                    lambda: single(db, paired, observer=observer, batch=size),
                ],
                1 if args.tiny else _PAIRED_BLOCKS,
            )
            at_50 = statistics.median(r.runs_per_second for r in narrow)
            at_size = statistics.median(r.runs_per_second for r in wide)
            print(
                f"(a) at batch {size} beside batch {BATCH}: {at_size:,.0f} runs/s against"
                f" {at_50:,.0f}, ratio {ratio(at_size, at_50)}{suffix} (medians of"
                f" {len(wide)} each; neighbour by neighbour {_pairwise(narrow, wide)}; CPU per"
                f" run, worker + backends: batch {size} {_cpu(wide)}, batch {BATCH}"
                f" {_cpu(narrow)} us)"
            )
        else:
            empty = single(db, scale, observer=observer)
            t0 = time.monotonic()
            loaded = single(db, scale, observer=observer, history=scale.million)
            print(
                f"(e) with {scale.million:,} finished runs: {loaded.runs_per_second:,.0f} runs/s,"
                f" empty table {empty.runs_per_second:,.0f} runs/s, ratio"
                f" {ratio(loaded.runs_per_second, empty.runs_per_second)}{suffix}"
                f" (loading took {time.monotonic() - t0:.0f} s)"
            )


if __name__ == "__main__":
    main()
