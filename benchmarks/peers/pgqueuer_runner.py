"""pgqueuer's side of `python -m benchmarks.peers`: a worker, a backlog filler and an enqueuer.

Run by the peers' own virtualenv (build/peers/venv, see install.py), never by conveyor's; it
connects with the libpq environment variables (PGHOST, PGUSER, PGDATABASE, ...).

    python pgqueuer_runner.py fill {single,three} COUNT   queue COUNT jobs of the first entrypoint
    python pgqueuer_runner.py work {single,three,latency} --batch N
    python pgqueuer_runner.py enqueue                     one job per id read on stdin

`work` runs one QueueManager over an asyncpg pool (pgqueuer's advice for throughput), prints
`ready`, answers each `count` line on stdin with `count JOBS FINALS NOW FIRST LAST` (handler calls,
calls of the last stage, the time now, of the first call, of the last final call), in `latency`
mode prints `started ID TIME` as each handler starts, and stops at the end of stdin. `enqueue`
prints `sent ID BEFORE AFTER` around each enqueue (its commit included). Times are time.time().
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
import time

import asyncpg
from pgqueuer import AsyncpgDriver, AsyncpgPoolDriver, Job, Queries, QueueManager

CHUNK = 5000


class Counter:
    def __init__(self) -> None:
        self.jobs = 0
        self.finals = 0
        self.first = 0.0
        self.last = 0.0

    def hit(self, *, final: bool) -> None:
        now = time.time()
        if not self.jobs:
            self.first = now
        self.jobs += 1
        if final:
            self.finals += 1
            self.last = now

    def line(self) -> str:
        return f"count {self.jobs} {self.finals} {time.time()!r} {self.first!r} {self.last!r}"


def say(line: str) -> None:
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


async def fill(mode: str, count: int) -> None:
    entrypoint = "only" if mode == "single" else "a"
    connection = await asyncpg.connect()
    try:
        queries = Queries(AsyncpgDriver(connection))
        for start in range(0, count, CHUNK):
            size = min(CHUNK, count - start)
            await queries.enqueue([entrypoint] * size, [None] * size, [0] * size)
    finally:
        await connection.close()


async def work(mode: str, batch: int) -> None:
    pool = await asyncpg.create_pool(min_size=5, max_size=20)
    queries = Queries(AsyncpgPoolDriver(pool))
    manager = QueueManager(queries)
    counter = Counter()

    if mode == "single":

        @manager.entrypoint("only")
        async def only(job: Job) -> None:
            counter.hit(final=True)

    elif mode == "three":
        # Chained as pgqueuer's users chain jobs: each handler enqueues the next one.
        @manager.entrypoint("a")
        async def first(job: Job) -> None:
            await queries.enqueue("b", None)
            counter.hit(final=False)

        @manager.entrypoint("b")
        async def second(job: Job) -> None:
            await queries.enqueue("c", None)
            counter.hit(final=False)

        @manager.entrypoint("c")
        async def last(job: Job) -> None:
            counter.hit(final=True)

    else:

        @manager.entrypoint("latency")
        async def latency(job: Job) -> None:
            started = time.time()
            say(f"started {(job.payload or b'').decode()} {started!r}")

    running = asyncio.create_task(manager.run(batch_size=batch))
    say("ready")
    reader = asyncio.StreamReader()
    loop = asyncio.get_running_loop()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    while line := await reader.readline():
        if line.strip() == b"count":
            say(counter.line())
    manager.shutdown.set()
    await running
    await pool.close()


async def enqueue() -> None:
    connection = await asyncpg.connect()
    try:
        queries = Queries(AsyncpgDriver(connection))
        say("ready")
        for line in sys.stdin:
            job = line.strip()
            before = time.time()
            await queries.enqueue("latency", job.encode())
            say(f"sent {job} {before!r} {time.time()!r}")
    finally:
        await connection.close()


def main() -> None:
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    filling = commands.add_parser("fill")
    filling.add_argument("mode", choices=("single", "three"))
    filling.add_argument("count", type=int)
    working = commands.add_parser("work")
    working.add_argument("mode", choices=("single", "three", "latency"))
    working.add_argument("--batch", type=int, default=10)
    commands.add_parser("enqueue")
    args = parser.parse_args()
    if args.command == "fill":
        asyncio.run(fill(args.mode, args.count))
    elif args.command == "work":
        asyncio.run(work(args.mode, args.batch))
    else:
        asyncio.run(enqueue())


if __name__ == "__main__":
    main()
