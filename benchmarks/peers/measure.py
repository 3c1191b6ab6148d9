"""The peers' figures, measured as conveyor's are (benchmarks/throughput.py, latency.py).

one stage: a backlog of no-op jobs is queued, the peer's worker process started on it, and the
jobs its handlers ran are counted over `scale.window` seconds of steady state (after the first
job and a warm-up), with the CPU time of the worker and of its database backends meanwhile.

three stages: a backlog of runs is queued at the first task, whose handler queues the second,
whose handler queues the third. Each peer takes its oldest jobs first, so all first stages run
before the last ones: the figure is the runs queued over the time from the first handler call to
the last run's last handler call (the worker's own clock), not a window.

latency: with the worker idle, one job at a time is enqueued by the peer's own client (a second
process), from sending the enqueue (its commit included) to the handler's start, both read from
the same clock; 10 ms apart, as conveyor's.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import psycopg
from psycopg import sql

from benchmarks.harness import ROOT, BenchDatabase, Scale, _cpu_or_zero
from benchmarks.peers.driver import Driver, run_once, running
from benchmarks.peers.systems import Peer
from benchmarks.procstat import children, cpu_seconds

_POLL = 0.02  # seconds between two `count` requests while waiting for a drain
_PAUSE = 0.01  # between two latency jobs, as conveyor's


@dataclass(frozen=True)
class PeerRate:
    per_second: float
    cpu_us: float  # the worker process's CPU time per job (per run: three stages)
    db_cpu_us: float  # its database backends' CPU time per job (per run)


@dataclass(frozen=True)
class Count:
    jobs: int
    finals: int
    now: float
    first: float
    last: float

    @classmethod
    def of(cls, driver: Driver) -> Count:
        jobs, finals, now, first, last = driver.ask("count")
        return cls(int(jobs), int(finals), float(now), float(first), float(last))


class Meter:
    """CPU time used since it was made by a worker process (and its children) and by the client
    backends on the bench database, those of `conn` itself left out. Backends that connect
    meanwhile (a pool growing) count whole; one that leaves before the end is not counted."""

    def __init__(self, conn: psycopg.Connection[Any], pid: int) -> None:
        self.conn = conn
        self.processes = [pid, *children(pid)]
        self.cpu = sum(cpu_seconds(p) for p in self.processes)
        self.backends = {backend: _cpu_or_zero(backend) for backend in self._backends()}

    def read(self) -> tuple[float, float]:
        """Seconds of CPU so far: the worker's, its database backends'."""
        cpu = sum(cpu_seconds(p) for p in self.processes) - self.cpu
        db = sum(_cpu_or_zero(b) - self.backends.get(b, 0.0) for b in self._backends())
        return cpu, max(db, 0.0)

    def _backends(self) -> list[int]:
        rows = self.conn.execute(
            "SELECT pid FROM pg_stat_activity WHERE datname = current_database()"
            " AND backend_type = 'client backend' AND pid <> pg_backend_pid()"
        ).fetchall()
        return [int(row[0]) for row in rows]


def install(peer: Peer, db: BenchDatabase) -> None:
    """The peer's own schema, as its documentation creates it."""
    run_once(list(peer.schema), peer.env(db), ROOT)


def prepare(
    peer: Peer, db: BenchDatabase, conn: psycopg.Connection[Any], fill: tuple[str, int] | None
) -> None:
    """Empty tables, then (when `fill` names a mode and a count) a backlog queued by the peer's
    own client, and the table settled as harness.settle does for conveyor's."""
    conn.execute(sql.SQL("TRUNCATE {}").format(sql.SQL(peer.tables)))
    if fill:
        mode, count = fill
        run_once(peer.command("fill", mode, str(count)), peer.env(db), ROOT)
        conn.execute(sql.SQL("VACUUM ANALYZE {}").format(sql.SQL(peer.settle_table)))
        conn.execute("CHECKPOINT")


class BacklogRanDry(RuntimeError):
    """The peer drained its whole backlog before the window ended: its rate is not measured."""


def single(peer: Peer, db: BenchDatabase, scale: Scale, backlog: int) -> PeerRate:
    with db.connect() as conn:
        prepare(peer, db, conn, ("single", backlog))
        with running(peer.work("single"), peer.env(db), ROOT) as worker:
            worker.expect("ready", timeout=120)
            _first_job(worker)
            time.sleep(scale.warmup)
            before, meter = Count.of(worker), Meter(conn, worker.pid)
            time.sleep(scale.window)
            after, (cpu, db_cpu) = Count.of(worker), meter.read()
            left = conn.execute(peer.queued).fetchone()
    if left and left[0] == 0 and not scale.tiny:
        raise BacklogRanDry(f"{peer.label}: the backlog ran dry inside the window")
    return _rate(after.jobs - before.jobs, after.now - before.now, cpu, db_cpu)


def three(peer: Peer, db: BenchDatabase, runs: int, timeout: float = 600) -> PeerRate:
    with db.connect() as conn:
        prepare(peer, db, conn, ("three", runs))
        with running(peer.work("three"), peer.env(db), ROOT) as worker:
            worker.expect("ready", timeout=120)
            _first_job(worker)
            meter = Meter(conn, worker.pid)
            deadline = time.monotonic() + timeout
            while (count := Count.of(worker)).finals < runs:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"{peer.label}: {count.finals} of {runs} runs done")
                time.sleep(_POLL)
            cpu, db_cpu = meter.read()
    return _rate(runs, count.last - count.first, cpu, db_cpu)


def latency(peer: Peer, db: BenchDatabase, scale: Scale) -> tuple[list[float], list[float]]:
    """(2) for a peer: the seconds from each enqueue's commit to its job's start, and from
    the enqueue sent."""
    env = peer.env(db)
    with db.connect() as conn:
        prepare(peer, db, conn, None)
    with (
        running(peer.work("latency"), env, ROOT) as worker,
        running(peer.command("enqueue"), env, ROOT) as client,
    ):
        worker.expect("ready", timeout=120)
        client.expect("ready", timeout=120)
        time.sleep(0.5)  # the worker's LISTEN in place, and its first dequeue done
        from_commit, from_submit = [], []
        for job in range(scale.latency_runs):
            client.send(str(job))
            sent, before, after = client.expect("sent")
            started, at = worker.expect("started")
            if sent != str(job) or started != str(job):
                raise RuntimeError(f"{peer.label}: job {job} sent as {sent}, started {started}")
            from_commit.append(float(at) - float(after))
            from_submit.append(float(at) - float(before))
            time.sleep(_PAUSE)
    return from_commit, from_submit


def _first_job(worker: Driver, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while Count.of(worker).jobs == 0:
        if time.monotonic() > deadline:
            raise RuntimeError(f"{worker.popen.args!r} ran no job in {timeout:g} s")
        time.sleep(_POLL)


def _rate(jobs: int, seconds: float, cpu: float, db_cpu: float) -> PeerRate:
    if jobs <= 0 or seconds <= 0:
        return PeerRate(0.0, float("nan"), float("nan"))
    return PeerRate(jobs / seconds, cpu / jobs * 1e6, db_cpu / jobs * 1e6)
