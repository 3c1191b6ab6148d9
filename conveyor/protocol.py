"""The claim/complete protocol as calls over a connection pool; the SQL is in sql/queries.sql.

Every call is one short transaction. Nothing here holds a transaction open while a handler runs.
"""

from __future__ import annotations

import socket
from collections.abc import Iterable
from contextlib import nullcontext
from typing import Any
from uuid import UUID

import psycopg
from psycopg import AsyncConnection, AsyncCursor
from psycopg.types.json import set_json_loads
from psycopg_pool import AsyncConnectionPool

from conveyor import queries
from conveyor.batch_arrays import (
    NOT_ROUTED,
    bool_array,
    microseconds_array,
    number_array,
    routing_arrays,
    text_array,
    usage_arrays,
    uuid_array,
)
from conveyor.fan_out import Child
from conveyor.flow_control import FlowControl, Room
from conveyor.handler_run import Write
from conveyor.pipeline import Pipeline, Stage
from conveyor.results import Applied, Failure, Success
from conveyor.server_json import ClaimedRow, json_from_server
from conveyor.spawning import store_fan_outs


class StageProtocol:
    """One worker's side of the protocol for one stage."""

    def __init__(
        self,
        pool: AsyncConnectionPool[Any],
        *,
        schema: str,
        pipeline: Pipeline,
        stage: Stage,
        worker_id: str,
        lease_seconds: float,
        hold_connections: bool = False,
        flow: FlowControl | None = None,
    ) -> None:
        self.pool = pool
        # Flow control: claims ask the stage's limits first (conveyor/flow_control.py), and
        # `throttled` says what held the last claim back, if anything did.
        self.flow = flow
        self.throttled: Room | None = None
        # With hold_connections, claims and completions each keep one pool connection between
        # calls (the pool needs two more than its other users): no checkout per statement, and
        # always the same backend, which answers faster than one idle for longer.
        self._claiming: _Held | AsyncConnectionPool[Any] = _Held(pool) if hold_connections else pool
        self._completing: _Held | AsyncConnectionPool[Any] = (
            _Held(pool) if hold_connections else pool
        )
        self._completion_cursor: AsyncCursor[Any] | None = None
        self.sql = queries.load(schema)
        self.stage = stage
        self.worker_id = worker_id
        self.lease_seconds = lease_seconds
        self._fence = {
            "pipeline": pipeline.name,
            "stage": stage.name,
            "consumes": stage.consumes,
            "working": stage.working,
            "produces": stage.produces,
            "worker": worker_id,
        }
        self._terminal = pipeline.is_terminal(stage.produces)
        # Routing: where each status the stage may send a run to leads (conveyor/routes.py).
        # A stage without routes or loops sends empty arrays, and every run to `produces`.
        self._destinations = pipeline.destinations(stage)
        self._counts_visits = stage.name in pipeline.loop_stages
        self._routed = (
            self._counts_visits
            or bool(stage.routes)
            or stage.fan_out is not None
            or any(d.loop_stage for d in self._destinations.values())
        )
        # A pipeline that fans out has children: a batch that ends runs locks their parents
        # first, in one order.
        self._may_end_children = pipeline.fans_out
        self._fans_out = stage.fan_out is not None
        self._fan_out_params = {
            "waiting": stage.waiting,
            "produces": stage.produces,
            "fail_fast": stage.on_child_failure == "fail",
        }

    def claim_size(self, free: int) -> int:
        """How many runs to claim with `free` slots: a full batch, or fewer rounded down
        to a few sizes (multiples of an eighth of the batch, powers of two below that), each a
        statement of its own with its plan kept: a handful of statements per stage, not one
        per number of free slots."""
        batch = min(self.stage.batch, self.stage.concurrency)  # no more than it can hold
        if free >= batch:
            return batch
        step = max(1, batch // 8)
        if free >= step:
            return free // step * step
        return 1 << (max(free, 1).bit_length() - 1)

    async def claim(self, batch: int, *, alone: bool = False) -> list[ClaimedRow]:
        """Lease up to `batch` runs (see claim_size). A worker with nothing in flight says
        `alone`: it may then get a rescued run, and gets it alone."""
        if self.flow is not None:
            return await self._claim_under_limits(self.flow, batch, alone)
        async with self._claiming.connection() as conn:
            return await self._claim_on(conn, batch, alone)

    async def _claim_on(
        self, conn: AsyncConnection[Any], batch: int, alone: bool
    ) -> list[ClaimedRow]:
        statement = queries.sized(self.sql["claim_batch"], batch)
        params = {**self._fence, "lease_seconds": self.lease_seconds, "alone": alone}
        cur = conn.cursor()
        set_json_loads(json_from_server, cur)  # input and outputs of every claimed run
        await cur.execute(statement, params)
        rows: list[Any] = await cur.fetchall()
        return rows

    async def _claim_under_limits(
        self, flow: FlowControl, batch: int, alone: bool
    ) -> list[ClaimedRow]:
        """The claim within the limits' room and the groups' shares (FlowControl.claim)."""
        params = {**self._fence, "lease_seconds": self.lease_seconds, "alone": alone}
        async with self._claiming.connection() as conn:
            rows, self.throttled = await flow.claim(conn, batch, params)
        return rows

    async def rescued_waiting(self) -> bool:
        async with self._claiming.connection() as conn:
            cur = await conn.execute(self.sql["rescued_waiting"], self._fence)
            row = await cur.fetchone()
            return bool(row and row[0])

    async def apply(self, successes: list[Success], failures: list[Failure]) -> Applied:
        """Commit a batch of finished attempts in one transaction, fenced by the lease and the
        attempt, with the writes their handlers handed over (Run.write) for exactly the runs
        whose output is stored. A write PostgreSQL refuses rolls the whole batch back (raised:
        the worker then applies the results one by one to find it)."""
        completed = retried = failed = 0
        writing = any([s.writes for s in successes])
        # A stage that fans out records every stored run's fan-out, none included (_fan_out).
        spawning = self._fans_out and bool(successes)
        # One commit for every statement: it waits for its flush when any run ends here.
        routing = self._routing(successes)
        durable = (bool(successes) and (self._terminal or routing["durable"])) or (
            bool(failures) and any(f.retry_in is None for f in failures)
        )
        # The first statement locks the parents of the batch's runs that may end children
        # (complete_if_leased's `parents`), in id order.
        lock_ids = "{}"
        if self._may_end_children and durable:
            lock_ids = uuid_array([s.run_id for s in successes] + [f.run_id for f in failures])
        # A lone statement is a transaction already: BEGIN and COMMIT would be two more round
        # trips per batch. Successes and failures together, or with writes or children, commit
        # together.
        several = bool(successes and failures) or writing or spawning
        async with (
            self._completing.connection() as conn,
            conn.transaction() if several else nullcontext(),
        ):
            if successes:
                cur = await self._cursor(conn).execute(
                    self.sql["complete_if_leased"],
                    {
                        **self._fence,
                        "terminal": self._terminal,
                        "durable": durable,
                        "ids": uuid_array([s.run_id for s in successes]),
                        "outputs": text_array([s.output_json for s in successes]),
                        "attempts": number_array([s.attempt for s in successes]),
                        "started_us": microseconds_array([s.started_epoch for s in successes]),
                        "durations_us": microseconds_array([s.duration for s in successes]),
                        **usage_arrays([s.usage for s in successes]),
                        **routing["arrays"],
                        "lock_ids": lock_ids,
                    },
                )
                completed = cur.rowcount  # one run_events row per applied run
                if routing["durable"]:  # a route may have ended runs, a loop past its bound FAILED
                    ended = await cur.fetchall()
                    failed = sum(1 for _run_id, to_status in ended if to_status == "FAILED")
                    completed -= failed
                    stored = {row[0] for row in ended}
                elif writing or spawning:
                    stored = {row[0] for row in await cur.fetchall()}
                if writing:
                    await execute_writes(
                        conn, (w for s in successes if s.run_id in stored for w in s.writes)
                    )
                if spawning:
                    await self._fan_out(conn, [s for s in successes if s.run_id in stored])
            if failures:
                cur = await self._cursor(conn).execute(
                    self.sql["fail_if_leased"],
                    {
                        **self._fence,
                        "durable": durable,
                        "ids": uuid_array([f.run_id for f in failures]),
                        "errors": text_array([f.error for f in failures]),
                        "attempts": number_array([f.attempt for f in failures]),
                        "retry_in": number_array([f.retry_in for f in failures]),
                        "started_us": microseconds_array([f.started_epoch for f in failures]),
                        "durations_us": microseconds_array([f.duration for f in failures]),
                        **usage_arrays([f.usage for f in failures]),
                        "lock_ids": "{}" if successes else lock_ids,
                        "uncounted": (
                            bool_array([not f.counted for f in failures])
                            if not all([f.counted for f in failures])
                            else "{}"
                        ),
                    },
                )
                for _run_id, to_status in await cur.fetchall():
                    if to_status == "FAILED":
                        failed += 1
                    else:
                        retried += 1
        refused = len(successes) + len(failures) - completed - retried - failed
        if self.flow is not None and refused < len(successes) + len(failures):
            self.flow.places_freed()  # wake whoever waits for a place under a cap
        return Applied(completed, retried, failed, refused)

    def _cursor(self, conn: AsyncConnection[Any]) -> AsyncCursor[Any]:
        """The completions' cursor, kept while its connection is: it knows the dumpers of the
        statements' parameters already, a step less on a result's way to the database."""
        cur = self._completion_cursor
        if cur is None or cur.connection is not conn:
            cur = self._completion_cursor = conn.cursor()
        return cur

    async def _fan_out(self, conn: AsyncConnection[Any], stored: list[Success]) -> None:
        """Record the fan-outs of stored runs (conveyor/spawning.py)."""
        await store_fan_outs(
            conn, self.sql["fan_out"], self._fan_out_params, [(s.run_id, s.spawn) for s in stored]
        )

    async def children(self, run_id: UUID) -> tuple[Child, ...]:
        """The children of a run's current fan-out, in order, for the stage that joins them."""
        async with self.pool.connection() as conn:
            cur = conn.cursor()
            set_json_loads(json_from_server, cur)
            await cur.execute(self.sql["children_of"], {"id": run_id})
            return tuple(Child(*row) for row in await cur.fetchall())

    def _routing(self, successes: list[Success]) -> dict[str, Any]:
        """complete_if_leased's routing arrays for a batch, and whether any of its runs may end
        (a route to a terminal status, a loop that may end): that commit waits for its flush."""
        if not self._routed:
            return {"durable": False, "arrays": NOT_ROUTED}
        found = [self._destinations[s.target or self.stage.produces] for s in successes]
        return {
            "durable": any(d.ends or d.loop_stage for d in found),
            "arrays": routing_arrays(
                found, stage=self.stage.name, counts_visits=self._counts_visits
            ),
        }

    async def release(self, run_ids: list[UUID], *, reason: str = "worker shutting down") -> int:
        """Give leased runs back (fenced), due at once; `reason` is kept on their event."""
        async with self.pool.connection() as conn:
            cur = await conn.execute(
                self.sql["release_if_leased"], {**self._fence, "ids": run_ids, "reason": reason}
            )
            return len(await cur.fetchall())

    async def leased_to_me(self) -> dict[UUID, tuple[int, float]]:
        """The runs the database has leased to this worker, each with the attempt and the
        lease expiry (seconds since the epoch) a hand-off of that lease carries."""
        async with self.pool.connection() as conn:
            cur = await conn.execute(self.sql["leased_to_worker"], self._fence)
            return {
                run_id: (attempt, float(expires))
                for run_id, attempt, expires in await cur.fetchall()
            }

    async def extend_leases(self, run_ids: list[UUID]) -> set[UUID]:
        """Extend the leases of in-flight runs; return the ids still held."""
        async with self.pool.connection() as conn:
            cur = await conn.execute(
                self.sql["extend_leases"],
                {**self._fence, "ids": run_ids, "lease_seconds": self.lease_seconds},
            )
            return {row[0] for row in await cur.fetchall()}

    async def beat(
        self,
        *,
        channel: str,
        waiting: bool,
        ttl_seconds: float,
        free_slots: int,
        secret: bytes | None = None,
    ) -> None:
        """Register or refresh this worker; `secret` (written with the row only) is the key
        its hand-offs are signed with."""
        async with self.pool.connection() as conn:
            await conn.execute(
                self.sql["beat_worker"],
                {
                    **self._fence,
                    "channel": channel,
                    "hostname": socket.gethostname(),
                    "pid": _pid(),
                    "ttl_seconds": ttl_seconds,
                    "waiting": waiting,
                    # what a hand-off gives this worker (migration 007)
                    "lease_seconds": self.lease_seconds,
                    "free_slots": free_slots,
                    "secret": secret,
                },
            )

    async def end_dead_process_leases(self, dead_pid: int) -> int:
        """End the leases of this host's worker process `dead_pid` of this stage, which died;
        how many there were."""
        async with self.pool.connection() as conn:
            cur = await conn.execute(
                self.sql["end_dead_process_leases"],
                {**self._fence, "hostname": socket.gethostname(), "dead_pid": dead_pid},
            )
            return len(await cur.fetchall())

    async def forget(self) -> None:
        async with self.pool.connection() as conn:
            await conn.execute(self.sql["forget_worker"], {"worker": self.worker_id})

    async def close(self) -> None:
        """Give held connections back to the pool (before it closes)."""
        for held in (self._claiming, self._completing):
            if isinstance(held, _Held):
                await held.release()


async def execute_writes(conn: AsyncConnection[Any], writes: Iterable[Write]) -> None:
    """Execute handed-over writes in order, in the caller's transaction. Pipelined: one round
    trip for the lot, while the runs' rows stay locked. The first error is raised."""
    try:
        async with conn.pipeline():
            for query, params in writes:
                await conn.execute(query, params)
    except psycopg.Error as exc:
        primary = exc.diag.message_primary
        if primary is None:  # not from the server (a client-side check, a lost connection)
            raise
        # Raised with the same class, so the worker tells a refusal from a lost connection as
        # before. The run keeps the error's last line, where PostgreSQL puts its detail (which
        # may quote the row): that line should say what failed.
        raise type(exc)(f"a write handed over with Run.write failed: {primary}") from exc
    except Exception as exc:  # psycopg refused the params before sending (their shape, a dumper)
        raise psycopg.ProgrammingError(f"a write handed over with Run.write failed: {exc}") from exc


class _Held:
    """A pool connection that one caller keeps between its calls: `async with
    held.connection() as conn` as with the pool, without a context manager made per call."""

    def __init__(self, pool: AsyncConnectionPool[Any]) -> None:
        self._pool = pool
        self._conn: AsyncConnection[Any] | None = None

    def connection(self) -> _Held:
        return self

    async def __aenter__(self) -> AsyncConnection[Any]:
        if self._conn is None:
            self._conn = await self._pool.getconn()
        return self._conn

    async def __aexit__(self, exc_type: type[BaseException] | None, *_: object) -> None:
        if exc_type is not None:
            await self.release()  # the pool replaces it if it is broken

    async def release(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            await self._pool.putconn(conn)


def _pid() -> int:
    import os

    return os.getpid()
