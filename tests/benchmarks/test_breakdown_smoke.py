"""The breakdown benchmark works: on a server of its own with pg_stat_statements preloaded, it
names the protocol's statements and the functions and triggers they run, and removes that
server afterwards. No speed is asserted (figures come from running it by hand)."""

from __future__ import annotations

import glob
import os
import subprocess
import sys
import tempfile

from tests.helpers import ROOT


def test_a_tiny_breakdown_names_statements_and_triggers_and_leaves_no_server() -> None:
    pattern = os.path.join(tempfile.gettempdir(), "conveyor-breakdown-*")
    before = set(glob.glob(pattern))
    env = {k: v for k, v in os.environ.items() if not k.startswith("CONVEYOR_")}
    env["PYTHONPATH"] = str(ROOT)
    done = subprocess.run(
        [sys.executable, "-m", "benchmarks.breakdown", "--tiny", "--limits"],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert done.returncode == 0, done.stderr
    for name in (
        "claim_limited",
        "complete_if_leased",
        "function notify_pipeline_change()",
        "function limit_room()",
    ):
        assert name in done.stdout, done.stdout
    assert "measured by: python -m benchmarks.breakdown --limits" in done.stdout
    assert set(glob.glob(pattern)) == before
