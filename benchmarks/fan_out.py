"""Fan-out and join: creating 10,000 children, their throughput, the join, and the parent's row
as a point of contention.

    python -m benchmarks.fan_out [--processes N] [--tiny]

`conveyor run` for benchmarks.pipelines:fan: `split` fans one parent out into `width` no-op
children, the `child` stage (N processes, 3 by default) finishes them, `join` joins them. For
each width (100, 1,000, 10,000; 20 and 50 with --tiny), one after the other:

* plain: `width` runs inserted in one statement straight into the children's status, without a
  parent: the same stage and statements, nothing to count down;
* fan-out: one parent of that width.

Both are timed from the first claim to the last finish (run_events), while pg_stat_activity is
sampled every 10 ms for backends waiting for a lock. Each batch that finishes children counts
them off their parent's row at once, and holds that row locked until it commits; the ratio of
the two rates is what sharing that row costs. (Waits on an `object` lock are commits that queue
NOTIFYs: PostgreSQL takes them one at a time.)

(a) is the widest fan-out:
* creating the children: the parent's run_events row into SPLIT_WAITING and the children's
  created_at are all now(), the start of the one transaction that creates them, so they cannot
  time it. Timed instead from that start to the commit, as a client LISTENing on
  pipeline_events hears it (a worker handed a child at that commit may hear it first: the
  first claim can come a few ms "before" it); and the `fan_out` statement replayed alone at the
  end (no worker running), its execution and its commit timed apart;
* the join: from the last child's finished_at to the join's run_events started_at (its
  handler's start, after it read the children). finished_at is now(): the start of the last
  completing transaction, which may first wait for the parent's row and then take the whole
  batch off it; the parent first seen (polled) out of SPLIT_WAITING marks that commit.

Client, server and workers read the same clock (the embedded server, one host).
"""

from __future__ import annotations

import argparse
import json
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psycopg

from benchmarks import pipelines
from benchmarks.harness import BenchDatabase, events_high_water, running, settle
from benchmarks.report import ratio
from conveyor import queries
from conveyor.batch_arrays import number_array, text_array, uuid_array

COMMAND = "python -m benchmarks.fan_out"
WIDTHS = (100, 1_000, 10_000)
TINY_WIDTHS = (20, 50)
SAMPLE_EVERY = 0.01  # seconds between two looks at pg_stat_activity
NAME = pipelines.fan.name
SPLIT = pipelines.fan.stages[0]


@dataclass
class LockWaits:
    """Samples of the bench database's backends waiting for a lock (wait_event_type 'Lock')."""

    samples: int = 0
    waiting: int = 0  # samples in which at least one backend waited
    backends: int = 0  # waiting backends, summed over the samples
    events: Counter[str] = field(default_factory=Counter)

    def describe(self) -> str:
        if not self.samples:
            return "no sample"
        found = ", ".join(f"{event} x{n}" for event, n in self.events.most_common(2))
        return (
            f"lock waits in {self.waiting / self.samples:.0%} of {self.samples} samples,"
            f" {self.backends / self.samples:.2f} backends waiting on average"
            + (f" ({found})" if found else "")
        )


@contextmanager
def sampling_lock_waits(db: BenchDatabase) -> Iterator[LockWaits]:
    waits = LockWaits()
    stop = threading.Event()

    def sample() -> None:
        with db.connect() as conn:
            while not stop.wait(SAMPLE_EVERY):
                rows = conn.execute(
                    "SELECT wait_event FROM pg_stat_activity"
                    " WHERE datname = current_database() AND wait_event_type = 'Lock'"
                ).fetchall()
                waits.samples += 1
                waits.waiting += bool(rows)
                waits.backends += len(rows)
                waits.events.update(str(event) for (event,) in rows)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        yield waits
    finally:
        stop.set()
        sampler.join()


@dataclass(frozen=True)
class Phase:
    runs: int
    seconds: float  # from the first claim to the last finish
    first_claim: float  # epoch seconds
    commits: int  # the completion transactions that finished them
    largest: int  # runs finished by the largest of them
    lost: int  # attempts that did not end DONE (a lease expired, a release)
    waits: LockWaits

    @property
    def per_second(self) -> float:
        return self.runs / self.seconds if self.seconds else 0.0

    def describe(self) -> str:
        lost = f"; {self.lost:,} attempts lost (lease expired)" if self.lost else ""
        return (
            f"{self.waits.describe()}; {self.commits:,} completion commits, the largest of"
            f" {self.largest:,} runs{lost}"
        )


@dataclass(frozen=True)
class Fan:
    width: int
    children: Phase
    handler_to_begin: float  # the split handler's end -> its completing transaction's start
    begin_to_commit: float  # that transaction (the children's creation) until heard committed
    commit_to_first_claim: float
    last_child_to_join: float  # the last child's finished_at -> the join's started_at
    last_child_to_moved: float  # ... -> the parent first seen out of its waiting status


def wait_for(done: Callable[[], bool], what: str, timeout: float = 600) -> None:
    deadline = time.monotonic() + timeout
    while not done():
        if time.monotonic() > deadline:
            raise RuntimeError(f"{what} did not happen within {timeout:g} s")
        time.sleep(0.02)


def _value(conn: psycopg.Connection[Any], query: str, *params: Any) -> Any:
    row = conn.execute(query, params).fetchone()
    return row[0] if row else None


def _child_events(conn: psycopg.Connection[Any], mark: int, waits: LockWaits) -> Phase:
    """The `child` stage's attempts since run_events id `mark`. The events of one completion
    commit share its worker and its created_at (now(): the transaction's start)."""
    row = conn.execute(
        "SELECT sum(done)::int, extract(epoch FROM min(first))::float8,"
        "       extract(epoch FROM max(created_at) FILTER (WHERE done > 0))::float8,"
        "       count(*) FILTER (WHERE done > 0), max(done), sum(lost)::int"
        "  FROM (SELECT worker, created_at, min(started_at) AS first,"
        "               count(*) FILTER (WHERE to_status = 'DONE') AS done,"
        "               count(*) FILTER (WHERE to_status <> 'DONE') AS lost"
        "          FROM conveyor.run_events WHERE id > %s AND stage = 'child'"
        "         GROUP BY worker, created_at) commits",
        (mark,),
    ).fetchone()
    runs, first, last, commits, largest, lost = row or (0, 0.0, 0.0, 0, 0, 0)
    return Phase(runs, last - first, first, commits, largest, lost, waits)


def _ready(db: BenchDatabase, conn: psycopg.Connection[Any], processes: int) -> int:
    """Settled, every worker idle; the run_events high-water mark to count from."""
    settle(conn)
    db.wait_idle_workers(conn, processes + 2)
    time.sleep(0.2)  # past the grace claim a worker makes right after going idle
    return events_high_water(conn)


def plain(db: BenchDatabase, conn: psycopg.Connection[Any], width: int, processes: int) -> Phase:
    """`width` runs without a parent, inserted in one statement into the children's status."""
    mark = _ready(db, conn, processes)
    count = "SELECT count(*) FROM conveyor.run_events WHERE id > %s AND stage = 'child'"
    with sampling_lock_waits(db) as waits:
        conn.execute(
            "INSERT INTO conveyor.pipeline_runs (pipeline, status, input)"
            " SELECT %s, %s, jsonb_build_object('n', n) FROM generate_series(1, %s) n",
            (NAME, SPLIT.fan_out, width),
        )
        wait_for(lambda: _value(conn, count, mark) >= width, f"{width:,} plain runs done")
    return _child_events(conn, mark, waits)


def fan(db: BenchDatabase, conn: psycopg.Connection[Any], width: int, processes: int) -> Fan:
    """One parent fanned out into `width` children, until its join has run."""
    mark = _ready(db, conn, processes)
    status = "SELECT status FROM conveyor.pipeline_runs WHERE id = %s"
    with sampling_lock_waits(db) as waits:
        with db.connect() as listener:
            listener.execute("LISTEN pipeline_events")
            parent = _value(
                conn,
                "INSERT INTO conveyor.pipeline_runs (pipeline, input) VALUES (%s, %s) RETURNING id",
                NAME,
                json.dumps({"width": width}),
            )
            committed = _heard(listener, str(parent), SPLIT.waiting)
        moved: list[float] = []  # when the parent was first seen out of its waiting status

        def joined() -> bool:
            now = _value(conn, status, parent)
            if now != SPLIT.waiting and not moved:
                moved.append(time.time())
            return now in ("JOINED", "FAILED")

        wait_for(joined, "the join")
    row = conn.execute(
        "SELECT (SELECT extract(epoch FROM created_at)::float8 FROM conveyor.run_events"
        "         WHERE run_id = p.id AND to_status = %s),"
        "       (SELECT extract(epoch FROM started_at + duration)::float8"
        "          FROM conveyor.run_events WHERE run_id = p.id AND to_status = %s),"
        "       (SELECT extract(epoch FROM started_at)::float8 FROM conveyor.run_events"
        "         WHERE run_id = p.id AND stage = 'join'),"
        "       (SELECT extract(epoch FROM max(finished_at))::float8"
        "          FROM conveyor.pipeline_runs WHERE parent_id = p.id),"
        "       (p.outputs -> 'join' ->> 'children')::int"
        "  FROM conveyor.pipeline_runs p WHERE p.id = %s AND p.status = 'JOINED'",
        (SPLIT.waiting, SPLIT.waiting, parent),
    ).fetchone()
    if row is None or row[4] != width:
        raise RuntimeError(f"the join of a fan-out of {width:,} did not see every child: {row}")
    begin, handler_end, join_start, last_child, _ = row
    children = _child_events(conn, mark, waits)
    return Fan(
        width,
        children,
        handler_to_begin=begin - handler_end,
        begin_to_commit=committed - begin,
        commit_to_first_claim=children.first_claim - committed,
        last_child_to_join=join_start - last_child,
        last_child_to_moved=moved[0] - last_child,
    )


def _heard(listener: psycopg.Connection[Any], run_id: str, status: str) -> float:
    """When the observer channel said that run `run_id` reached `status` (time.time())."""
    for notify in listener.notifies(timeout=600):
        event = json.loads(notify.payload)
        if event["id"] == run_id and event["status"] == status:
            return time.time()
    raise RuntimeError(f"run {run_id} was not heard in {status}")


def replay(db: BenchDatabase, width: int) -> tuple[float, float]:
    """The `fan_out` statement alone, with the arrays a worker sends for one parent of `width`
    children (as protocol.Protocol._fan_out builds them): seconds to execute it, then to
    commit. Its children belong to a pipeline no worker serves."""
    name = f"{NAME}_replay"
    with db.connect() as autocommit:
        settle(autocommit)
    with psycopg.connect(db.url) as conn:  # a transaction: the statement and its commit apart
        parent = _value(
            conn,
            "INSERT INTO conveyor.pipeline_runs (pipeline, status) VALUES (%s, %s) RETURNING id",
            name,
            SPLIT.waiting,
        )
        conn.commit()
        params = {
            "waiting": SPLIT.waiting,
            "produces": SPLIT.produces,
            "fail_fast": True,
            "parents": uuid_array([parent]),
            "widths": number_array([width]),
            "child_parents": uuid_array([parent] * width),
            "child_indexes": number_array(list(range(width))),
            "child_pipelines": text_array([name] * width),
            "child_statuses": text_array([SPLIT.fan_out or ""] * width),
            "child_inputs": text_array([json.dumps({"n": n}) for n in range(width)]),
        }
        started = time.perf_counter()
        conn.execute(queries.load("conveyor")["fan_out"], params)
        executed = time.perf_counter()
        conn.commit()
        return executed - started, time.perf_counter() - executed


def _load() -> str:
    return Path("/proc/loadavg").read_text().split()[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--processes", type=int, default=3, help="of the child stage")
    parser.add_argument("--tiny", action="store_true", help="widths 20 and 50, for tests")
    args = parser.parse_args()
    widths, processes = (TINY_WIDTHS if args.tiny else WIDTHS), args.processes
    load_before = _load()
    with BenchDatabase.create() as db:
        with db.connect() as conn:
            db.reset(conn)
            stages = f"split=1,child={processes},join=1"
            with running(db, ["run"], pipeline="fan", CONVEYOR_STAGES=stages):
                db.wait_idle_workers(conn, processes + 2)
                results = [
                    (plain(db, conn, w, processes), fan(db, conn, w, processes)) for w in widths
                ]
        statement, commit = replay(db, widths[-1])
    a = results[-1][1]
    ms = 1000
    print(f"(a) fan-out of {a.width:,} no-op children, {processes} child processes ({COMMAND}):")
    print(
        f"  creating them: {a.begin_to_commit * ms:.0f} ms from the start of the parent's"
        f" completing transaction to its commit heard on pipeline_events (split handler's end"
        f" -> that start {a.handler_to_begin * ms:.1f} ms); the fan_out statement replayed"
        f" alone: {statement * ms:.0f} ms + commit {commit * ms:.1f} ms"
    )
    print(
        f"  children: {a.children.per_second:,.0f} runs/s ({a.children.runs:,} in"
        f" {a.children.seconds:.2f} s, first claim -> last finish); the first claimed"
        f" {a.commit_to_first_claim * ms:+.1f} ms from the commit heard"
    )
    print(
        f"  join: started {a.last_child_to_join * ms:.1f} ms after the last child finished"
        f" (finished_at: the start of its completing transaction; the parent was seen out of"
        f" {SPLIT.waiting} {a.last_child_to_moved * ms:.0f} ms after it, polled every 20 ms)"
    )
    print(f"  the children's completions: {a.children.describe()}")
    print(
        f"(b) the parent's row: children vs as many plain runs (no parent), {processes} child"
        f" processes, first claim -> last finish; pg_stat_activity every {SAMPLE_EVERY * ms:.0f} ms"
    )
    for flat, fanned in results:
        rate = fanned.children.per_second
        print(
            f"  width {fanned.width:,}: children {rate:,.0f} runs/s, plain"
            f" {flat.per_second:,.0f} runs/s, ratio {ratio(rate, flat.per_second)}"
        )
        print(f"    children: {fanned.children.describe()}")
        print(f"    plain: {flat.describe()}")
    print(f"Load average {load_before} before, {_load()} after (2 cores, shared).")


if __name__ == "__main__":
    main()
