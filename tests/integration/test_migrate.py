from __future__ import annotations

import threading
import uuid
from collections.abc import Iterator

import psycopg
import pytest
from psycopg import sql

from conveyor import migrate
from tests.helpers import PgServer


@pytest.fixture
def empty_database(pg_server: PgServer) -> Iterator[str]:
    name = f"conveyor_empty_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(pg_server.admin_url, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    yield pg_server.url_for(name)
    with psycopg.connect(pg_server.admin_url, autocommit=True) as conn:
        conn.execute(sql.SQL("DROP DATABASE {} WITH (FORCE)").format(sql.Identifier(name)))


def test_migrate_is_idempotent_and_records_versions(empty_database: str) -> None:
    with psycopg.connect(empty_database, autocommit=True) as conn:
        assert not migrate.is_current(conn, "conveyor")
        assert migrate.migrate(conn, "conveyor") == [name for _, name in migrate.migrations()]
        assert migrate.migrate(conn, "conveyor") == []
        assert migrate.is_current(conn, "conveyor")
        assert migrate.applied_versions(conn, "conveyor") == {v for v, _ in migrate.migrations()}


def test_concurrent_migrations_apply_once(empty_database: str) -> None:
    results: list[list[str]] = []
    errors: list[BaseException] = []
    barrier = threading.Barrier(4)

    def run() -> None:
        try:
            with psycopg.connect(empty_database, autocommit=True) as conn:
                barrier.wait()
                results.append(migrate.migrate(conn, "conveyor"))
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=run) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert sorted(len(r) for r in results) == [0, 0, 0, len(migrate.migrations())]


def test_schema_name_is_configurable(empty_database: str) -> None:
    with psycopg.connect(empty_database, autocommit=True) as conn:
        migrate.migrate(conn, "pipelines_b")
        conn.execute("INSERT INTO pipelines_b.pipeline_runs (input) VALUES ('{}')")
        assert conn.execute("SELECT count(*) FROM pipelines_b.pipeline_runs").fetchone() == (1,)
        assert conn.execute("SELECT to_regclass('conveyor.pipeline_runs')").fetchone() == (None,)
