"""The overview's and the runs list's plans on a million finished runs: indexes, bounded reads."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg
import pytest

from benchmarks.console_overview import seed_history
from conveyor import queries
from conveyor.console.filters import RunFilter
from conveyor.console.overview import FAILED_CAP, OVERVIEW_PARAMETERS, SAMPLE_ROWS
from conveyor.reference import pipeline as reference

pytestmark = pytest.mark.timeout(300)
BIG_TABLES = {"pipeline_runs", "run_events"}


def _nodes(plan: dict[str, Any]) -> Iterator[dict[str, Any]]:
    yield plan
    for child in plan.get("Plans", []):
        yield from _nodes(child)


def _explain(conn: psycopg.Connection[Any], statement: str, params: Any) -> dict[str, Any]:
    row = conn.execute("EXPLAIN (ANALYZE, FORMAT JSON) " + statement, params).fetchone()
    assert row is not None
    plan: dict[str, Any] = row[0][0]["Plan"]
    return plan


# Every run in the runs list's order, sorted in full: what console_runs must give, page by page.
LISTED = """
SELECT id FROM (
    SELECT id, CASE WHEN get_byte(uuid_send(id), 6) >> 4 = 7
                         AND id < '0699e991-a800-0000-0000-000000000000'::uuid
                    THEN 'epoch'::timestamptz
                         + ('x' || translate(left(id::text, 13), '-', ''))::bit(48)::bigint
                           * interval '1 millisecond'
                    ELSE created_at END AS listed_at
      FROM conveyor.pipeline_runs
     WHERE %(status)s::text IS NULL OR status = %(status)s) r
 WHERE %(before_at)s::timestamptz IS NULL
    OR (listed_at, id) < (%(before_at)s::timestamptz, %(before_id)s::uuid)
 ORDER BY listed_at DESC, id DESC
 LIMIT 51
"""
UNTIMED_RUNS = 20_000


def _seed_untimed(conn: psycopg.Connection[Any]) -> None:
    """Runs whose ids give no time (random ids, as before migration 006 or chosen by whoever
    inserted them), created over the same 30 days as the history, a few of them just now."""
    conn.execute("ALTER TABLE conveyor.pipeline_runs DISABLE TRIGGER USER")
    try:
        conn.execute(
            "INSERT INTO conveyor.pipeline_runs (id, status, created_at, updated_at, finished_at)"
            " SELECT gen_random_uuid(), CASE WHEN n %% 20 = 0 THEN 'CANCELLED' ELSE 'DONE' END,"
            "        now() - n * interval '2 minutes', now(), now()"
            "   FROM generate_series(0, %s) n",
            (UNTIMED_RUNS - 1,),
        )
    finally:
        conn.execute("ALTER TABLE conveyor.pipeline_runs ENABLE TRIGGER USER")
    conn.execute("VACUUM ANALYZE conveyor.pipeline_runs")


def test_overview_and_runs_list_use_indexes_on_a_million_finished_runs(database_url: str) -> None:
    with psycopg.connect(database_url, autocommit=True, prepare_threshold=None) as conn:
        seed_history(conn, 1_000_000)
        _seed_untimed(conn)
        statements = queries.load("conveyor")

        overview = list(_nodes(_explain(conn, statements["console_overview"], OVERVIEW_PARAMETERS)))
        scans = [n for n in overview if n.get("Relation Name") in BIG_TABLES]
        assert scans, "the overview reads the run tables"
        for scan in scans:
            # Never a sequential scan of history, and no scan reads more than its bounded sample.
            assert scan["Node Type"] in ("Index Scan", "Index Only Scan"), scan
            assert scan["Actual Rows"] <= max(SAMPLE_ROWS, FAILED_CAP + 1), scan
        assert {scan["Index Name"] for scan in scans} == {
            "pipeline_runs_claimable",  # the queue
            "pipeline_runs_finished",  # recently finished
            "pipeline_runs_failed",  # FAILED, capped
            "pipeline_runs_pkey",  # latest runs whose ids give their time
            "pipeline_runs_untimed_ids",  # and the others
            "run_events_created",  # throughput and failures per stage
        }

        # The runs list, deep in history: the keyset is an index condition in both parts, not
        # a filter that walks every newer row first; the page is the full sort's.
        middle = conn.execute(
            "SELECT id FROM conveyor.pipeline_runs ORDER BY id DESC OFFSET 500000 LIMIT 1"
        ).fetchone()
        assert middle is not None and middle[0].version == 7
        at = datetime(1970, 1, 1, tzinfo=UTC) + timedelta(milliseconds=middle[0].int >> 80)
        for run_filter in (
            RunFilter().after(at, middle[0]),
            RunFilter(status="DONE").after(at, middle[0]),
        ):
            scans = _runs_list_scans(conn, statements["console_runs"], run_filter)
            assert scans["pipeline_runs_pkey"]["Actual Rows"] <= 100
            assert "id <" in scans["pipeline_runs_pkey"].get("Index Cond", "")
            assert scans["pipeline_runs_untimed_ids"]["Actual Rows"] <= 100
            assert "created_at" in scans["pipeline_runs_untimed_ids"].get("Index Cond", "")
            assert _page(conn, statements["console_runs"], run_filter) == _listed(conn, run_filter)

        # The first page mixes both kinds by time: the untimed runs made just now are on it,
        # the month-old ones are not (random ids sort anywhere).
        first = _page(conn, statements["console_runs"], RunFilter())
        assert first == _listed(conn, RunFilter())
        assert any(run_id.version == 4 for run_id in first)

        # Created within the last 30 minutes, a status too rare to fill a page there (CANCELLED:
        # 5% of ~700 timed runs and of 15 untimed ones): each part stops at the first run older
        # than the window instead of reading the other 30 days.
        recent = RunFilter(status="CANCELLED", since="30m")
        scans = _runs_list_scans(conn, statements["console_runs"], recent)
        for scan in scans.values():
            assert scan["Actual Rows"] + scan.get("Rows Removed by Filter", 0) < 5_000, scan
        assert "id >=" in scans["pipeline_runs_pkey"].get("Index Cond", "")
        page = _page(conn, statements["console_runs"], recent)
        in_window = conn.execute(
            "SELECT count(*) FROM conveyor.pipeline_runs"
            " WHERE status = 'CANCELLED' AND created_at >= now() - interval '30 minutes'"
        ).fetchone()
        assert in_window is not None and 0 < in_window[0] == len(page) < 51


def _runs_list_scans(
    conn: psycopg.Connection[Any], statement: str, run_filter: RunFilter
) -> dict[str, dict[str, Any]]:
    """The scans of pipeline_runs in console_runs' plan, by index (each index once)."""
    params = {**run_filter.parameters(reference), "limit": 51}
    nodes = list(_nodes(_explain(conn, statement, params)))
    scans = [n for n in nodes if n.get("Relation Name") == "pipeline_runs"]
    by_index = {scan.get("Index Name", scan["Node Type"]): scan for scan in scans}
    assert set(by_index) == {"pipeline_runs_pkey", "pipeline_runs_untimed_ids"}, scans
    assert len(scans) == 2, scans
    return by_index


def _page(conn: psycopg.Connection[Any], statement: str, run_filter: RunFilter) -> list[Any]:
    params = {**run_filter.parameters(reference), "limit": 51}
    return [row[0] for row in conn.execute(statement, params).fetchall()]


def _listed(conn: psycopg.Connection[Any], run_filter: RunFilter) -> list[Any]:
    params = run_filter.parameters(reference)
    rows = conn.execute(
        LISTED,
        {
            "status": run_filter.status,
            "before_at": params["before_at"],
            "before_id": params["before_id"],
        },
    ).fetchall()
    return [row[0] for row in rows]
