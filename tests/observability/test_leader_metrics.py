"""The maintenance leader's one look at the queue: what it publishes, from which index, and the
cancellations it counts from run_events."""

from __future__ import annotations

import asyncio
import json
import math
from typing import Any

import psycopg
from prometheus_client import REGISTRY

from conveyor import queries, runs
from conveyor.leader_metrics import LeaderMetrics
from tests.pipelines import chain


def _value(name: str, **labels: str) -> float | None:
    return REGISTRY.get_sample_value(name, labels)


def _publish(url: str, published: LeaderMetrics) -> None:
    async def once() -> None:
        async with await psycopg.AsyncConnection.connect(url, autocommit=True) as conn:
            await published.publish(conn)

    asyncio.run(once())


def _seed(conn: psycopg.Connection[Any]) -> None:
    def add(status: str, count: int, run_after: str = "now()", finished: bool = False) -> None:
        conn.execute(
            "INSERT INTO conveyor.pipeline_runs (pipeline, status, run_after, finished_at)"
            f" SELECT 'chain', %s, {run_after}, CASE WHEN %s THEN now() END"
            " FROM generate_series(1, %s)",
            (status, finished, count),
        )

    add("NEW", 2)
    add("NEW", 1, run_after="now() - interval '100 seconds'")
    add("NEW", 2, run_after="now() + interval '1 hour'")  # delayed: not due
    add("ONE_RUNNING", 1, run_after="now() - interval '30 seconds'")
    add("ONE_DONE", 4)
    add("LIMBO", 1)  # a status no stage consumes (a pipeline changed under its runs)
    add("DONE", 50, finished=True)
    add("FAILED", 5, finished=True)
    for worker, stage, expires in (
        ("one-1-a", "one", "now() + interval '30 seconds'"),
        ("one-2-b", "one", "now() + interval '30 seconds'"),
        ("two-3-c", "two", "now() - interval '1 second'"),  # its heartbeat expired
    ):
        conn.execute(
            "INSERT INTO conveyor.workers (worker_id, pipeline, stage, consumes, channel,"
            f" hostname, pid, expires_at) VALUES (%s, 'chain', %s, 'X', 'c', 'h', 1, {expires})",
            (worker, stage),
        )


def test_queue_gauges_describe_the_table_and_forget_nothing_stale(database_url: str) -> None:
    published = LeaderMetrics(chain, queries.load("conveyor"))
    with psycopg.connect(database_url, autocommit=True) as conn:
        _seed(conn)
    _publish(database_url, published)

    def depth(status: str, stage: str) -> float | None:
        return _value("conveyor_queue_depth", pipeline="chain", stage=stage, status=status)

    assert depth("NEW", "one") == 3
    assert _value("conveyor_queue_scheduled", pipeline="chain", stage="one", status="NEW") == 2
    oldest = _value(
        "conveyor_queue_oldest_age_seconds", pipeline="chain", stage="one", status="NEW"
    )
    assert oldest is not None and 100 <= oldest < 160
    assert depth("ONE_RUNNING", "one") == 1
    assert depth("ONE_DONE", "two") == 4
    assert depth("TWO_RUNNING", "two") == 0  # no runs: an explicit zero, not a missing series
    assert depth("LIMBO", "") == 1
    for stage, alive in (("one", 2), ("two", 0), ("three", 0)):
        assert _value("conveyor_workers_alive", pipeline="chain", stage=stage) == alive
    usage = _value("conveyor_notification_queue_usage_ratio")
    assert usage is not None and 0 <= usage < 0.01
    assert _value("conveyor_maintenance_leader", pipeline="chain") == 1

    # The runs leave NEW: the next tick says zero, not what it saw before.
    with psycopg.connect(database_url, autocommit=True) as conn:
        conn.execute("DELETE FROM conveyor.pipeline_runs WHERE status IN ('NEW', 'LIMBO')")
    _publish(database_url, published)
    assert depth("NEW", "one") == 0
    assert depth("LIMBO", "") == 0
    assert (
        _value("conveyor_queue_oldest_age_seconds", pipeline="chain", stage="one", status="NEW")
        == 0
    )

    # Leadership lost: this process no longer knows; across hosts `max by` reads the leader.
    published.resign()
    assert math.isnan(depth("ONE_DONE", "two") or 0.0)
    assert math.isnan(_value("conveyor_workers_alive", pipeline="chain", stage="one") or 0.0)
    assert _value("conveyor_maintenance_leader", pipeline="chain") == 0


def test_queue_query_reads_only_the_claim_index(database_url: str) -> None:
    with psycopg.connect(database_url, autocommit=True) as conn:
        conn.execute(
            "INSERT INTO conveyor.pipeline_runs (pipeline, status, finished_at)"
            " SELECT 'chain', 'DONE', now() FROM generate_series(1, 50000)"
        )
        conn.execute(
            "INSERT INTO conveyor.pipeline_runs (pipeline, status)"
            " SELECT 'chain', 'NEW' FROM generate_series(1, 100)"
        )
        conn.execute("VACUUM ANALYZE conveyor.pipeline_runs")
        statement = queries.load("conveyor")["queue_depth"]
        plan = conn.execute("EXPLAIN (FORMAT JSON) " + statement, {"pipeline": "chain"}).fetchone()[
            0
        ]  # type: ignore[index]
    text = json.dumps(plan)
    assert "pipeline_runs_claimable" in text, text
    assert "Index Only Scan" in text, text  # every column it reads is in the index
    assert "Seq Scan" not in text, text


def test_cancellations_are_counted_once_even_when_committed_late(database_url: str) -> None:
    published = LeaderMetrics(chain, queries.load("conveyor"))

    def cancelled(stage: str) -> float:
        return _value("conveyor_runs_cancelled_total", pipeline="chain", stage=stage) or 0.0

    with psycopg.connect(database_url, autocommit=True) as conn:
        ids = [
            conn.execute(
                "INSERT INTO conveyor.pipeline_runs (pipeline, status) VALUES ('chain', %s)"
                " RETURNING id",
                (status,),
            ).fetchone()[0]  # type: ignore[index]
            for status in ("NEW", "NEW", "ONE_DONE", "NEW", "NEW")
        ]
        assert runs.cancel(conn, "conveyor", ids[0], actor="test")  # before leadership
        _publish(database_url, published)  # first tick: earlier cancels are not this leader's
        before = {stage: cancelled(stage) for stage in ("one", "two")}

        assert runs.cancel(conn, "conveyor", ids[1], actor="test")
        assert runs.cancel(conn, "conveyor", ids[2], actor="test")  # ONE_DONE: stage two's
        _publish(database_url, published)
        assert cancelled("one") == before["one"] + 1
        assert cancelled("two") == before["two"] + 1

        # A cancel whose event id is taken before the leader's next look but committed after.
        with psycopg.connect(database_url) as late:
            assert runs.cancel(late, "conveyor", ids[3], actor="test")  # not committed yet
            assert runs.cancel(conn, "conveyor", ids[4], actor="test")  # a later id, committed
            _publish(database_url, published)
            assert cancelled("one") == before["one"] + 2
            late.commit()
        _publish(database_url, published)
        assert cancelled("one") == before["one"] + 3
        _publish(database_url, published)
        _publish(database_url, published)
        assert cancelled("one") == before["one"] + 3  # counted once


def test_limit_gauges_say_what_each_key_allows_holds_and_when_it_opens(database_url: str) -> None:
    with psycopg.connect(database_url, autocommit=True) as conn:
        conn.execute(
            "INSERT INTO conveyor.limits (key, max_in_flight, requests_per_minute, closed_until)"
            " VALUES ('capped', 4, NULL, NULL),"
            "        ('closed', NULL, 120, to_timestamp(4102444800))"  # 2100-01-01
        )
        conn.execute(
            "INSERT INTO conveyor.limit_stages (key, pipeline, stage, working, channel)"
            " VALUES ('capped', 'chain', 'one', 'ONE_RUNNING', 'c')"
        )
        conn.execute(
            "INSERT INTO conveyor.pipeline_runs (pipeline, status, lease_owner, lease_expires_at)"
            " VALUES ('chain', 'ONE_RUNNING', 'w', now() + interval '30 seconds'),"
            "        ('chain', 'ONE_RUNNING', 'w', now() + interval '30 seconds'),"
            "        ('chain', 'ONE_RUNNING', 'dead', now() - interval '1 second')"  # given back
        )
    published = LeaderMetrics(chain, queries.load("conveyor"))
    _publish(database_url, published)
    assert _value("conveyor_limit_in_flight", key="capped") == 2
    assert _value("conveyor_limit_allowed", key="capped", kind="max_in_flight") == 4
    rpm = _value("conveyor_limit_allowed", key="capped", kind="requests_per_minute")
    assert rpm is not None and math.isnan(rpm)
    assert _value("conveyor_limit_allowed", key="closed", kind="requests_per_minute") == 120
    assert _value("conveyor_limit_closed_until_timestamp_seconds", key="capped") == 0
    assert _value("conveyor_limit_closed_until_timestamp_seconds", key="closed") == 4102444800
    published.resign()
    gone = _value("conveyor_limit_in_flight", key="capped")
    assert gone is not None and math.isnan(gone)
