"""Shared pieces of the benchmarks: a fresh database on the embedded server, conveyor processes."""

from __future__ import annotations

import os
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg
from psycopg import conninfo, sql

from conveyor import _embedded, migrate
from conveyor.settings import Settings

ROOT = Path(__file__).resolve().parent.parent
PIPELINES = {"single": "benchmarks.pipelines:single", "three": "benchmarks.pipelines:three"}


@dataclass
class BenchDatabase:
    admin_url: str
    name: str

    @property
    def url(self) -> str:
        return conninfo.make_conninfo(self.admin_url, dbname=self.name)

    @classmethod
    @contextmanager
    def create(cls) -> Iterator[BenchDatabase]:
        """A fresh, migrated database on the embedded server (CONVEYOR_DATA_DIR or the default)."""
        admin = os.environ.get("CONVEYOR_DATABASE_URL") or _embedded.ensure_running(
            Settings.from_env().data_dir
        )
        name = f"conveyor_bench_{uuid.uuid4().hex[:8]}"
        with psycopg.connect(admin, autocommit=True) as conn:
            conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
        db = cls(admin, name)
        try:
            with db.connect() as conn:
                migrate.migrate(conn, "conveyor")
            yield db
        finally:
            with psycopg.connect(admin, autocommit=True) as conn:
                conn.execute(
                    sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
                )

    def connect(self) -> psycopg.Connection[Any]:
        return psycopg.connect(self.url, autocommit=True)

    def wait_idle_workers(self, conn: psycopg.Connection[Any], count: int) -> None:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            row = conn.execute("SELECT count(*) FROM conveyor.workers WHERE waiting").fetchone()
            if row and row[0] >= count:
                return
            time.sleep(0.05)
        raise RuntimeError(f"{count} idle workers did not appear")

    def wait_started(self, conn: psycopg.Connection[Any], run_id: Any) -> float:
        """The handler start time of a run's first event, once it exists."""
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            row = conn.execute(
                "SELECT extract(epoch FROM started_at)::float8 FROM conveyor.run_events"
                " WHERE run_id = %s ORDER BY id LIMIT 1",
                (run_id,),
            ).fetchone()
            if row:
                return float(row[0])
            time.sleep(0.001)
        raise RuntimeError(f"run {run_id} never started")


def start_conveyor(
    db: BenchDatabase, args: list[str], *, pipeline: str, **env: str
) -> subprocess.Popen[bytes] | Any:
    environment = {
        **{k: v for k, v in os.environ.items() if not k.startswith("CONVEYOR_")},
        "CONVEYOR_DATABASE_URL": db.url,
        "CONVEYOR_PIPELINE": PIPELINES[pipeline],
        "CONVEYOR_LOG_LEVEL": "warning",
        "PYTHONPATH": str(ROOT),
        **env,
    }
    return _Process(
        subprocess.Popen([sys.executable, "-m", "conveyor", *args], env=environment, cwd=ROOT)
    )


@dataclass
class _Process:
    popen: subprocess.Popen[bytes]

    @property
    def pid(self) -> int:
        return self.popen.pid

    def stop(self) -> None:
        self.popen.terminate()
        try:
            self.popen.wait(30)
        except subprocess.TimeoutExpired:
            self.popen.kill()
            self.popen.wait()
