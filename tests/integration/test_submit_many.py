"""Bulk submission with COPY: one transaction, every run or none, one wake-up per waiting stage."""

from __future__ import annotations

import math
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import psycopg
import pytest

from conveyor import runs
from conveyor.listening import wake_channel
from tests.helpers import ConveyorProcess, conveyor_command, scalar, wait_until

CHAIN = {"CONVEYOR_PIPELINE": "tests.pipelines:chain"}
Conn = psycopg.Connection[tuple[object, ...]]


def _count(url: str, where: str = "true") -> int:
    return int(scalar(url, f"SELECT count(*) FROM conveyor.pipeline_runs WHERE {where}") or 0)


def test_runs_submitted_in_bulk_commit_together_and_reach_done(
    database_url: str, conn: Conn, start_conveyor: Callable[..., ConveyorProcess]
) -> None:
    inputs = ({"n": n} for n in range(500))  # a generator: streamed, never a list
    assert runs.submit_many(conn, inputs, pipeline="chain", priority=3) == 500
    rows = conn.execute(
        "SELECT count(DISTINCT xmin::text), min(input->>'n'), max((input->>'n')::int),"
        "       bool_and(status = 'NEW' AND priority = 3 AND pipeline = 'chain')"
        "  FROM conveyor.pipeline_runs"
    ).fetchone()
    assert rows == (1, "0", 499, True)  # one transaction wrote them all

    start_conveyor("run", CONVEYOR_SWEEP_INTERVAL="0.5", **CHAIN)
    wait_until(lambda: _count(database_url, "status = 'DONE'") == 500, 90, "500 runs DONE")
    seen = conn.execute(
        "SELECT count(*) FROM conveyor.pipeline_runs WHERE outputs->'three'->>'seen' = input->>'n'"
    ).fetchone()
    assert seen == (500,)


def test_a_bulk_submit_wakes_a_waiting_stage_with_one_hand_off_and_one_wake_up(
    database_url: str, conn: Conn, start_conveyor: Callable[..., ConveyorProcess]
) -> None:
    channel = wake_channel("conveyor", "chain", "NEW")
    start_conveyor("worker", "--stage", "one", CONVEYOR_SWEEP_INTERVAL="60", **CHAIN)
    wait_until(
        lambda: scalar(database_url, "SELECT bool_or(waiting) FROM conveyor.workers") is True,
        30,
        "stage one's worker waiting",
    )
    with psycopg.connect(database_url, autocommit=True) as listener:
        listener.execute(f'LISTEN "{channel}"')
        runs.submit_many(conn, ({"n": n} for n in range(300)), pipeline="chain")
        wake_ups = []
        deadline = time.monotonic() + 2
        while time.monotonic() < deadline:
            for notify in listener.notifies(timeout=deadline - time.monotonic()):
                if not notify.payload.startswith("ping"):  # the workers' health checks
                    wake_ups.append(notify.payload)
    # 300 rows woke the stage with one run handed over and one plain wake-up, not 300 messages
    assert len(wake_ups) == 2, wake_ups
    assert sorted(payload[:4] for payload in wake_ups) == ["", "run:"]
    wait_until(lambda: _count(database_url, "status = 'ONE_DONE'") == 300, 60, "stage one done")


@pytest.mark.parametrize(
    ("bad", "reason"),
    [
        ("not an object", "run 3: input must be a JSON object"),
        ({"x": math.nan}, "run 3: input is not JSON-serialisable"),
        ({"x": object()}, "run 3: input is not JSON-serialisable"),
        ({"x": "y" * runs.MAX_INPUT_BYTES}, "run 3: input is"),
    ],
)
def test_a_bad_input_names_its_run_and_nothing_is_started(
    database_url: str, conn: Conn, bad: object, reason: str
) -> None:
    inputs = [{"n": 1}, {"n": 2}, bad, {"n": 4}]
    with pytest.raises(runs.SubmitError, match=reason):
        runs.submit_many(conn, inputs, pipeline="chain")  # type: ignore[arg-type]
    assert _count(database_url) == 0


def test_an_input_the_server_refuses_names_its_line_and_nothing_is_started(
    database_url: str, conn: Conn
) -> None:
    with pytest.raises(runs.SubmitError, match=r"line 2, column input"):
        runs.submit_many(conn, [{"n": 1}, {"x": "a\x00b"}, {"n": 3}], pipeline="chain")
    assert _count(database_url) == 0
    assert runs.submit_many(conn, [{"n": 1}], pipeline="chain") == 1  # the connection is usable


def _cli(database_url: str, *args: str, stdin: str) -> subprocess.CompletedProcess[str]:
    return conveyor_command(database_url, *args, stdin=stdin, **CHAIN)


def test_submit_many_command_reads_json_lines_from_a_file_or_stdin(
    database_url: str, tmp_path: Path
) -> None:
    path = tmp_path / "runs.jsonl"
    path.write_text('{"n": 1}\n{"n": 2}\n{"n": 3}\n')
    from_file = _cli(database_url, "submit-many", str(path), "--priority", "5", stdin="")
    assert from_file.returncode == 0, from_file.stderr
    assert from_file.stdout.strip() == "3 runs submitted"
    from_stdin = _cli(database_url, "submit-many", "-", stdin='{"n": 4}')
    assert from_stdin.stdout.strip() == "1 runs submitted", from_stdin.stderr
    assert _count(database_url, "priority = 5") == 3
    assert _count(database_url, "pipeline = 'chain'") == 4


def test_submit_many_command_refuses_a_bad_line_with_one_line_and_exit_2(
    database_url: str,
) -> None:
    for stdin, error in (
        ('{"n": 1}\n{"n": 2,}\n{"n": 3}\n', "run 2: not JSON: Expecting property name"),
        ('{"n": 1}\n\n{"n": 3}\n', "run 2: a blank line, not a JSON object"),
        ('{"n": 1}\n[2]\n', "run 2: input must be a JSON object"),
    ):
        result = _cli(database_url, "submit-many", "-", stdin=stdin)
        assert result.returncode == 2
        [line] = result.stderr.strip().splitlines()
        assert line.startswith(f"conveyor: error: {error}"), line
        assert _count(database_url) == 0
