"""The benchmark harness works: one figure in tiny mode, and it leaves nothing behind.

No speed is asserted here (figures go to `make bench`); only that a figure comes out, that the
harness drops its database and stops its worker, and that the pure-SQL ceiling replays the
protocol's own statements.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys

import psycopg
import pytest

from benchmarks import ceiling, pipelines
from conveyor import queries
from tests.helpers import ROOT, PgServer


def _tiny(pg_server: PgServer, module: str, *args: str) -> str:
    """Run one benchmark command in tiny mode; what it printed. It must leave no database and
    no process connected behind it."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("CONVEYOR_")}
    env.update({"CONVEYOR_DATABASE_URL": pg_server.admin_url, "PYTHONPATH": str(ROOT)})
    done = subprocess.run(
        [sys.executable, "-m", module, *args, "--tiny"],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    with psycopg.connect(pg_server.admin_url, autocommit=True) as conn:
        left = conn.execute(
            "SELECT datname FROM pg_database WHERE datname LIKE 'conveyor_bench_%'"
        ).fetchall()
        connected = conn.execute(
            "SELECT pid FROM pg_stat_activity WHERE application_name LIKE 'conveyor%'"
        ).fetchall()
    assert left == []
    assert connected == []
    return done.stdout


def test_one_figure_in_tiny_mode_and_nothing_left_behind(pg_server: PgServer) -> None:
    printed = _tiny(pg_server, "benchmarks.throughput", "--single")
    assert re.search(r"^\(a\) one worker process, batch 50: [\d,]+ runs/s", printed, re.M)


def test_runs_with_large_inputs_in_tiny_mode(pg_server: PgServer) -> None:
    printed = _tiny(pg_server, "benchmarks.throughput", "--single", "--input-kb", "4")
    assert re.search(
        r"^\(a\) one worker process, batch 50, 4 kB inputs: [\d,]+ runs/s", printed, re.M
    )


def test_claim_sizes_side_by_side_in_tiny_mode(pg_server: PgServer) -> None:
    printed = _tiny(pg_server, "benchmarks.throughput", "--versus-batch", "200")
    assert re.search(
        r"^\(a\) at batch 200 beside batch 50: [\d,]+ runs/s against [\d,]+, ratio \S+",
        printed,
        re.M,
    )


@pytest.mark.parametrize(
    ("flags", "refusal"),
    [
        (["--three", "--batch", "500"], "--batch goes with --single"),
        (["--three", "--input-kb", "16"], "--input-kb goes with --single"),
        (["--single", "--input-kb", "100"], "--input-kb goes with --single, from 1 to 64"),
    ],
)
def test_a_claim_size_or_an_input_size_goes_with_one_figure_only(
    flags: list[str], refusal: str
) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "benchmarks.throughput", *flags],
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2
    assert refusal in done.stderr


def test_the_ceiling_replays_the_protocol_statements_with_literals() -> None:
    stage = pipelines.single.stages[0]
    script = ceiling.script(pipelines.single, stage, batch=50)
    assert "%(" not in script
    for name in ("claim_batch", "complete_if_leased"):
        # every line of the statement is in the script, only its parameters written in
        for line in queries.load("conveyor")[name].splitlines():
            pattern = re.escape(line.strip())
            pattern = re.sub(r"%\\\(\w+\\\)s", r"\\S+", pattern)
            assert re.search(pattern, script), (name, line)
    assert "LIMIT 50" in script
    assert "r.status = 'ONLY_RUNNING' AND r.lease_owner = 'ceiling-only-:client_id'" in script


def test_the_latency_floor_runs_the_chain_on_the_workers_statements(pg_server: PgServer) -> None:
    printed = _tiny(pg_server, "benchmarks.latency", "--chain")
    # Every run went through the three stages by hand-offs (the loops take nothing else) and
    # was heard DONE.
    assert re.search(r"^\(d\)'s floor: .*: p50 [\d.]+ ms, p99 [\d.]+ ms", printed, re.M)


def test_end_to_end_latency_against_its_floor_in_one_run(pg_server: PgServer) -> None:
    printed = _tiny(pg_server, "benchmarks.latency", "--versus-floor")
    # Both chains heard every run DONE, block after block, and the ratio comes out.
    assert re.search(
        r"^\(d\) p50 [\d.]+ ms, .*; \(d\) / floor: p50 [\d.]+, p99 [\d.]+ .*10 runs each, in 2"
        r" interleaved blocks",
        printed,
        re.M,
    )
    # ... with what each chain's stage processes spent on the CPU per run.
    cpu = re.search(
        r"^CPU per run, the three stage processes together: workers (\d+) us, floor (\d+) us",
        printed,
        re.M,
    )
    assert cpu and int(cpu[1]) > 0 and int(cpu[2]) > 0, printed


def test_ingest_and_bulk_submit_in_tiny_mode(pg_server: PgServer) -> None:
    printed = _tiny(pg_server, "benchmarks.ingest")
    assert re.search(r"^\(h\) wake-up trigger on/off: [\d.]+ with the observer off", printed, re.M)
    assert re.search(
        r"^bulk submit, COPY of 2,000 runs in one transaction: [\d,]+ runs/s", printed, re.M
    )


def test_fan_out_in_tiny_mode(pg_server: PgServer) -> None:
    printed = _tiny(pg_server, "benchmarks.fan_out")
    # The join saw every child (the benchmark checks it), and each figure came out.
    assert re.search(r"^\(a\) fan-out of 50 no-op children, 3 child processes", printed, re.M)
    assert re.search(r"^  children: [\d,]+ runs/s \(50 in ", printed, re.M)
    assert re.search(r"^  join: started -?[\d.]+ ms after the last child finished", printed, re.M)
    for width in (20, 50):
        assert re.search(
            rf"^  width {width}: children [\d,]+ runs/s, plain [\d,]+ runs/s, ratio [\d.]+$",
            printed,
            re.M,
        )
