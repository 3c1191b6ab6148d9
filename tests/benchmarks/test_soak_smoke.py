"""The soak benchmark works: a tiny soak writes its samples and charts, prints its summary, and
leaves nothing behind. No speed is asserted (the soak itself is run by hand, for an hour)."""

from __future__ import annotations

import csv
import os
import re
import subprocess
import sys
from pathlib import Path

import psycopg

from benchmarks.soak_charts import CHARTS
from tests.helpers import ROOT, PgServer

PNG = b"\x89PNG\r\n\x1a\n"


def test_a_tiny_soak_writes_samples_and_charts_and_leaves_nothing(
    pg_server: PgServer, tmp_path: Path
) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CONVEYOR_")}
    env.update({"CONVEYOR_DATABASE_URL": pg_server.admin_url, "PYTHONPATH": str(ROOT)})
    done = subprocess.run(
        [sys.executable, "-m", "benchmarks.soak", "--tiny", "--out", str(tmp_path)],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert done.returncode == 0, done.stderr

    with (tmp_path / "samples.csv").open(newline="") as file:
        samples = list(csv.DictReader(file))
    assert samples
    columns = {column for chart in CHARTS for column, _ in chart.lines}
    assert columns <= set(samples[0]), columns - set(samples[0])
    for chart in CHARTS:
        assert (tmp_path / f"{chart.name}.png").read_bytes().startswith(PNG), chart.name
    assert re.search(r"^throughput: [\d,]+ runs/s in the first \d+ s", done.stdout, re.M)
    assert re.search(r"^pipeline_runs: .* at the end;", done.stdout, re.M)

    with psycopg.connect(pg_server.admin_url, autocommit=True) as conn:
        left = conn.execute(
            "SELECT datname FROM pg_database WHERE datname LIKE 'conveyor_bench_%'"
        ).fetchall()
        connected = conn.execute(
            "SELECT pid FROM pg_stat_activity WHERE application_name LIKE 'conveyor%'"
        ).fetchall()
    assert left == []
    assert connected == []
