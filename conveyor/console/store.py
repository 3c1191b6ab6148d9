"""The console's database side: a small pool, its named statements, and the CLI's actions.

Calls are synchronous (psycopg's pool) and run in Starlette's thread pool: the actions are the
very functions `conveyor retry` and `conveyor cancel` call, which take a plain connection.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any
from uuid import UUID

import psycopg
from psycopg.rows import dict_row
from psycopg_pool import ConnectionPool

from conveyor import queries, runs
from conveyor.console import decoding
from conveyor.console.filters import RunFilter
from conveyor.console.overview import (
    EXACT_COUNT_CAP,
    OVERVIEW_PARAMETERS,
    Overview,
    build_overview,
)
from conveyor.pipeline import Pipeline

# A console query that runs away is cancelled rather than left holding a connection.
STATEMENT_TIMEOUT = "10s"
BULK_PAGE = 500
_COUNT_RUNS = "SELECT count(*) AS runs FROM (SELECT 1 FROM @schema@.pipeline_runs LIMIT %(cap)s) r"


class Store:
    """`read_only` (actions off): every transaction is BEGIN READ ONLY, so nothing the console
    sends can write. Settings are per transaction (SET LOCAL, READ ONLY), never per session:
    behind a transaction-mode pooler a session setting would leak to other clients."""

    def __init__(self, url: str, schema: str, pipeline: Pipeline, *, read_only: bool) -> None:
        self.schema = schema
        self.pipeline = pipeline
        self.sql = queries.load(schema)
        self.read_only = read_only
        self.pool: ConnectionPool[psycopg.Connection[Any]] = ConnectionPool(
            url,
            min_size=1,
            max_size=4,
            open=False,
            name="conveyor-console",
            kwargs={
                # Unprepared: every statement is planned with its values, so the NULL filters of
                # console_runs fold away and the keyset condition stays an index condition.
                "prepare_threshold": None,
                "application_name": f"conveyor-console:{socket.gethostname()}-{os.getpid()}"[:63],
            },
            configure=self._configure,
            check=ConnectionPool.check_connection,  # a server restart costs no failed page
            timeout=10.0,
        )

    def _configure(self, conn: psycopg.Connection[Any]) -> None:
        conn.read_only = self.read_only
        decoding.register(conn)  # 'infinity', deep JSON: shown, never a failed page

    @contextmanager
    def _transaction(self) -> Iterator[psycopg.Connection[Any]]:
        """One transaction on a pooled connection, committed on leaving (rolled back on error)."""
        with self.pool.connection() as conn:
            conn.execute(f"SET LOCAL statement_timeout = '{STATEMENT_TIMEOUT}'")
            yield conn

    def open(self) -> None:
        self.pool.open(wait=False)

    def close(self) -> None:
        self.pool.close()

    def overview(self) -> Overview:
        with self._transaction() as conn, conn.cursor(row_factory=dict_row) as cur:
            row = cur.execute(self.sql["console_overview"], OVERVIEW_PARAMETERS).fetchone()
            assert row is not None
            # Before the first ANALYZE the estimate is 0 whatever the table holds: a small
            # estimate is replaced by a count that reads at most one row more than the cap.
            if int(row["runs_estimate"] or 0) <= EXACT_COUNT_CAP:
                row["runs_counted"] = self._count_runs(cur)
            # Flow control's keys: a few rows, read as tuples.
            row["limits"] = conn.execute(self.sql["limit_states"]).fetchall()
        return build_overview(row, self.pipeline)

    def _count_runs(self, cur: psycopg.Cursor[dict[str, Any]]) -> int:
        """Exact up to EXACT_COUNT_CAP; one more means "more than that"."""
        statement = queries.for_schema(_COUNT_RUNS, self.schema)
        counted = cur.execute(statement, {"cap": EXACT_COUNT_CAP + 1}).fetchone()
        return int(counted["runs"]) if counted else 0

    def runs(self, run_filter: RunFilter, limit: int) -> list[dict[str, Any]]:
        with self._transaction() as conn, conn.cursor(row_factory=dict_row) as cur:
            return cur.execute(
                self.sql["console_runs"], {**run_filter.parameters(self.pipeline), "limit": limit}
            ).fetchall()

    def run(self, run_id: UUID) -> tuple[dict[str, Any] | None, list[dict[str, Any]]]:
        """`get_run` and `run_history`, read with this store's loaders (decoding.register)."""
        with self._transaction() as conn, conn.cursor(row_factory=dict_row) as cur:
            run = cur.execute(self.sql["get_run"], {"id": run_id}).fetchone()
            history = cur.execute(self.sql["run_history"], {"id": run_id}).fetchall() if run else []
        return run, history

    def children(self, run_id: UUID) -> dict[str, Any]:
        """`runs.children_of`: counted by status, the first CHILDREN_SHOWN listed."""
        with self._transaction() as conn:
            return runs.children_of(conn, self.schema, run_id)

    def retry(self, run_id: UUID, actor: str, from_stage: str | None) -> bool:
        with self._transaction() as conn:
            return runs.retry(conn, self.schema, self.pipeline, run_id, actor, from_stage)

    def cancel(self, run_id: UUID, actor: str) -> bool:
        with self._transaction() as conn:
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
            page_filter = page_filter.after(page[-1]["listed_at"], page[-1]["id"])
