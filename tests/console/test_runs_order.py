"""The runs list's order over runs of every kind of id: ids uuid_v7() made are listed at the
time they give, any other id (made before migration 006, or chosen by whoever inserted the
run) at its created_at; paging with the console's own cursors meets every run once."""

from __future__ import annotations

import uuid
from typing import Any

import psycopg

from conveyor import queries
from conveyor.console import decoding
from conveyor.console.filters import RunFilter, encode_cursor
from conveyor.reference import pipeline as reference

FRESH_LOW_ID = uuid.UUID("01000000-0000-4000-8000-000000000001")  # random ids can be this low
FAR_FUTURE_V7 = uuid.UUID("7fffffff-ffff-7fff-bfff-ffffffffffff")  # a v7 id claiming year 6000+


def _inserted(conn: psycopg.Connection[Any], statement: str, *params: Any) -> list[uuid.UUID]:
    return [row[0] for row in conn.execute(statement, params).fetchall()]


def _seed(conn: psycopg.Connection[Any]) -> dict[str, list[uuid.UUID]]:
    return {
        "old random": _inserted(
            conn,
            "INSERT INTO conveyor.pipeline_runs (id, created_at)"
            " SELECT gen_random_uuid(), now() - interval '400 days' - n * interval '1 minute'"
            "   FROM generate_series(1, 40) n RETURNING id",
        ),
        "new": _inserted(
            conn,
            "INSERT INTO conveyor.pipeline_runs (pipeline)"
            " SELECT 'agents' FROM generate_series(1, 40) RETURNING id",
        ),
        "odd": _inserted(
            conn,
            "INSERT INTO conveyor.pipeline_runs (id, created_at) VALUES"
            " (%s, now()), (%s, now()), (gen_random_uuid(), 'infinity'),"
            " (gen_random_uuid(), '-infinity') RETURNING id",
            FRESH_LOW_ID,
            FAR_FUTURE_V7,
        ),
    }


def _all_listed(conn: psycopg.Connection[Any], statement: str, size: int) -> list[uuid.UUID]:
    """Every run, page after page, each next page asked for with the cursor the console makes
    from the last run of the page before."""
    seen: list[uuid.UUID] = []
    run_filter = RunFilter()
    for _ in range(100):
        rows = conn.execute(
            statement, {**run_filter.parameters(reference), "limit": size}
        ).fetchall()
        seen.extend(row[0] for row in rows)
        if len(rows) < size:
            return seen
        last = rows[-1]
        run_filter = RunFilter.from_query({"cursor": encode_cursor(last[-1], last[0])})
    raise AssertionError("paging did not end")


def test_every_kind_of_id_is_listed_once_by_time(database_url: str) -> None:
    with psycopg.connect(database_url, autocommit=True) as conn:
        decoding.register(conn)  # as the console reads: 'infinity' is a time too
        kinds = _seed(conn)
        statement = queries.load("conveyor")["console_runs"]
        listed = _all_listed(conn, statement, size=7)
        everything = [row[0] for row in conn.execute("SELECT id FROM conveyor.pipeline_runs")]
        assert sorted(listed) == sorted(everything)  # each run once, none skipped

        position = {run_id: index for index, run_id in enumerate(listed)}
        # 'infinity' first; then the newest: made just now, whatever their ids
        assert listed[0] == kinds["odd"][2]
        fresh = [*kinds["new"], FRESH_LOW_ID, FAR_FUTURE_V7]
        assert {position[run_id] for run_id in fresh} == set(range(1, len(fresh) + 1))
        # uuid_v7() ids in the order it made them (to the millisecond: ties by id)
        assert [r for r in listed if r in kinds["new"]] == sorted(kinds["new"], reverse=True)
        # the year-old random ids after every new run, newest first, and '-infinity' last
        old = [r for r in listed if r in kinds["old random"]]
        assert old == kinds["old random"] and min(position[r] for r in old) > len(fresh)
        assert listed[-1] == kinds["odd"][3]


def test_since_keeps_every_run_made_in_the_window_whatever_its_id(database_url: str) -> None:
    with psycopg.connect(database_url, autocommit=True) as conn:
        decoding.register(conn)  # as the console reads: 'infinity' is a time too
        kinds = _seed(conn)
        statement = queries.load("conveyor")["console_runs"]
        params = {**RunFilter(since="15m").parameters(reference), "limit": 1000}
        found = {row[0] for row in conn.execute(statement, params).fetchall()}
        made_now = {*kinds["new"], FRESH_LOW_ID, FAR_FUTURE_V7, kinds["odd"][2]}
        assert found == made_now  # created_at 'infinity' is "since" too; the year-old are not
