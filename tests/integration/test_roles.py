"""The optional least-privilege worker role runs the pipeline and cannot change the schema."""

from __future__ import annotations

import uuid
from collections.abc import Callable

import psycopg
import pytest
from psycopg import conninfo, sql

from conveyor import migrate
from tests.helpers import ConveyorProcess, scalar, wait_until


def test_worker_role_runs_the_pipeline_without_ddl(
    database_url: str, start_conveyor: Callable[..., ConveyorProcess]
) -> None:
    login = f"worker_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(database_url, autocommit=True) as conn:
        migrate.apply_roles(conn, "conveyor")
        migrate.apply_roles(conn, "conveyor")  # idempotent
        conn.execute(
            sql.SQL("CREATE ROLE {} LOGIN IN ROLE conveyor_worker").format(sql.Identifier(login))
        )
    worker_url = conninfo.make_conninfo(database_url, user=login)
    try:
        with psycopg.connect(worker_url, autocommit=True) as conn:
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                conn.execute("CREATE TABLE conveyor.intruder (id int)")
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                conn.execute("DROP TABLE conveyor.run_events")
        start_conveyor("run", CONVEYOR_DATABASE_URL=worker_url)
        with psycopg.connect(worker_url, autocommit=True) as conn:
            conn.execute(
                "INSERT INTO conveyor.pipeline_runs (input)"
                ' VALUES (\'{"question": "Who may alter tables?"}\')'
            )
        wait_until(
            lambda: scalar(database_url, "SELECT status FROM conveyor.pipeline_runs") == "DONE",
            30,
            "the run DONE under the worker role",
        )
        # ANALYZE needs the table's owner; the leader's function lends its rights for it alone.
        with psycopg.connect(database_url, autocommit=True) as conn:  # no ANALYZE but its own
            conn.execute("ALTER TABLE conveyor.pipeline_runs SET (autovacuum_enabled = false)")
        with psycopg.connect(worker_url, autocommit=True) as conn, conn.transaction():
            conn.execute(
                "INSERT INTO conveyor.pipeline_runs (pipeline)"
                " SELECT 'elsewhere' FROM generate_series(1, 10)"
            )
            conn.execute("SELECT pg_stat_force_next_flush()")
        with psycopg.connect(worker_url, autocommit=True) as conn:
            assert conn.execute("SELECT conveyor.analyze_runs_if_grown(1)").fetchone() == (True,)
            assert scalar(
                database_url,
                "SELECT last_analyze IS NOT NULL FROM pg_stat_user_tables"
                " WHERE relid = 'conveyor.pipeline_runs'::regclass",
            )
    finally:
        with psycopg.connect(database_url, autocommit=True) as conn:
            conn.execute(sql.SQL("DROP OWNED BY {}").format(sql.Identifier(login)))
            conn.execute(sql.SQL("DROP ROLE {}").format(sql.Identifier(login)))
