"""An expired lease is rescued differently by whether its worker is still alive: a dead worker
may have been killed by the run (a rescue counts, and bounds it), a live one lost the run's move
in a server crash (no rescue is counted against the run)."""

from __future__ import annotations

import asyncio
import time

import psycopg

from conveyor import maintenance, queries
from conveyor.settings import Settings
from tests.pipelines import chain

PARAMS = {
    "pipeline": "chain",
    "stage": "one",
    "consumes": "NEW",
    "working": "ONE_RUNNING",
    "max_rescues": 0,  # the first counted rescue fails the run
    "max_attempts": 3,
}


def _leased(conn: psycopg.Connection[tuple[object, ...]], owner: str, attempt: int = 1) -> object:
    row = conn.execute(
        "INSERT INTO conveyor.pipeline_runs (pipeline, status, attempt, lease_owner,"
        " lease_expires_at) VALUES ('chain', 'ONE_RUNNING', %s, %s, now() - interval '1 second')"
        " RETURNING id",
        (attempt, owner),
    ).fetchone()
    assert row is not None
    return row[0]


def _register(conn: psycopg.Connection[tuple[object, ...]], worker: str, beat_ago: float) -> None:
    """A registry row as beat_worker leaves it, `beat_ago` seconds ago, with a 30 s TTL."""
    conn.execute(
        "INSERT INTO conveyor.workers (worker_id, pipeline, stage, consumes, channel, hostname,"
        " pid, heartbeat_at, expires_at)"
        " VALUES (%(w)s, 'chain', 'one', 'NEW', 'c', 'h', 1,"
        "         now() - make_interval(secs => %(ago)s),"
        "         now() - make_interval(secs => %(ago)s) + interval '30 seconds')",
        {"w": worker, "ago": beat_ago},
    )


def test_a_live_owner_costs_the_run_no_rescue_a_dead_one_does(
    conn: psycopg.Connection[tuple[object, ...]],
) -> None:
    _register(conn, "alive", beat_ago=5)  # beats every 10 s
    _register(conn, "dead", beat_ago=21)  # its row has not expired yet, but it missed two beats
    lost_move, killer, unknown = (
        _leased(conn, "alive"),
        _leased(conn, "dead"),
        _leased(conn, "gone"),
    )
    # back again and again from a live worker: once its attempts are used up, it counts
    recurring = _leased(conn, "alive", attempt=3)
    rescued = conn.execute(queries.load("conveyor")["rescue_expired"], PARAMS).fetchall()
    assert sorted((str(r[0]), r[1]) for r in rescued) == sorted(
        [
            (str(lost_move), "NEW"),
            (str(killer), "FAILED"),
            (str(unknown), "FAILED"),
            (str(recurring), "FAILED"),
        ]
    )
    state = {
        row[0]: row[1:]
        for row in conn.execute(
            "SELECT id, status, rescues, lease_owner, last_error FROM conveyor.pipeline_runs"
        ).fetchall()
    }
    assert state[lost_move] == (
        "NEW",
        0,
        None,
        "lease expired: worker alive is alive but no longer held the run",
    )
    assert state[killer] == ("FAILED", 1, None, "lease expired: worker dead stopped beating")
    assert state[unknown][:2] == ("FAILED", 1)
    assert state[recurring] == (
        "FAILED",
        1,
        None,
        "lease expired: worker alive is alive but no longer held the run",
    )


def test_the_leader_forgets_long_dead_workers_every_few_minutes_not_every_tick(
    database_url: str, conn: psycopg.Connection[tuple[object, ...]]
) -> None:
    """Registry rows an hour past their expiry go at the leader's first tick, and then at
    most every FORGET_DEAD_WORKERS_SECONDS: rows that old need no look every few seconds."""
    leader = maintenance.Maintenance(Settings(), chain, database_url, "test")

    def registry() -> list[object]:
        return [r[0] for r in conn.execute("SELECT worker_id FROM conveyor.workers ORDER BY 1")]

    async def tick() -> None:
        async with await psycopg.AsyncConnection.connect(database_url, autocommit=True) as c:
            await leader.tick(c)

    _register(conn, "long gone", beat_ago=7300)
    _register(conn, "alive", beat_ago=5)
    asyncio.run(tick())
    assert registry() == ["alive"]

    _register(conn, "gone since", beat_ago=7300)
    asyncio.run(tick())
    assert registry() == ["alive", "gone since"]  # not due yet
    due_at = leader._forget_dead_workers_at
    assert 0 < due_at - time.monotonic() <= maintenance.FORGET_DEAD_WORKERS_SECONDS

    leader._forget_dead_workers_at = time.monotonic()  # the few minutes have passed
    asyncio.run(tick())
    assert registry() == ["alive"]
