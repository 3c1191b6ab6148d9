"""The overview's and the runs list's plans on a million finished runs: indexes, bounded reads."""

from __future__ import annotations

from collections.abc import Iterator
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


def test_overview_and_runs_list_use_indexes_on_a_million_finished_runs(database_url: str) -> None:
    with psycopg.connect(database_url, autocommit=True, prepare_threshold=None) as conn:
        seed_history(conn, 1_000_000)
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
            "pipeline_runs_pkey",  # latest runs (ids are time-ordered)
            "run_events_created",  # throughput and failures per stage
        }

        # The runs list, deep in history: the keyset is an index condition, not a filter that
        # walks every newer row first.
        middle = conn.execute(
            "SELECT id FROM conveyor.pipeline_runs ORDER BY id DESC OFFSET 500000 LIMIT 1"
        ).fetchone()
        assert middle is not None
        deep = RunFilter().after(middle[0])
        for run_filter in (deep, RunFilter(status="DONE").after(middle[0])):
            scan = _runs_list_scan(conn, statements["console_runs"], run_filter)
            assert scan["Index Name"] == "pipeline_runs_pkey", scan
            assert "id <" in scan.get("Index Cond", ""), scan
            assert scan["Actual Rows"] <= 100, scan

        # Created within the last 30 minutes, a status too rare to fill a page there (CANCELLED: 5%
        # of ~700 runs): the scan stops at the first run older than the window instead
        # of reading the other 30 days.
        recent = RunFilter(status="CANCELLED", since="30m")
        scan = _runs_list_scan(conn, statements["console_runs"], recent)
        assert scan["Index Name"] == "pipeline_runs_pkey", scan
        assert "id >=" in scan.get("Index Cond", ""), scan
        assert scan["Actual Rows"] + scan.get("Rows Removed by Filter", 0) < 5_000, scan
        in_window = conn.execute(
            "SELECT count(*) FROM conveyor.pipeline_runs"
            " WHERE status = 'CANCELLED' AND created_at >= now() - interval '30 minutes'"
        ).fetchone()
        assert in_window is not None and 0 < in_window[0] == scan["Actual Rows"], scan


def _runs_list_scan(
    conn: psycopg.Connection[Any], statement: str, run_filter: RunFilter
) -> dict[str, Any]:
    params = {**run_filter.parameters(reference), "limit": 51}
    runs = list(_nodes(_explain(conn, statement, params)))
    (scan,) = [n for n in runs if n.get("Relation Name") == "pipeline_runs"]
    return scan
