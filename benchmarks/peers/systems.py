"""The peers as configured for the comparison: how to start each one's driver, create its schema
and empty its tables, and what each configuration is called in the figures."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from psycopg import conninfo

from benchmarks.harness import BenchDatabase
from benchmarks.peers.install import NODE_PREFIX, VENV, Installed

HERE = Path(__file__).resolve().parent
_LIBPQ = {"host": "PGHOST", "port": "PGPORT", "user": "PGUSER", "password": "PGPASSWORD"}


@dataclass(frozen=True)
class Peer:
    name: str  # pgqueuer, graphile-worker: what --peer selects
    version: str
    setting: str  # the configuration, as the figures name it
    driver: tuple[str, ...]  # the command of its driver script
    work_options: tuple[str, ...]  # after `work MODE`
    schema: tuple[str, ...]  # the command that creates its schema (PG* variables set)
    tables: str  # its job tables, emptied before each measure
    queued: str  # SQL: jobs waiting that no worker has taken yet
    settle_table: str  # vacuumed and analyzed after a backlog is queued
    extra_env: tuple[tuple[str, str], ...] = ()

    @property
    def label(self) -> str:
        return f"{self.name} {self.version}, {self.setting}"

    def env(self, db: BenchDatabase) -> dict[str, str]:
        """The environment of its processes: the libpq variables of the bench database."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
        params = conninfo.conninfo_to_dict(db.url)
        env.update({var: str(params[key]) for key, var in _LIBPQ.items() if params.get(key)})
        env["PGDATABASE"] = str(params["dbname"])
        env.update(self.extra_env)
        return env

    def command(self, *args: str) -> list[str]:
        return [*self.driver, *args]

    def work(self, mode: str) -> list[str]:
        return self.command("work", mode, *self.work_options)


def pgqueuer(installed: Installed, batch: int) -> Peer:
    """One QueueManager over an asyncpg pool (min 5, max 20), `batch` jobs per dequeue."""
    return Peer(
        name="pgqueuer",
        version=installed.pgqueuer_version,
        setting=f"batch {batch}" + (" (its default)" if batch == 10 else ""),
        driver=(str(installed.python), str(HERE / "pgqueuer_runner.py")),
        work_options=("--batch", str(batch)),
        schema=(str(VENV / "bin" / "pgq"), "install"),
        tables="pgqueuer, pgqueuer_log, pgqueuer_statistics",
        queued="SELECT count(*) FROM pgqueuer WHERE status = 'queued'",
        settle_table="pgqueuer",
    )


def graphile(installed: Installed) -> Peer:
    """One worker process with the settings of graphile-worker's performance page."""
    assert installed.node is not None and installed.graphile_version is not None
    return Peer(
        name="graphile-worker",
        version=installed.graphile_version,
        setting="24 concurrent jobs, local queue 500, batched completion",
        driver=(installed.node, str(HERE / "graphile.mjs")),
        work_options=(),
        schema=(
            installed.node,
            str(NODE_PREFIX / "node_modules" / ".bin" / "graphile-worker"),
            "--schema-only",
        ),
        tables="graphile_worker._private_jobs, graphile_worker._private_job_queues",
        queued="SELECT count(*) FROM graphile_worker._private_jobs WHERE locked_at IS NULL",
        settle_table="graphile_worker._private_jobs",
        extra_env=(("PEERS_NODE_PREFIX", str(NODE_PREFIX)),),
    )


def command(peer: str, figure: int) -> str:
    """The command that measures one figure of one peer (beside conveyor) alone."""
    return f"python -m benchmarks.peers --figure {figure} --peer {peer}"
