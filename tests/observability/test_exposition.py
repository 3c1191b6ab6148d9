"""/metrics reads every process's metric files, even while a process is creating one."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from conveyor.supervisor.http import metrics_exposition
from tests.helpers import ROOT


def test_a_file_a_starting_process_has_not_sized_yet_does_not_fail_the_scrape(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    worker = (
        "from conveyor import metrics; metrics.COMPLETED.labels('p', 's').inc(3);"
        " metrics.IN_FLIGHT.labels('p', 's').set(2)"
    )
    env = {"PROMETHEUS_MULTIPROC_DIR": str(tmp_path), "PATH": "/usr/bin:/bin"}
    for _ in range(2):  # two processes, added up
        subprocess.run([sys.executable, "-c", worker], cwd=ROOT, env=env, check=True, timeout=60)
    # What a process that has just opened its file, and not yet sized it, leaves for a reader.
    (tmp_path / "counter_4242.db").touch()
    (tmp_path / "gauge_livesum_4242.db").touch()
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(tmp_path))

    body, content_type = metrics_exposition()

    text = body.decode()
    assert content_type.startswith("text/plain")
    assert 'conveyor_runs_completed_total{pipeline="p",stage="s"} 6.0' in text
    assert 'conveyor_runs_in_flight{pipeline="p",stage="s"} 4.0' in text
