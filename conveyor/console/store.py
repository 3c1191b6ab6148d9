"""The console's database side: a small pool, its named statements, and the CLI's actions.

Calls are synchronous (psycopg's pool) and run in Starlette's thread pool: the actions are the
very functions `conveyor retry` and `conveyor cancel` call, which take a plain connection.
"""

from __future__ import annotations

import os
import socket
from typing import Any
from uuid import UUID

import psycopg
from psycopg.rows import dict_row
from psycopg_pool import ConnectionPool

from conveyor import queries, runs
from conveyor.console.filters import RunFilter
from conveyor.console.overview import OVERVIEW_PARAMETERS, Overview, build_overview
from conveyor.pipeline import Pipeline

# A console query that runs away is cancelled rather than left holding a connection.
STATEMENT_TIMEOUT = "10s"
BULK_PAGE = 500


class Store:
    def __init__(self, url: str, schema: str, pipeline: Pipeline) -> None:
        self.schema = schema
        self.pipeline = pipeline
        self.sql = queries.load(schema)
        self.pool: ConnectionPool[psycopg.Connection[Any]] = ConnectionPool(
            url,
            min_size=1,
            max_size=4,
            open=False,
            name="conveyor-console",
            kwargs={
                "autocommit": True,
                # Unprepared: every statement is planned with its values, so the NULL filters of
                # console_runs fold away and the keyset condition stays an index condition.
                "prepare_threshold": None,
                "application_name": f"conveyor-console:{socket.gethostname()}-{os.getpid()}"[:63],
            },
            configure=_configure,
            timeout=10.0,
        )

    def open(self) -> None:
        self.pool.open(wait=False)

    def close(self) -> None:
        self.pool.close()

    def overview(self) -> Overview:
        with self.pool.connection() as conn, conn.cursor(row_factory=dict_row) as cur:
            row = cur.execute(self.sql["console_overview"], OVERVIEW_PARAMETERS).fetchone()
        assert row is not None
        return build_overview(row, self.pipeline)

    def runs(self, run_filter: RunFilter, limit: int) -> list[dict[str, Any]]:
        with self.pool.connection() as conn, conn.cursor(row_factory=dict_row) as cur:
            return cur.execute(
                self.sql["console_runs"], {**run_filter.parameters(self.pipeline), "limit": limit}
            ).fetchall()

    def run(self, run_id: UUID) -> tuple[dict[str, Any] | None, list[dict[str, Any]]]:
        with self.pool.connection() as conn:
            run = runs.get_run(conn, self.schema, run_id)
            history = runs.run_history(conn, self.schema, run_id) if run else []
        return run, history

    def retry(self, run_id: UUID, actor: str, from_stage: str | None) -> bool:
        with self.pool.connection() as conn:
            return runs.retry(conn, self.schema, self.pipeline, run_id, actor, from_stage)

    def cancel(self, run_id: UUID, actor: str) -> bool:
        with self.pool.connection() as conn:
            return runs.cancel(conn, self.schema, run_id, actor)

    def bulk(self, action: str, run_filter: RunFilter, actor: str, limit: int) -> tuple[int, bool]:
        """Apply `retry` or `cancel` to every run the filter selects, one by one through the
        same functions, up to `limit`; returns (applied, more_left)."""
        applied = 0
        page_filter = run_filter
        while True:
            page = self.runs(page_filter, BULK_PAGE)
            for row in page:
                if applied >= limit:
                    return applied, True
                if action == "retry":
                    applied += self.retry(row["id"], actor, None)
                else:
                    applied += self.cancel(row["id"], actor)
            if len(page) < BULK_PAGE:
                return applied, False
            page_filter = page_filter.after(page[-1]["created_at"], page[-1]["id"])


def _configure(conn: psycopg.Connection[Any]) -> None:
    conn.execute(f"SET statement_timeout = '{STATEMENT_TIMEOUT}'")
