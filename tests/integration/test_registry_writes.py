"""A worker's registry row says whether runs may be handed to it, and how many. The dispatcher,
the heartbeat and the give-backs all write it, and the wake-up trigger counts hand-offs down in
it. Whatever order those land in, the row ends up saying what the worker is: a worker that
waits with its row saying otherwise is handed nothing and woken by nothing until the row is
written again."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import psycopg
import pytest
import structlog
from psycopg_pool import AsyncConnectionPool

from conveyor import Pipeline, Run, Stage
from conveyor.listening import Listener
from conveyor.protocol import StageProtocol
from conveyor.worker.database_errors import DatabaseErrors
from conveyor.worker.hand_offs import HandOffs, Verdict, signature
from tests.helpers import fetch_all, leased_run


async def _noop(run: Run) -> dict[str, object]:
    return {}


PIPELINE = Pipeline("registry", [Stage("only", _noop, "NEW", "DONE")])
CHANNEL = "conveyor_test_registry"
WORKER = "only-1-registry"
LABELS = ("registry", "only")


def _registry_row(url: str) -> tuple[bool, int]:
    [(waiting, free)] = fetch_all(
        url, "SELECT waiting, free_slots FROM conveyor.workers WHERE worker_id = %s", (WORKER,)
    )
    return bool(waiting), int(free)


def _execute(url: str, statement: str, params: Any = None) -> None:
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(statement, params)


@asynccontextmanager
async def _hand_offs(
    url: str, pool_size: int, sweep_interval: float = 5.0, heard: list[str | None] | None = None
) -> AsyncIterator[tuple[HandOffs, Any]]:
    """A worker's HandOffs over a real pool and a real listener (connected), and the pool.
    The notifications the listener hears go to `heard`, unread by the HandOffs."""
    log: Any = structlog.get_logger()
    listener = Listener(
        url,
        CHANNEL,
        heard.append if heard is not None else lambda payload: None,
        health_interval=60,
    )
    listening = asyncio.create_task(listener.run())
    try:
        async with AsyncConnectionPool(
            url, min_size=pool_size, max_size=pool_size, kwargs={"autocommit": True}, open=False
        ) as pool:
            stopping = asyncio.Event()
            protocol = StageProtocol(
                pool,
                schema="conveyor",
                pipeline=PIPELINE,
                stage=PIPELINE.stages[0],
                worker_id=WORKER,
                lease_seconds=30,
            )
            errors = DatabaseErrors(
                pool=pool,
                listener=listener,
                stopping=stopping,
                sweep_interval=sweep_interval,
                labels=LABELS,
                log=log,
            )
            hand_offs = HandOffs(
                WORKER,
                protocol,
                listener=listener,
                errors=errors,
                held=set(),
                channel=CHANNEL,
                ttl_seconds=30,
                stopping=stopping,
                wake=asyncio.Event(),
                labels=LABELS,
                log=log,
            )
            await asyncio.wait_for(listener.connected.wait(), 10)
            yield hand_offs, pool
    finally:
        listening.cancel()
        await listener.close()


@pytest.mark.parametrize("arming", [True, False])
def test_the_heartbeat_and_the_dispatcher_never_leave_the_row_behind_the_worker(
    database_url: str, arming: bool
) -> None:
    """The heartbeat beats while the dispatcher arms (or disarms) the worker: the row the
    last commit leaves is the worker's state, 40 times over."""

    async def scenario() -> list[tuple[bool, int, bool, int]]:
        seen = []
        async with _hand_offs(database_url, pool_size=3) as (hand_offs, _):
            for _ in range(40):
                await hand_offs.set_waiting(not arming, 3)  # where the worker starts from
                await asyncio.gather(hand_offs.set_waiting(arming, 3), hand_offs.beat(lambda: 3))
                waiting, free = await asyncio.to_thread(_registry_row, database_url)
                seen.append((waiting, free, hand_offs.armed, hand_offs.free_reported))
        return seen

    seen = asyncio.run(scenario())
    assert {(armed, free) for _, _, armed, free in seen} == {(arming, 3 if arming else 0)}
    assert [(waiting, free) for waiting, free, _, _ in seen] == [
        (armed, free) for _, _, armed, free in seen
    ]


def test_a_hand_off_read_while_the_row_is_written_has_it_written_again(
    database_url: str,
) -> None:
    """The worker arms with one free slot; the trigger hands that slot out as the arming
    commits, and the hand-off is read before the arming's answer. Once the run is done the
    worker arms again, and the row must say so: it cannot know whether the trigger counted
    the hand-off before its write or after it."""

    async def scenario() -> tuple[bool, int]:
        async with _hand_offs(database_url, pool_size=1) as (hand_offs, pool):
            async with pool.connection():  # the arming waits for the pool's one connection
                arming = asyncio.create_task(hand_offs.set_waiting(True, 1))
                await asyncio.sleep(0.1)
                body = json.dumps(
                    {
                        "id": str(uuid.uuid4()),
                        "input": {},
                        "outputs": {},
                        "attempt": 1,
                        "waited": 0.001,
                        "free": 0,  # the trigger took the last slot and disarmed the row
                        "expires": time.time() + 30,
                    }
                )
                taken = hand_offs.read(f"{signature(hand_offs.secret, body)}:{body}")
                assert isinstance(taken, tuple)  # a run to start, not a refusal
            await arming
            # The trigger's count landed after the arming: as hand_off() leaves the row.
            await asyncio.to_thread(
                _execute,
                database_url,
                "UPDATE conveyor.workers SET free_slots = 0, waiting = false WHERE worker_id = %s",
                (WORKER,),
            )
            await hand_offs.set_waiting(True, 1)  # the handed run is done: wait again
        return await asyncio.to_thread(_registry_row, database_url)

    assert asyncio.run(scenario()) == (True, 1)


def test_a_worker_that_could_not_arm_is_woken_to_claim_and_try_again(database_url: str) -> None:
    """Its row was not written: nothing would hand it a run or wake it. After the back-off
    the dispatcher is woken, claims, and arms again."""

    async def scenario() -> tuple[bool, bool]:
        async with _hand_offs(database_url, pool_size=1, sweep_interval=0.05) as (hand_offs, _):
            await asyncio.to_thread(
                _execute, database_url, "ALTER TABLE conveyor.workers RENAME TO away"
            )
            try:
                await hand_offs.set_waiting(True, 1)
            finally:
                await asyncio.to_thread(
                    _execute, database_url, "ALTER TABLE conveyor.away RENAME TO workers"
                )
            return hand_offs.armed, hand_offs._wake.is_set()

    assert asyncio.run(scenario()) == (False, True)


def test_a_give_back_keeps_the_worker_off_the_list_until_its_release_has_committed(
    database_url: str,
) -> None:
    """The dispatcher arms the worker again while a hand-off it could not take is given back:
    the arming waits for the release, whose commit would otherwise hand the run straight back
    to the worker (which would give it back again, and again)."""
    working = PIPELINE.stages[0].working

    async def scenario() -> tuple[list[Any], tuple[bool, int]]:
        async with _hand_offs(database_url, pool_size=3) as (hand_offs, _):
            await hand_offs.set_waiting(True, 3)
            runs = []
            for _ in range(10):
                run_id = await asyncio.to_thread(
                    leased_run, database_url, "registry", working, WORKER, 30
                )
                runs.append(run_id)
                await asyncio.gather(hand_offs._give_back(run_id), hand_offs.set_waiting(True, 3))
            leases = await asyncio.to_thread(
                fetch_all,
                database_url,
                "SELECT status, lease_owner FROM conveyor.pipeline_runs WHERE id = ANY(%s)",
                (runs,),
            )
            return leases, await asyncio.to_thread(_registry_row, database_url)

    leases, row = asyncio.run(scenario())
    assert leases == [("NEW", None)] * 10  # released, and handed to nobody
    assert row == (True, 3)


def test_a_hand_off_heard_after_its_run_was_released_unheard_is_refused(
    database_url: str,
) -> None:
    """A run handed to the worker whose notification waits, unread, behind one the worker could
    not read: the dispatcher releases every lease the worker has not heard of, this one too.
    Read afterwards, its hand-off is a lease that is no longer the worker's: refused, not run
    beside whoever claims the run next. The next hand-off of the same run is taken."""

    async def scenario() -> tuple[Any, Any, list[Any], Any]:
        heard: list[str | None] = []
        async with _hand_offs(database_url, pool_size=2, heard=heard) as (hand_offs, _):

            def handed() -> list[str]:  # the hand-offs heard (a reconnect is heard as None)
                return [p.removeprefix(hand_offs.prefix) for p in heard if p and p[:4] == "run:"]

            await hand_offs.set_waiting(True, 3)
            [(run_id,)] = await asyncio.to_thread(
                fetch_all,
                database_url,
                "INSERT INTO conveyor.pipeline_runs (pipeline, input) VALUES ('registry', '{}')"
                " RETURNING id",
            )
            await _until(lambda: len(handed()) == 1)
            [late] = handed()
            await hand_offs.release_unheard()
            released = await asyncio.to_thread(
                fetch_all,
                database_url,
                "SELECT status, lease_owner FROM conveyor.pipeline_runs WHERE id = %s",
                (run_id,),
            )
            verdict = hand_offs.read(late)
            # Handed again: a new lease of the same run, at the same attempt.
            await hand_offs.set_waiting(True, 3)
            await asyncio.to_thread(
                _execute,
                database_url,
                "UPDATE conveyor.pipeline_runs SET status = status WHERE id = %s",
                (run_id,),
            )
            await _until(lambda: len(handed()) == 2)
            again = hand_offs.read(handed()[1])
        return verdict, run_id, released, again

    verdict, run_id, released, again = asyncio.run(scenario())
    assert released == [("NEW", None)]
    assert verdict is Verdict.REFUSED
    assert isinstance(again, tuple) and again[0] == run_id


async def _until(condition: Any, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "nothing heard"
        await asyncio.sleep(0.01)


def test_a_lease_written_by_hand_without_an_expiry_is_released_unheard(database_url: str) -> None:
    """A row leased to the worker with no lease expiry (written by hand, triggers off) is
    released like any lease the worker never heard of, not a crash at every start."""
    working = PIPELINE.stages[0].working

    async def scenario() -> list[Any]:
        async with _hand_offs(database_url, pool_size=2) as (hand_offs, _):
            run_id = await asyncio.to_thread(
                leased_run, database_url, "registry", working, WORKER, 30
            )
            await asyncio.to_thread(
                _execute,
                database_url,
                "UPDATE conveyor.pipeline_runs SET lease_expires_at = NULL WHERE id = %s",
                (run_id,),
            )
            await hand_offs.release_unheard()
            return await asyncio.to_thread(
                fetch_all,
                database_url,
                "SELECT status, lease_owner FROM conveyor.pipeline_runs WHERE id = %s",
                (run_id,),
            )

    assert asyncio.run(scenario()) == [("NEW", None)]
