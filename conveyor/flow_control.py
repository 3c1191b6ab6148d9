"""Flow control kept in PostgreSQL, for every worker of every pod at once (sql/012).

A stage's limits (conveyor/limits.py) live in the `limits` table: its workers write what they
declare when they start, and each claim asks `limit_room` how many runs the keys allow, with
each key's lock held until the claim commits; a claim then takes one request per run. A run holds
a place under a capped key while its lease runs: a worker that dies gives its places back when
its leases expire. Handlers take tokens (and requests of keys their stage does not declare)
with Run.acquire, and close a key for everyone with Run.close_limit.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import math
import random
import time
from dataclasses import dataclass
from typing import Any

import psycopg
import structlog
from psycopg import AsyncConnection, sql
from psycopg.types.json import set_json_loads
from psycopg_pool import AsyncConnectionPool

from conveyor import metrics, queries
from conveyor.batch_arrays import text_array
from conveyor.db import brief
from conveyor.limits import (
    MAX_IN_FLIGHT,
    BudgetExceeded,
    Limit,
    Reservation,
    Throttled,
    check_key,
    env_name,
    stage_key,
)
from conveyor.pipeline import Pipeline, Stage
from conveyor.server_json import ClaimedRow, json_from_server
from conveyor.settings import Settings
from conveyor.urls import redact

log = structlog.get_logger("conveyor.flow_control")

# Workers waiting for a place under a cap are woken at most this often by one worker: they
# start within this of capacity coming back.
FREED_NOTICE_SECONDS = 0.05
# A handler's acquire waits this long for a bucket to fill; a longer wait sends its run back
# in line instead (Throttled), where it holds no slot of its worker.
ACQUIRE_PATIENCE_SECONDS = 2.0


@dataclass(frozen=True, slots=True)
class Room:
    """What the limits allow a claim: `runs`, or none until `until` (a Unix time; None: until
    a place is given back) because of `key`."""

    runs: int
    until: float | None = None
    key: str | None = None


def _from_now(seconds: float | None) -> float | None:
    """A Unix time on this worker's clock, from the server's "in so many seconds"."""
    return None if seconds is None else time.time() + seconds


def stage_limits(pipeline: Pipeline, stage: Stage, settings: Settings) -> tuple[Limit, ...]:
    """The limits a stage's runs go under: those it declares and its own cap
    (Stage.max_in_flight), each with the environment's CONVEYOR_LIMIT_<NAME>_* applied."""
    declared = list(stage.limits)
    if stage.max_in_flight is not None:
        declared.append(
            Limit(stage_key(pipeline.name, stage.name), max_in_flight=stage.max_in_flight)
        )
    return tuple(_overridden(limit, settings) for limit in declared)


def _overridden(limit: Limit, settings: Settings) -> Limit:
    found = settings.limit_overrides.get(env_name(limit.key))
    if not found:
        return limit
    changes: dict[str, Any] = dict(found)
    if changes.get("max_in_flight") is not None:
        changes["max_in_flight"] = int(changes["max_in_flight"])
    return dataclasses.replace(limit, **changes)


class FlowControl:
    """One worker's side of flow control for its stage."""

    def __init__(
        self,
        pool: AsyncConnectionPool[Any],
        *,
        settings: Settings,
        pipeline: Pipeline,
        stage: Stage,
        channel: str,
    ) -> None:
        self._pool = pool
        self._sql = queries.load(settings.schema)
        self._settings = settings
        limits = stage_limits(pipeline, stage, settings)
        self._pipeline = pipeline
        self._stage = stage
        self.limits = limits
        self.keys = [limit.key for limit in limits]
        self._keys_array = text_array(self.keys)  # written once: every claim sends it
        self._channel = channel
        self._labels = (pipeline.name, stage.name)
        self._requests_used = [
            metrics.LIMIT_USED.labels(*self._labels, key, "requests") for key in self.keys
        ]
        self._group_by = stage.group_by
        self._next_freed_notice = 0.0  # monotonic
        # The notice of freed places waiting for its time, or being sent; and whether places
        # were freed since it was scheduled.
        self._freed_notice: asyncio.TimerHandle | asyncio.Task[None] | None = None
        self._freed_since = False
        self.declared = False  # set once the first claim's transaction commits
        self._written: set[str] = set(self.keys)  # keys whose declaration this process wrote

    async def declare_on(self, conn: AsyncConnection[Any]) -> None:
        """Write the stage's limits and which keys it runs under, in the transaction of the
        worker's first claim: no claim of its runs is made before its limits are in place.
        Keys it no longer declares are forgotten for it."""
        stage = {"pipeline": self._pipeline.name, "stage": self._stage.name, "keys": self.keys}
        await conn.execute(self._sql["lock_limit_keys"], stage)
        await conn.execute(self._sql["forget_limit_stages"], stage)
        for limit in self.limits:
            await conn.execute(self._sql["declare_limit"], dataclasses.asdict(limit))
            await conn.execute(
                self._sql["declare_limit_stage"],
                {
                    "key": limit.key,
                    "pipeline": self._pipeline.name,
                    "stage": self._stage.name,
                    "working": self._stage.working,
                    "channel": self._channel,
                },
            )

    # -- claims ------------------------------------------------------------------------------

    @property
    def governs_claims(self) -> bool:
        """Whether the stage's claims go through here: it has limits, or shares itself
        between groups."""
        return bool(self.keys) or self._group_by is not None

    async def claim(
        self, conn: AsyncConnection[Any], batch: int, params: dict[str, Any]
    ) -> tuple[list[ClaimedRow], Room | None]:
        """Up to `batch` runs that the limits allow, and what held the claim back if nothing
        may start. Under limits alone, one statement (claim_limited: claim_batch within
        limit_room's room); with groups, claim_fair in a transaction with the room. The keys' locks
        are held from the count to the commit, so claims under a key follow one another; so
        do the claims of a stage with groups."""
        if not self.declared:
            async with conn.transaction():
                await self.declare_on(conn)
            self.declared = True
        if self._group_by is None:
            return await self._claim_limited(conn, batch, params)
        async with conn.transaction():
            room = await self.room(conn, batch) if self.keys else Room(batch)
            if room.runs < 1:
                return [], room
            rows = await self._claim_fair(conn, room.runs, params)
            await self.took(conn, len(rows))
        return rows, room if room.until is not None else None

    async def _claim_limited(
        self, conn: AsyncConnection[Any], batch: int, params: dict[str, Any]
    ) -> tuple[list[ClaimedRow], Room | None]:
        statement = queries.sized(self._sql["claim_limited"], batch)
        cur = conn.cursor()
        set_json_loads(json_from_server, cur)
        await cur.execute(statement, {**params, "keys": self._keys_array})
        found: list[Any] = await cur.fetchall()
        rows: list[ClaimedRow] = [row[:6] for row in found if row[0] is not None]
        # a last row with a NULL id: nothing may start, or a rate bounded what did
        note = next((row for row in found if row[0] is None), None)
        room = None if note is None else Room(0, _from_now(note[6]), note[7])
        if rows:
            for used in self._requests_used:
                used.inc(len(rows))
        elif room is not None:
            metrics.THROTTLED.labels(*self._labels, room.key or "", "claim").inc()
        return rows, room

    async def _claim_fair(
        self, conn: AsyncConnection[Any], batch: int, params: dict[str, Any]
    ) -> list[ClaimedRow]:
        lock = f"conveyor.fair.{self._pipeline.name}.{self._stage.name}"
        await conn.execute(self._sql["lock_fair_claims"], {"lock": lock})
        cur = conn.cursor()
        set_json_loads(json_from_server, cur)
        await cur.execute(
            self._sql["claim_fair"],
            {
                **params,
                "batch": batch,
                "group_field": self._group_by,
                "per_group": self._stage.max_in_flight_per_group or MAX_IN_FLIGHT,
            },
        )
        rows: list[ClaimedRow] = await cur.fetchall()
        return rows

    async def room(self, conn: AsyncConnection[Any], wanted: int) -> Room:
        """In the claim's transaction: how many runs it may take (the keys' locks held)."""
        cur = await conn.execute(self._sql["limit_room"], {"keys": self.keys, "wanted": wanted})
        row = await cur.fetchone()
        if row is None:
            return Room(wanted)
        runs, seconds, key = row
        if runs < 1:
            metrics.THROTTLED.labels(*self._labels, key or "", "claim").inc()
        return Room(max(int(runs), 0), _from_now(seconds), key)

    async def took(self, conn: AsyncConnection[Any], runs: int) -> None:
        """In the claim's transaction, after it: one request per run claimed."""
        if runs and self.keys:
            await conn.execute(
                self._sql["limit_take"], {"keys": self._keys_array, "requests": runs}
            )
            for used in self._requests_used:
                used.inc(runs)

    def places_freed(self) -> None:
        """Runs under capped keys finished: wake every stage that shares those keys, at most
        every FREED_NOTICE_SECONDS (a worker moving thousands of runs a second would otherwise
        notify for every batch); one that comes sooner is sent when that time is up. Sent from
        a task of its own: the completer goes on with its next batch meanwhile."""
        if not self.keys and self._group_by is None:
            return
        if self._freed_notice is not None:
            self._freed_since = True  # announced by the notice under way, or by the next one
            return
        self._schedule_freed_notice()

    def _schedule_freed_notice(self) -> None:
        wait = max(self._next_freed_notice - time.monotonic(), 0.0)
        self._freed_notice = asyncio.get_running_loop().call_later(wait, self._send_freed_notice)

    def _send_freed_notice(self) -> None:
        self._next_freed_notice = time.monotonic() + FREED_NOTICE_SECONDS
        self._freed_since = False
        task = asyncio.ensure_future(self._notify_freed())
        self._freed_notice = task
        task.add_done_callback(self._freed_notice_sent)

    def _freed_notice_sent(self, task: asyncio.Task[None]) -> None:
        self._freed_notice = None
        if not task.cancelled() and (error := task.exception()) is not None:
            log.error("announcing freed places failed", error=brief(error))
        if self._freed_since:
            # Places freed while it was sent may have come after its NOTIFY: one more, in its
            # time.
            self._schedule_freed_notice()

    async def finish_freed_notices(self) -> None:
        """At exit, before the pool closes: a notice waiting for its time goes now, and the
        one under way is waited for, so that no place this worker gave back waits for a
        sweep."""
        while (notice := self._freed_notice) is not None:
            if isinstance(notice, asyncio.TimerHandle):
                notice.cancel()
                self._send_freed_notice()
            else:
                await asyncio.wait({notice})  # its done callback has run when this returns

    async def _notify_freed(self) -> None:
        if self._pool.closed:  # the worker has stopped; the others' sweep finds the places
            return
        try:
            async with self._pool.connection() as conn:
                await conn.execute(
                    self._sql["limit_places_freed"],
                    {
                        "keys": self.keys,
                        "own_channel": self._channel,
                        "grouped": self._group_by is not None,
                    },
                )
        except psycopg.Error as exc:  # the waiting workers' sweep finds the places
            log.warning("could not announce freed places", error=brief(exc))

    # -- handlers ----------------------------------------------------------------------------

    async def acquire(
        self, key: str, *, tokens: int = 0, requests: int | None = None
    ) -> Reservation:
        """Take `tokens` (and `requests`: by default one, or none for a key the stage declares,
        whose claim took it) from `key`, waiting up to ACQUIRE_PATIENCE_SECONDS for them;
        longer, the run goes back in line (Throttled)."""
        check_key(key)
        if key not in self._written:
            await self._declare_from_environment(key)
        if requests is None:
            requests = 0 if key in self.keys else 1
        if not (isinstance(tokens, int) and tokens >= 0 and isinstance(requests, int)):
            raise ValueError("Run.acquire: tokens and requests must be integers >= 0")
        if requests < 0:
            raise ValueError("Run.acquire: tokens and requests must be integers >= 0")
        deadline = time.monotonic() + ACQUIRE_PATIENCE_SECONDS
        while True:
            async with self._pool.connection() as conn:
                cur = await conn.execute(
                    self._sql["limit_acquire"], {"key": key, "requests": requests, "tokens": tokens}
                )
                row = await cur.fetchone()
            wait = row[0] if row else None  # seconds until it may be tried again
            if wait is None:
                if requests:
                    metrics.LIMIT_USED.labels(*self._labels, key, "requests").inc(requests)
                return Reservation(key, tokens, self)
            until = time.time() + wait
            if time.monotonic() + wait > deadline:
                metrics.THROTTLED.labels(*self._labels, key, "run").inc()
                raise Throttled(key, until, "its limit is spent")
            pause = max(wait, 0.0) + random.uniform(0.0, 0.02)
            metrics.THROTTLED_SECONDS.labels(*self._labels, key).inc(pause)
            await asyncio.sleep(pause)

    async def _declare_from_environment(self, key: str) -> None:
        """A key the stage does not declare, taken by a handler: the environment's
        CONVEYOR_LIMIT_<NAME>_* for it, if any, written once."""
        found = self._settings.limit_overrides.get(env_name(key))
        if found:  # only what the environment sets: other stages may declare the rest
            async with self._pool.connection() as conn, conn.transaction():
                await conn.execute(self._sql["limit_acquire_row"], {"key": key})
                for field_name, value in found.items():
                    if field_name == "max_in_flight" and value is not None:
                        value = int(value)
                    await conn.execute(
                        sql.SQL("UPDATE {}.limits SET {} = %s WHERE key = %s").format(
                            sql.Identifier(self._settings.schema), sql.Identifier(field_name)
                        ),
                        (value, key),
                    )
        self._written.add(key)

    async def settle(self, key: str, reserved: int, used: int, *, answered: bool = True) -> None:
        """A call took `used` tokens where `reserved` were taken for it: the difference is
        taken or given back; a key that `answered` starts its shared backoff over."""
        async with self._pool.connection() as conn:
            await conn.execute(
                self._sql["limit_settle"],
                {"key": key, "tokens": used - reserved, "answered": answered},
            )
        if used:
            metrics.LIMIT_USED.labels(*self._labels, key, "tokens").inc(used)

    async def check_budget(
        self, run_id: Any, run_input: dict[str, Any], tokens: int, recorded: int
    ) -> None:
        """Raise BudgetExceeded when a call of `tokens` would take the run past its input's
        `token_budget`, or its group past the stage's group_tokens_per_day; `recorded` is what
        the attempt recorded so far (not in run_events yet). A run without the group field
        has no group budget."""
        budget = run_input.get("token_budget")
        if budget is not None and (
            not isinstance(budget, int) or isinstance(budget, bool) or budget < 0
        ):
            raise BudgetExceeded(f"token_budget must be a whole number >= 0, not {budget!r}")
        per_day = self._stage.group_tokens_per_day
        group = run_input.get(self._group_by) if self._group_by else None
        if budget is None and (per_day is None or group is None):
            return
        checks: list[tuple[str, dict[str, Any], int, str]] = []
        if budget is not None:
            checks.append(
                ("run_tokens_spent", {"id": run_id}, budget, f"run token budget {budget:,}")
            )
        if per_day is not None and group is not None:
            params = {
                "pipeline": self._pipeline.name,
                "group_field": self._group_by,
                "group": json.dumps(group),
            }
            named = f"daily token budget of {self._group_by} {str(group)[:100]!r}, {per_day:,}"
            checks.append(("group_tokens_spent_today", params, per_day, named))
        async with self._pool.connection() as conn:
            for statement, params, allowed, named in checks:
                cur = await conn.execute(self._sql[statement], params)
                row = await cur.fetchone()
                spent = (row[0] if row else 0) + recorded
                if spent + tokens > allowed:
                    today = " today (UTC)" if statement == "group_tokens_spent_today" else ""
                    raise BudgetExceeded(
                        f"{named}: {spent:,} spent{today}, and this call needs about {tokens:,}"
                    )

    async def close(self, key: str, *, retry_after: float | None, reason: str) -> Throttled:
        """Close `key` for every worker: for `retry_after` seconds, or (None) the shared
        backoff. Returns the Throttled for the handler to raise."""
        check_key(key)
        seconds = None
        if retry_after is not None and math.isfinite(float(retry_after)):
            seconds = min(max(float(retry_after), 0.0), 86400.0)
        reason = redact(str(reason)).replace("\x00", "\\x00")[:500]
        async with self._pool.connection() as conn:
            cur = await conn.execute(
                self._sql["limit_close"], {"key": key, "retry_after": seconds, "reason": reason}
            )
            row = await cur.fetchone()
        opens = _from_now(row[0] if row else seconds)
        log.warning("limit closed for every worker", key=key, until=opens, reason=reason[:200])
        metrics.THROTTLED.labels(*self._labels, key, "run").inc()
        return Throttled(key, opens, reason)
