"""`python -m benchmarks.peers --tiny` prints every figure for conveyor and both peers, and
leaves nothing behind.

The peers are installed the way `make bench-peers` installs them (on demand, under build/peers);
if they cannot be, this fails rather than skips. No speed is asserted: tiny figures mean nothing.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import psycopg
import pytest

from tests.helpers import ROOT, PgServer

PEERS = (r"pgqueuer [\d.]+, batch 10", r"pgqueuer [\d.]+, batch 50", r"graphile-worker [\d.]+, 24")
LATENCY_PEERS = (r"pgqueuer [\d.]+, batch 10", r"graphile-worker [\d.]+, 24")
CONVEYOR_SINGLE = tuple(
    f"conveyor, batch {batch}, observer {state}" for batch in (50, 500) for state in ("on", "off")
)
RATE = r"[\d,]+"
MS = r"p50 [\d.]+ ms, p99 [\d.]+ ms"
CPU = r"worker \S+ us, its database backends \S+ us"


def _peer_processes() -> list[str]:
    """Command lines of the peers' driver processes still running."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            command = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if "benchmarks/peers/" in command:
            found.append(command)
    return found


@pytest.mark.timeout(900)
def test_every_figure_in_tiny_mode_and_nothing_left_behind(pg_server: PgServer) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CONVEYOR_")}
    env.update({"CONVEYOR_DATABASE_URL": pg_server.admin_url, "PYTHONPATH": str(ROOT)})
    done = subprocess.run(
        [sys.executable, "-m", "benchmarks.peers", "--tiny"],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=800,
    )
    assert done.returncode == 0, done.stderr
    printed = done.stdout

    def line(pattern: str) -> None:
        assert re.search(pattern, printed, re.M), (pattern, printed, done.stderr)

    for who in CONVEYOR_SINGLE:
        line(rf"^\(1\) one stage, [^:]*: {who}: {RATE} jobs/s")
        line(rf"^\(4\) CPU per job, one stage: {who}: {CPU}")
    for who in PEERS:
        line(
            rf"^\(1\) one stage, [^:]*: {who}.*: {RATE} jobs/s; conveyor/\S+ at batch 50 \S+"
            r" \(observer on\), \S+ \(observer off\); at batch 500 \S+ \(observer on\)"
        )
        line(rf"^\(3\) three stages, [^:]*: {who}.*: {RATE} runs/s; conveyor/\S+ \S+")
        line(
            rf"^\(4\) CPU per job, one stage: {who}.*: {CPU}; conveyor/\S+ at batch 50 worker"
            r" \S+ database \S+; at batch 500 worker \S+ database"
        )
        line(rf"^\(4\) CPU per run, three stages: {who}.*: {CPU}; conveyor/")
    line(rf"^\(2\) enqueue -> handler start, [^:]*: conveyor: {MS}")
    for who in LATENCY_PEERS:
        line(rf"^\(2\) enqueue -> handler start, [^:]*: {who}.*: {MS}.*; conveyor/\S+ p50 \S+")
    line(rf"^\(3\) three stages, [^:]*: conveyor, a worker process per stage: {RATE} runs/s")
    line(rf"^\(4\) CPU per run, three stages: conveyor: {CPU}")

    with psycopg.connect(pg_server.admin_url, autocommit=True) as conn:
        left = conn.execute(
            "SELECT datname FROM pg_database WHERE datname LIKE 'conveyor_bench_%'"
        ).fetchall()
        connected = conn.execute(
            "SELECT pid FROM pg_stat_activity WHERE application_name LIKE 'conveyor%'"
        ).fetchall()
    assert left == []
    assert connected == []
    assert _peer_processes() == []
