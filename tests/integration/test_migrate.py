from __future__ import annotations

import threading
import uuid
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest
from psycopg import sql

from conveyor import migrate
from tests.helpers import PgServer, scalar, wait_until


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


def test_observer_channel_carries_each_change_and_can_be_switched_off(database_url: str) -> None:
    import json

    with (
        psycopg.connect(database_url, autocommit=True) as listener,
        psycopg.connect(database_url, autocommit=True) as writer,
    ):
        listener.execute("LISTEN pipeline_events")
        assert migrate.observer_enabled(writer, "conveyor")
        run_id = writer.execute(
            "INSERT INTO conveyor.pipeline_runs (input) VALUES ('{}') RETURNING id"
        ).fetchone()[0]  # type: ignore[index]
        writer.execute("UPDATE conveyor.pipeline_runs SET status = 'ANALYZING'")
        writer.execute("UPDATE conveyor.pipeline_runs SET priority = 3")  # no status change
        heard = [json.loads(n.payload) for n in listener.notifies(timeout=1, stop_after=3)]
        assert heard == [
            {"id": str(run_id), "status": "NEW", "operation": "INSERT"},
            {"id": str(run_id), "status": "ANALYZING", "operation": "UPDATE"},
        ]
        migrate.set_observer(writer, "conveyor", enabled=False)
        assert not migrate.observer_enabled(writer, "conveyor")
        writer.execute("INSERT INTO conveyor.pipeline_runs (input) VALUES ('{}')")
        assert list(listener.notifies(timeout=0.5)) == []
        migrate.set_observer(writer, "conveyor", enabled=True)
        assert migrate.observer_enabled(writer, "conveyor")


def test_observer_sends_one_notification_per_changed_run_of_a_statement(database_url: str) -> None:
    import json

    with (
        psycopg.connect(database_url, autocommit=True) as listener,
        psycopg.connect(database_url, autocommit=True) as writer,
    ):
        listener.execute("LISTEN pipeline_events")
        ids = [
            row[0]
            for row in writer.execute(
                "INSERT INTO conveyor.pipeline_runs (input) SELECT '{}' FROM generate_series(1, 3)"
                " RETURNING id"
            ).fetchall()
        ]
        # One statement: two runs change status, the third only its priority.
        writer.execute(
            "UPDATE conveyor.pipeline_runs"
            " SET status = CASE WHEN id = %s THEN status ELSE 'ANALYZING' END, priority = 1",
            (ids[2],),
        )
        writer.execute("UPDATE conveyor.pipeline_runs SET priority = 2")  # no status change
        heard = [json.loads(n.payload) for n in listener.notifies(timeout=1, stop_after=6)]
    inserted = [h for h in heard if h["operation"] == "INSERT"]
    updated = [h for h in heard if h["operation"] == "UPDATE"]
    assert sorted(h["id"] for h in inserted) == sorted(str(i) for i in ids)
    assert {h["status"] for h in inserted} == {"NEW"}
    assert sorted(h["id"] for h in updated) == sorted(str(i) for i in ids[:2])
    assert {h["status"] for h in updated} == {"ANALYZING"}
    assert len(heard) == 5


def _migrate_up_to(conn: psycopg.Connection[Any], schema: str, last: int) -> None:
    """The schema as an older conveyor left it: the migrations up to `last` only."""
    from conveyor.queries import for_schema, read_sql

    conn.execute(sql.SQL("CREATE SCHEMA {}").format(sql.Identifier(schema)))
    conn.execute(
        sql.SQL(
            "CREATE TABLE {}.schema_migrations (version integer PRIMARY KEY, name text NOT NULL,"
            " applied_at timestamptz NOT NULL DEFAULT now())"
        ).format(sql.Identifier(schema))
    )
    for version, filename in migrate.migrations():
        if version <= last:
            conn.execute(for_schema(read_sql(filename), schema))
            conn.execute(
                sql.SQL("INSERT INTO {}.schema_migrations (version, name) VALUES (%s, %s)").format(
                    sql.Identifier(schema)
                ),
                (version, filename),
            )


def test_a_schema_granted_to_the_roles_has_what_later_migrations_add_granted(
    empty_database: str,
) -> None:
    with psycopg.connect(empty_database, autocommit=True) as conn:
        migrate.migrate(conn, "conveyor")
        migrate.apply_roles(conn, "conveyor")  # the roles exist
        _migrate_up_to(conn, "upgraded", 11)  # before flow control's tables and functions
        # What an older `conveyor migrate --roles` granted, in part: the schema and its tables.
        conn.execute(
            "GRANT USAGE ON SCHEMA upgraded TO conveyor_worker, conveyor_reader;"
            " GRANT SELECT ON ALL TABLES IN SCHEMA upgraded TO conveyor_worker, conveyor_reader"
        )
        assert migrate.roles_granted(conn, "upgraded")
        assert migrate.migrate(conn, "upgraded")
        granted = conn.execute(
            "SELECT has_table_privilege('conveyor_worker', 'upgraded.limits', 'INSERT'),"
            " has_table_privilege('conveyor_reader', 'upgraded.limits', 'SELECT'),"
            " has_table_privilege('conveyor_reader', 'upgraded.limits', 'INSERT'),"
            " has_function_privilege('conveyor_worker',"
            "                        'upgraded.limit_room(text[], integer)', 'EXECUTE')"
        ).fetchone()
        assert granted == (True, True, False, True)


def test_a_schema_never_granted_to_the_roles_is_not_granted_by_migrating(
    empty_database: str,
) -> None:
    with psycopg.connect(empty_database, autocommit=True) as conn:
        migrate.migrate(conn, "granted")
        migrate.apply_roles(conn, "granted")  # the roles exist: another schema uses them
        _migrate_up_to(conn, "private", 11)
        assert not migrate.roles_granted(conn, "private")
        assert migrate.migrate(conn, "private")
        assert not migrate.roles_granted(conn, "private")
        assert conn.execute(
            "SELECT has_table_privilege('conveyor_worker', 'private.limits', 'SELECT')"
        ).fetchone() == (False,)


def test_a_migration_aborted_to_break_a_deadlock_is_tried_again(empty_database: str) -> None:
    """A worker has read `limits` (a claim under limits asks limit_room first); the upgrade
    locks `pipeline_runs` (019), then waits for `limits` (020); the worker goes on to write
    `pipeline_runs`. PostgreSQL aborts the migration, which waited first, to break the
    deadlock; once the worker has committed, the migration is tried again and applies."""
    with psycopg.connect(empty_database, autocommit=True) as setup:
        _migrate_up_to(setup, "conveyor", 18)
    outcome: dict[str, Any] = {}

    def upgrade() -> None:
        with psycopg.connect(empty_database, autocommit=True) as conn:
            try:
                outcome["applied"] = migrate.migrate(conn, "conveyor")
            except psycopg.Error as exc:
                outcome["error"] = exc

    with psycopg.connect(empty_database) as worker:  # one transaction, as a grouped claim
        worker.execute("SELECT count(*) FROM conveyor.limits")
        upgrading = threading.Thread(target=upgrade)
        upgrading.start()
        wait_until(
            lambda: scalar(empty_database, "SELECT count(*) FROM pg_locks WHERE NOT granted"),
            10,
            "the upgrade waiting for the worker's lock on limits",
        )
        worker.execute("UPDATE conveyor.pipeline_runs SET priority = priority WHERE false")
        worker.commit()
    upgrading.join(60)
    assert "error" not in outcome, outcome.get("error")
    assert [name[:3] for name in outcome["applied"][:2]] == ["019", "020"]
    with psycopg.connect(empty_database) as conn:
        assert migrate.is_current(conn, "conveyor")
