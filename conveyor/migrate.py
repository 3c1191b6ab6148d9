"""Applies the numbered migrations in sql/ under an advisory lock; idempotent."""

from __future__ import annotations

import random
import re
import time
from importlib import resources
from typing import Any

import psycopg
from psycopg import sql

from conveyor.queries import for_schema, read_sql

_MIGRATION_FILE = re.compile(r"^(\d{3})_[a-z0-9_]+\.sql$")
# Tries of the whole migration when PostgreSQL breaks a deadlock by aborting it.
_DEADLOCK_TRIES = 5


def migrations() -> list[tuple[int, str]]:
    """(version, filename) of every migration shipped in the package, in order."""
    found = []
    for entry in resources.files("conveyor.sql").iterdir():
        match = _MIGRATION_FILE.match(entry.name)
        if match:
            found.append((int(match.group(1)), entry.name))
    return sorted(found)


def latest_version() -> int:
    return migrations()[-1][0]


def applied_versions(conn: psycopg.Connection[Any], schema: str) -> set[int]:
    exists = conn.execute(
        "SELECT to_regclass(%s) IS NOT NULL", (f"{schema}.schema_migrations",)
    ).fetchone()
    if not exists or not exists[0]:
        return set()
    rows = conn.execute(
        sql.SQL("SELECT version FROM {}.schema_migrations").format(sql.Identifier(schema))
    ).fetchall()
    return {row[0] for row in rows}


def migrate(conn: psycopg.Connection[Any], schema: str) -> list[str]:
    """Apply what is missing in one transaction; return the filenames applied.

    The transaction-scoped advisory lock makes a second `conveyor migrate` started at the same
    time wait, then find everything applied and do nothing. Migrations lock tables one after
    another, and running workers lock them in their own orders (a claim under limits reads
    `limits` before it writes `pipeline_runs`), so a migration that locks both may be the
    transaction PostgreSQL aborts to break a deadlock: it is tried again, from the start.
    """
    tries = 1
    while True:
        try:
            return _migrate_once(conn, schema)
        except psycopg.errors.DeadlockDetected:
            if tries >= _DEADLOCK_TRIES:
                raise
        time.sleep(random.uniform(0.1, 0.5) * tries)
        tries += 1


def _migrate_once(conn: psycopg.Connection[Any], schema: str) -> list[str]:
    applied: list[str] = []
    schema_id = sql.Identifier(schema)
    with conn.transaction():
        conn.execute("SELECT pg_advisory_xact_lock(hashtext('conveyor.migrate.' || %s))", (schema,))
        conn.execute(sql.SQL("CREATE SCHEMA IF NOT EXISTS {}").format(schema_id))
        conn.execute(
            sql.SQL(
                "CREATE TABLE IF NOT EXISTS {}.schema_migrations ("
                " version integer PRIMARY KEY, name text NOT NULL,"
                " applied_at timestamptz NOT NULL DEFAULT now())"
            ).format(schema_id)
        )
        done = applied_versions(conn, schema)
        granted = roles_granted(conn, schema)
        for version, filename in migrations():
            if version in done:
                continue
            conn.execute(for_schema(read_sql(filename), schema))
            conn.execute(
                sql.SQL("INSERT INTO {}.schema_migrations (version, name) VALUES (%s, %s)").format(
                    schema_id
                ),
                (version, filename),
            )
            applied.append(filename)
        if applied and granted:
            # Tables and functions a migration adds are granted like those before them.
            conn.execute(for_schema(read_sql("roles.sql"), schema))
    return applied


def roles_granted(conn: psycopg.Connection[Any], schema: str) -> bool:
    """Whether the schema was granted to the least-privilege roles (`conveyor migrate
    --roles`): every later migration then grants them what it adds."""
    # Granted to the roles by name: a schema any role may use (PUBLIC's USAGE) is not one
    # that opted in.
    row = conn.execute(
        "SELECT count(DISTINCT a.grantee) = 2"
        "  FROM pg_catalog.pg_namespace n"
        "  CROSS JOIN LATERAL pg_catalog.aclexplode(n.nspacl) a"
        "  JOIN pg_catalog.pg_roles r ON r.oid = a.grantee"
        " WHERE n.nspname = %s AND a.privilege_type = 'USAGE'"
        "   AND r.rolname IN ('conveyor_worker', 'conveyor_reader')",
        (schema,),
    ).fetchone()
    return bool(row and row[0])


def is_current(conn: psycopg.Connection[Any], schema: str) -> bool:
    return {version for version, _ in migrations()} <= applied_versions(conn, schema)


def apply_roles(conn: psycopg.Connection[Any], schema: str) -> None:
    """Create the optional least-privilege roles of sql/roles.sql and grant them on schema."""
    with conn.transaction():
        conn.execute("SELECT pg_advisory_xact_lock(hashtext('conveyor.migrate.' || %s))", (schema,))
        conn.execute(for_schema(read_sql("roles.sql"), schema))


_OBSERVER_TRIGGERS = ("pipeline_events_insert", "pipeline_events_update")


def set_observer(conn: psycopg.Connection[Any], schema: str, *, enabled: bool) -> None:
    """The observer channel costs a NOTIFY per changed run; a database may switch it off."""
    action = sql.SQL("ENABLE" if enabled else "DISABLE")
    table = sql.Identifier(schema, "pipeline_runs")
    with conn.transaction():
        for trigger in _OBSERVER_TRIGGERS:
            conn.execute(
                sql.SQL("ALTER TABLE {} {} TRIGGER {}").format(
                    table, action, sql.Identifier(trigger)
                )
            )


def observer_enabled(conn: psycopg.Connection[Any], schema: str) -> bool:
    row = conn.execute(
        "SELECT bool_and(tgenabled <> 'D') FROM pg_trigger"
        " WHERE tgrelid = to_regclass(%s) AND tgname = ANY(%s)",
        (f"{schema}.pipeline_runs", list(_OBSERVER_TRIGGERS)),
    ).fetchone()
    return bool(row and row[0])
