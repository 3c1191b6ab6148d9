"""(c) commit -> handler start latency with an idle worker; (d) end-to-end three-stage latency.

    python -m benchmarks.latency            (c)
    python -m benchmarks.latency --three    (d)
    python -m benchmarks.latency --chain    (d)'s floor: the same chain without the workers
    python -m benchmarks.latency --versus-floor   (d) and its floor interleaved: their ratio
    python -m benchmarks.latency --versus-floor --event-loop asyncio   ... workers on asyncio's loop
    python -m benchmarks.latency --idle     what a round trip to an idle backend costs here

(c): one worker for a one-stage no-op pipeline, idle; runs are inserted one at a time
(autocommit: the INSERT and its commit are one round trip) and each handler's start time is read
from run_events. Two figures: from the commit's acknowledgement to the handler's start
(commit -> start), and from the moment the client sent the INSERT (submit -> start, which adds
the insert and its flush to disk). Client and worker read the same clock.

(d): the supervisor with one worker per stage of a three-stage no-op pipeline, idle; one run at a
time, from sending the INSERT to the moment an outside client LISTENing on the observer channel
`pipeline_events` hears that the run is DONE (the origin design's way to follow a run). That
client reads the notifications straight from libpq when its socket turns readable, as the
workers do: psycopg's notifies() added ~0.2 ms to every figure (paired runs, one reader then the
other), which is the observer's cost, not the pipeline's.

(d)'s floor: the same chain and the same measurement, each worker replaced by a process that
blocks on its LISTEN socket and, as soon as a hand-off arrives, completes the run with the
worker's own statement (and so hands it on). What is left of (d) above it is the worker's.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import multiprocessing
import os
import select
import time
import uuid
from dataclasses import dataclass
from typing import Any, NamedTuple

import psycopg

from benchmarks import pipelines
from benchmarks.harness import BenchDatabase, Scale, running
from benchmarks.report import ratio
from conveyor import queries
from conveyor.batch_arrays import (
    NOT_ROUTED,
    microseconds_array,
    number_array,
    text_array,
    uuid_array,
)
from conveyor.event_loop import EVENT_LOOPS
from conveyor.listening import wake_channel

COMMAND = "python -m benchmarks.latency"
_PAUSE = 0.01  # between runs: each run finds the workers idle, as a lone arrival would
_FLOOR_BLOCKS = 6  # --versus-floor: blocks of runs through each, interleaved


class ChainSamples(NamedTuple):
    """Runs followed one at a time: seconds from each commit and from each INSERT sent, and
    the CPU the chain's stage processes spent per run (seconds, their sum; NaN where /proc
    cannot tell), the first run left out as the latencies leave it out in --versus-floor."""

    from_commit: list[float]
    from_submit: list[float]
    cpu_per_run: float


@dataclass(frozen=True)
class Latency:
    p50_ms: float
    p99_ms: float
    submit_p50_ms: float
    submit_p99_ms: float
    runs: int


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(len(ordered) * q))]


def summary(from_commit: list[float], from_submit: list[float]) -> Latency:
    return Latency(
        percentile(from_commit, 0.50) * 1000,
        percentile(from_commit, 0.99) * 1000,
        percentile(from_submit, 0.50) * 1000,
        percentile(from_submit, 0.99) * 1000,
        len(from_commit),
    )


def _insert(conn: Any, pipeline: str) -> Any:
    row = conn.execute(
        "INSERT INTO conveyor.pipeline_runs (pipeline) VALUES (%s) RETURNING id", (pipeline,)
    ).fetchone()
    return row[0]


def commit_to_start(db: BenchDatabase, scale: Scale) -> Latency:
    return summary(*commit_to_start_samples(db, scale))


def commit_to_start_samples(db: BenchDatabase, scale: Scale) -> tuple[list[float], list[float]]:
    """(c)'s seconds from each commit and from each INSERT sent."""
    with db.connect() as conn:
        db.reset(conn)
        with running(db, ["worker", "--stage", "only"], pipeline="single"):
            db.wait_idle_workers(conn, 1)
            time.sleep(0.2)  # past the grace claim a worker makes right after going idle
            from_commit, from_submit = [], []
            for _ in range(scale.latency_runs):
                sent = time.time()
                run_id = _insert(conn, "bench1")
                committed = time.time()
                started = db.wait_started(conn, run_id)
                from_commit.append(started - committed)
                from_submit.append(started - sent)
                time.sleep(_PAUSE)
    return from_commit, from_submit


def end_to_end(db: BenchDatabase, scale: Scale) -> Latency:
    return summary(*end_to_end_samples(db, scale)[:2])


def end_to_end_samples(db: BenchDatabase, scale: Scale, event_loop: str = "uvloop") -> ChainSamples:
    with db.connect() as conn:
        db.reset(conn)
        with running(db, ["run"], pipeline="three", CONVEYOR_EVENT_LOOP=event_loop):
            db.wait_idle_workers(conn, 3)
            workers = [pid for (pid,) in conn.execute("SELECT pid FROM conveyor.workers")]
            time.sleep(0.2)
            return _followed(db, scale, workers)


def statement_chain(db: BenchDatabase, scale: Scale) -> Latency:
    return summary(*statement_chain_samples(db, scale)[:2])


def statement_chain_samples(db: BenchDatabase, scale: Scale) -> ChainSamples:
    """(d) with every worker replaced by a blocking loop that runs the worker's statements."""
    spawn = multiprocessing.get_context("spawn")  # a forked child would share our sockets
    stages = [
        spawn.Process(target=_complete_what_is_handed, args=(db.url, index), daemon=True)
        for index in range(len(pipelines.three.stages))
    ]
    with db.connect() as conn:
        db.reset(conn)
        for stage in stages:
            stage.start()
        try:
            db.wait_idle_workers(conn, len(stages))
            return _followed(db, scale, [stage.pid for stage in stages if stage.pid is not None])
        finally:
            for stage in stages:
                stage.kill()
                stage.join()


def _complete_what_is_handed(url: str, index: int) -> None:
    pipeline = pipelines.three
    stage = pipeline.stages[index]
    worker = f"chain-{stage.name}"
    secret = os.urandom(32)
    channel = wake_channel("conveyor", pipeline.name, stage.consumes)
    complete = queries.load("conveyor")["complete_if_leased"]
    terminal = pipeline.is_terminal(stage.produces)
    # Named like conveyor's own connections: the harness's tests see none left behind.
    named: dict[str, Any] = {
        "autocommit": True,
        "application_name": f"conveyor-bench-chain:{stage.name}",
    }
    with (
        psycopg.connect(url, **named) as listener,
        psycopg.connect(url, prepare_threshold=1, **named) as conn,
    ):
        listener.execute(f'LISTEN "{channel}"')
        conn.execute(
            "INSERT INTO conveyor.workers (worker_id, pipeline, stage, consumes, channel,"
            " hostname, pid, expires_at, waiting, working, lease_seconds, free_slots, secret)"
            " VALUES (%s, %s, %s, %s, %s, 'bench', 0, now() + interval '1 day', true, %s, 30,"
            " 100000, %s)",
            (worker, pipeline.name, stage.name, stage.consumes, channel, stage.working, secret),
        )
        pgconn = listener.pgconn
        while True:
            select.select([pgconn.socket], [], [])
            pgconn.consume_input()
            while (notify := pgconn.notifies()) is not None:
                if not notify.extra.startswith(b"run:"):
                    continue  # a plain wake-up: never sent here, its run would time out
                # run:<worker>:<signature>:<json>, checked as a worker checks it
                _, _, signature, body = notify.extra.split(b":", 3)
                inner = hashlib.sha256(secret + body).digest()
                assert hashlib.sha256(secret + inner).hexdigest().encode() == signature
                handed = json.loads(body)
                conn.execute(
                    complete,
                    {
                        "pipeline": pipeline.name,
                        "stage": stage.name,
                        "consumes": stage.consumes,
                        "working": stage.working,
                        "produces": stage.produces,
                        "worker": worker,
                        "terminal": terminal,
                        "durable": terminal,
                        "ids": uuid_array([uuid.UUID(handed["id"])]),
                        "outputs": text_array(["{}"]),
                        "attempts": number_array([handed["attempt"]]),
                        "started_us": microseconds_array([time.time()]),
                        "durations_us": microseconds_array([0.0]),
                        "models": text_array([None]),
                        "prompt_tokens": number_array([None]),
                        "completion_tokens": number_array([None]),
                        **NOT_ROUTED,
                        "lock_ids": "{}",  # no children, no parents to lock
                    },
                ).fetchall()


def _followed(db: BenchDatabase, scale: Scale, stage_pids: list[int]) -> ChainSamples:
    """Insert runs one at a time into the idle three-stage chain and hear each one DONE, with
    the CPU that `stage_pids` spent meanwhile."""
    with db.connect() as conn, db.connect() as listener:
        listener.execute("LISTEN pipeline_events")
        from_commit, from_submit = [], []
        cpu_from = math.nan
        for index in range(scale.latency_runs):
            if index == 1:
                cpu_from = _cpu_seconds(stage_pids)
            sent = time.time()
            run_id = str(_insert(conn, "bench3"))
            committed = time.time()
            done = _heard_done(listener.pgconn, run_id)
            from_commit.append(done - committed)
            from_submit.append(done - sent)
            time.sleep(_PAUSE)
        cpu = (_cpu_seconds(stage_pids) - cpu_from) / max(1, scale.latency_runs - 1)
    return ChainSamples(from_commit, from_submit, cpu)


def _microseconds(seconds: float) -> str:
    return f"{seconds * 1e6:.0f} us" if math.isfinite(seconds) else "n/a"


def _cpu_seconds(pids: list[int]) -> float:
    """CPU time of these processes so far (Linux's schedstat: nanoseconds, unlike the
    10-ms ticks of /proc/<pid>/stat, finer than a run's share); NaN where it cannot be read."""
    try:
        total = 0
        for pid in pids:
            with open(f"/proc/{pid}/schedstat") as stat:
                total += int(stat.read().split()[0])
    except (OSError, ValueError, IndexError):
        return math.nan
    return total / 1e9


def _heard_done(pgconn: Any, run_id: str, timeout: float = 30) -> float:
    """When the observer channel said the run is DONE (time.time())."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        pgconn.consume_input()
        while (notify := pgconn.notifies()) is not None:
            event = json.loads(notify.extra)
            if event["id"] == run_id and event["status"] == "DONE":
                return time.time()
        select.select([pgconn.socket], [], [], max(0.0, deadline - time.monotonic()))
    raise RuntimeError(f"run {run_id} did not finish within {timeout:g} s")


@dataclass(frozen=True)
class AgainstFloor:
    workers: Latency
    floor: Latency
    # CPU per run of the three stage processes together, the mean of the blocks' (seconds)
    workers_cpu: float
    floor_cpu: float


def against_floor(
    db: BenchDatabase, scale: Scale, blocks: int, event_loop: str = "uvloop"
) -> AgainstFloor:
    """(d) and its floor in one run: blocks of runs through each, interleaved ABBA, so that a
    machine whose speed drifts weighs on both alike; each summary pools its blocks. The first
    run of a block, through processes just started, is not counted."""
    block = Scale(latency_runs=max(1, scale.latency_runs // blocks) + 1, tiny=scale.tiny)
    # keyed by whether the block went through the workers (True) or the floor (False)
    from_commit: dict[bool, list[float]] = {True: [], False: []}
    from_submit: dict[bool, list[float]] = {True: [], False: []}
    cpu: dict[bool, list[float]] = {True: [], False: []}
    for index in range(blocks):
        order = (True, False) if index % 2 == 0 else (False, True)
        for through_workers in order:
            if through_workers:
                samples = end_to_end_samples(db, block, event_loop)
            else:
                samples = statement_chain_samples(db, block)
            from_commit[through_workers].extend(samples.from_commit[1:])
            from_submit[through_workers].extend(samples.from_submit[1:])
            cpu[through_workers].append(samples.cpu_per_run)
    return AgainstFloor(
        summary(from_commit[True], from_submit[True]),
        summary(from_commit[False], from_submit[False]),
        sum(cpu[True]) / blocks,
        sum(cpu[False]) / blocks,
    )


def idle_round_trip(db: BenchDatabase, scale: Scale) -> dict[str, tuple[float, float]]:
    """p50 ms of `SELECT 1` and of a one-row claim, back to back and after the pause that (c)
    and (d) leave between runs: what waking an idle backend and client costs on this machine."""
    claim = queries.load("conveyor")["claim_batch"]
    params = {
        "pipeline": "bench1",
        "consumes": "NEW",
        "working": "ONLY_RUNNING",
        "worker": "idle-round-trip",
        "lease_seconds": 30.0,
        "batch": 1,
        "alone": True,
    }
    statements = {"SELECT 1": ("SELECT 1", {}), "one-row claim": (claim, params)}
    times: dict[tuple[str, float], list[float]] = {}
    with db.connect() as conn, db.connect() as submitter:
        db.reset(conn)
        for _ in range(scale.latency_runs):
            for name, (statement, values) in statements.items():
                for pause in (0.0, _PAUSE):
                    _insert(submitter, "bench1")
                    time.sleep(pause)
                    started = time.perf_counter()
                    conn.execute(statement, values).fetchall()
                    times.setdefault((name, pause), []).append(time.perf_counter() - started)
    return {
        name: (
            percentile(times[name, 0.0], 0.5) * 1000,
            percentile(times[name, _PAUSE], 0.5) * 1000,
        )
        for name in statements
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--three", action="store_true", help="(d) end to end, three stages")
    parser.add_argument(
        "--chain", action="store_true", help="(d) with blocking loops in place of the workers"
    )
    parser.add_argument(
        "--idle", action="store_true", help="the round trip to a backend that was idle"
    )
    parser.add_argument(
        "--versus-floor",
        action="store_true",
        help="(d) and its floor, interleaved, and their ratio",
    )
    parser.add_argument(
        "--event-loop",
        choices=EVENT_LOOPS,
        default="uvloop",
        help="the workers' event loop in --versus-floor (CONVEYOR_EVENT_LOOP)",
    )
    parser.add_argument("--runs", type=int, default=Scale().latency_runs)
    parser.add_argument("--tiny", action="store_true", help="a handful of runs, for tests")
    args = parser.parse_args()
    scale = Scale.small() if args.tiny else Scale(latency_runs=args.runs)
    with BenchDatabase.create() as db:
        if args.idle:
            for name, (hot, idle) in idle_round_trip(db, scale).items():
                print(
                    f"{name}: p50 {hot:.3f} ms back to back, {idle:.3f} ms after"
                    f" {_PAUSE * 1000:.0f} ms idle ({COMMAND} --idle)"
                )
            return
        if args.versus_floor:
            blocks = 2 if args.tiny else _FLOOR_BLOCKS
            measured = against_floor(db, scale, blocks, args.event_loop)
            command = f"{COMMAND} --versus-floor"
            if args.event_loop != "uvloop":
                command += f" --event-loop {args.event_loop}"
            workers, floor = measured.workers, measured.floor
            print(
                f"(d) p50 {workers.p50_ms:.2f} ms, p99 {workers.p99_ms:.2f} ms; its floor p50"
                f" {floor.p50_ms:.2f} ms, p99 {floor.p99_ms:.2f} ms; (d) / floor: p50"
                f" {ratio(workers.p50_ms, floor.p50_ms)}, p99 {ratio(workers.p99_ms, floor.p99_ms)}"
                f" (from the commit's acknowledgement; from sending the INSERT: p50"
                f" {ratio(workers.submit_p50_ms, floor.submit_p50_ms)}; {workers.runs} runs each,"
                f" in {blocks} interleaved blocks; {command})"
            )
            print(
                f"CPU per run, the three stage processes together: workers"
                f" {_microseconds(measured.workers_cpu)}, floor {_microseconds(measured.floor_cpu)}"
                f" ({ratio(measured.workers_cpu, measured.floor_cpu)}; {command})"
            )
            return
        if args.three:
            result = end_to_end(db, scale)
            what = "(d) submit -> DONE heard on pipeline_events, three stages"
        elif args.chain:
            result = statement_chain(db, scale)
            what = "(d)'s floor: the same chain, workers replaced by blocking statement loops"
        else:
            result = commit_to_start(db, scale)
            what = "(c) commit -> handler start, idle worker"
    flag = " --three" if args.three else " --chain" if args.chain else ""
    print(
        f"{what}: p50 {result.p50_ms:.2f} ms, p99 {result.p99_ms:.2f} ms"
        f" (from the commit's acknowledgement); from sending the INSERT: p50"
        f" {result.submit_p50_ms:.2f} ms, p99 {result.submit_p99_ms:.2f} ms"
        f" ({result.runs} runs; {COMMAND}{flag})"
    )


if __name__ == "__main__":
    main()
