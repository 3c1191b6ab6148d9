"""The query each ScaledObject sends, run as KEDA runs it against a real PostgreSQL: one non-NULL
number, the right count, served by the claim index on a table of mostly finished runs, and
readable by the read-only role the scaler logs in with."""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest
from psycopg import conninfo, sql

from tests.deploy.conftest import stage_deployments
from tests.deploy.support import named

FINISHED = 200_000
# (pipeline, status, due, rows): what is waiting, in flight, and not yet due, per status.
UNFINISHED = [
    ("agents", "NEW", True, 300),
    ("agents", "NEW", False, 50),  # delayed or backing off: not work yet
    ("agents", "ANALYZING", True, 40),
    ("agents", "ANALYZED", True, 120),
    ("agents", "ASSEMBLING", True, 10),
    ("agents", "CONTEXT_READY", True, 80),
    ("agents", "CONTEXT_READY", False, 5),
    ("agents", "ANSWERING", True, 30),
    ("crawl", "NEW", True, 500),  # another pipeline in the same table
]
EXPECTED = {"analyze": 300 + 40, "assemble": 120 + 10, "answer": 80 + 30}


@pytest.fixture
def seeded(database_url: str) -> str:
    """A realistic table: 200k finished runs and a few hundred unfinished ones, analyzed."""
    with psycopg.connect(database_url, autocommit=True) as conn:
        # Seeding only: no wake-ups or observer notifications for 200k rows.
        conn.execute("ALTER TABLE conveyor.pipeline_runs DISABLE TRIGGER USER")
        conn.execute(
            """INSERT INTO conveyor.pipeline_runs
                      (status, created_at, updated_at, run_after, finished_at)
               SELECT CASE WHEN g %% 50 = 0 THEN 'FAILED' ELSE 'DONE' END,
                      now() - make_interval(secs => g), now() - make_interval(secs => g),
                      now() - make_interval(secs => g), now() - make_interval(secs => g)
                 FROM generate_series(1, %s) AS g""",
            (FINISHED,),
        )
        for pipeline, status, due, rows in UNFINISHED:
            conn.execute(
                """INSERT INTO conveyor.pipeline_runs (pipeline, status, run_after)
                   SELECT %s, %s, now() + make_interval(secs => %s)
                     FROM generate_series(1, %s)""",
                (pipeline, status, -60 if due else 3600, rows),
            )
        conn.execute("ALTER TABLE conveyor.pipeline_runs ENABLE TRIGGER USER")
        conn.execute("ANALYZE conveyor.pipeline_runs")
    return database_url


def stage_queries(renderings: dict[str, list[dict[str, Any]]]) -> dict[str, str]:
    objects = renderings["base"]
    return {
        stage: named(objects, "ScaledObject", found.deployment["metadata"]["name"])["spec"][
            "triggers"
        ][0]["metadata"]["query"]
        for stage, found in stage_deployments(objects).items()
    }


def test_the_keda_query_counts_due_and_in_flight_runs_through_the_claim_index(
    seeded: str, renderings: dict[str, list[dict[str, Any]]]
) -> None:
    queries = stage_queries(renderings)
    assert queries.keys() == EXPECTED.keys()
    with psycopg.connect(seeded, autocommit=True) as conn:
        for stage, query in queries.items():
            rows = conn.execute(query).fetchall()
            assert len(rows) == 1 and len(rows[0]) == 1, f"{stage}: KEDA reads one value"
            assert rows[0][0] == EXPECTED[stage], stage
            plan = conn.execute("EXPLAIN (FORMAT JSON) " + query).fetchone()
            assert plan is not None
            nodes = list(plan_nodes(plan[0][0]["Plan"]))
            scans = [n for n in nodes if n.get("Relation Name") == "pipeline_runs"]
            assert not [n for n in scans if n["Node Type"] == "Seq Scan"], json.dumps(nodes)
            indexes = {n["Index Name"] for n in nodes if "Index Name" in n}
            assert indexes == {"pipeline_runs_claimable"}, f"{stage}: {indexes}"


def test_the_keda_query_is_zero_not_null_on_an_empty_table(
    database_url: str, renderings: dict[str, list[dict[str, Any]]]
) -> None:
    with psycopg.connect(database_url, autocommit=True) as conn:
        for stage, query in stage_queries(renderings).items():
            assert conn.execute(query).fetchall() == [(0,)], stage


@pytest.fixture
def scaler_url(database_url: str) -> Iterator[str]:
    """A login role in conveyor_reader (sql/roles.sql, `conveyor migrate --roles`), as
    README.md ("Deploy") tells operators to create for KEDA."""
    from conveyor import migrate

    role = f"keda_test_{uuid.uuid4().hex[:8]}"
    password = uuid.uuid4().hex
    with psycopg.connect(database_url, autocommit=True) as conn:
        migrate.apply_roles(conn, "conveyor")
        conn.execute(
            sql.SQL("CREATE ROLE {} LOGIN PASSWORD {} IN ROLE conveyor_reader").format(
                sql.Identifier(role), sql.Literal(password)
            )
        )
    try:
        yield conninfo.make_conninfo(database_url, user=role, password=password)
    finally:
        with psycopg.connect(database_url, autocommit=True) as conn:
            conn.execute(sql.SQL("DROP ROLE {}").format(sql.Identifier(role)))


def test_the_scalers_read_only_role_can_count_and_nothing_else(
    scaler_url: str, renderings: dict[str, list[dict[str, Any]]]
) -> None:
    with psycopg.connect(scaler_url, autocommit=True) as conn:
        for stage, query in stage_queries(renderings).items():
            assert conn.execute(query).fetchall() == [(0,)], stage
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            conn.execute("INSERT INTO conveyor.pipeline_runs (input) VALUES ('{}')")
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            conn.execute("UPDATE conveyor.pipeline_runs SET priority = 1")


def plan_nodes(node: dict[str, Any]) -> Iterator[dict[str, Any]]:
    yield node
    for child in node.get("Plans", []):
        yield from plan_nodes(child)
