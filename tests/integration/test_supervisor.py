"""The supervisor's probes and metrics, maintenance leadership, and the operator commands."""

from __future__ import annotations

import json
import os
import re
import signal
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from typing import Any

import psycopg
import pytest

from benchmarks.procstat import children as children_of
from conveyor import SubmitError, submit
from tests.helpers import ConveyorProcess, conveyor_command, fetch_all, scalar, wait_until

CHAIN = {"CONVEYOR_PIPELINE": "tests.pipelines:chain"}
Start = Callable[..., ConveyorProcess]


def _port(process: ConveyorProcess) -> int:
    def found() -> int | None:
        match = re.search(r'"serving /metrics, /healthz, /readyz".*?"port": (\d+)', process.log())
        match = match or re.search(r'"port": (\d+).*?"serving /metrics', process.log())
        return int(match.group(1)) if match else None

    return wait_until(found, 30, "the metrics port in the log")


def _get(port: int, path: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode()


def _sample(metrics_text: str, name: str, **labels: str) -> float:
    total = 0.0
    for line in metrics_text.splitlines():
        if not line.startswith(name + "{") and not line.startswith(name + " "):
            continue
        if all(f'{k}="{v}"' in line for k, v in labels.items()):
            total += float(line.rsplit(" ", 1)[1])
    return total


def test_probes_and_metrics_from_every_worker_process(
    database_url: str, start_conveyor: Start
) -> None:
    supervisor = start_conveyor(
        "run", CONVEYOR_STAGES="one=2,two=2,three=1", CONVEYOR_SWEEP_INTERVAL="0.5", **CHAIN
    )
    port = _port(supervisor)
    wait_until(lambda: _get(port, "/readyz")[0] == 200, 30, "readiness")
    code, body = _get(port, "/healthz")
    assert code == 200
    assert json.loads(body)["processes"] == {"one": 2, "two": 2, "three": 1, "maintenance": 1}

    with psycopg.connect(database_url, autocommit=True) as conn:
        conn.execute(
            "INSERT INTO conveyor.pipeline_runs (pipeline, input)"
            " SELECT 'chain', jsonb_build_object('n', n) FROM generate_series(1, 200) n"
        )
    wait_until(
        lambda: (
            scalar(
                database_url, "SELECT count(*) FROM conveyor.pipeline_runs WHERE status = 'DONE'"
            )
            == 200
        ),
        60,
        "200 runs DONE",
    )

    def completed(stage: str) -> float:
        return _sample(_get(port, "/metrics")[1], "conveyor_runs_completed_total", stage=stage)

    # Counters from two forked processes of a stage add up in one scrape.
    wait_until(
        lambda: all(completed(s) == 200 for s in ("one", "two", "three")), 10, "completions counted"
    )
    workers_of_one = scalar(
        database_url,
        "SELECT count(DISTINCT worker) FROM conveyor.run_events WHERE stage = 'one'",
    )
    assert workers_of_one == 2

    # A killed worker is restarted, counted, and health comes back.
    victim = children_of(supervisor.pid)[0]
    os.kill(victim, signal.SIGKILL)
    wait_until(
        lambda: _sample(_get(port, "/metrics")[1], "conveyor_worker_restarts_total") == 1,
        30,
        "the restart counted",
    )
    wait_until(lambda: _get(port, "/healthz")[0] == 200, 30, "healthy again")
    assert len(children_of(supervisor.pid)) == 6

    supervisor.signal(signal.SIGTERM)
    assert supervisor.wait(60) == 0


def test_one_maintenance_leader_across_supervisors_and_takeover(
    database_url: str, start_conveyor: Start
) -> None:
    first = start_conveyor("run", CONVEYOR_STAGES="one=1", CONVEYOR_SWEEP_INTERVAL="0.5", **CHAIN)
    second = start_conveyor("run", CONVEYOR_STAGES="one=1", CONVEYOR_SWEEP_INTERVAL="0.5", **CHAIN)

    def leaders() -> list[Any]:
        with psycopg.connect(database_url, autocommit=True) as conn:
            return conn.execute(
                "SELECT a.pid FROM pg_locks l JOIN pg_stat_activity a USING (pid)"
                " WHERE l.locktype = 'advisory' AND l.granted AND a.datname = current_database()"
                " AND a.application_name LIKE 'conveyor-leader:%%'"
            ).fetchall()

    wait_until(lambda: len(leaders()) == 1, 30, "a leader")
    wait_until(lambda: '"leading maintenance"' in first.log() + second.log(), 30, "leader log")
    leader, follower = (
        (first, second) if '"leading maintenance"' in first.log() else (second, first)
    )
    assert '"leading maintenance"' not in follower.log()

    leader.signal(signal.SIGKILL)  # the supervisor; its maintenance child follows it out
    leader.wait(30)
    wait_until(lambda: '"leading maintenance"' in follower.log(), 30, "the follower takes over")
    assert len(leaders()) == 1

    # The new leader rescues: a run leased to a dead worker comes back and completes.
    with psycopg.connect(database_url, autocommit=True) as conn:
        conn.execute(
            "INSERT INTO conveyor.pipeline_runs (pipeline, status, input, attempt, lease_owner,"
            " lease_expires_at) VALUES ('chain', 'ONE_RUNNING', '{\"n\": 5}', 1, 'one-1-dead',"
            " now() - interval '1 second')"
        )
    wait_until(
        lambda: scalar(database_url, "SELECT status FROM conveyor.pipeline_runs") == "ONE_DONE",
        30,
        "the orphaned run through stage one",
    )
    transitions = scalar(
        database_url, "SELECT array_agg(to_status ORDER BY id) FROM conveyor.run_events"
    )
    assert transitions == ["NEW", "ONE_DONE"]  # the rescue, then the one completion


def test_cancel_interrupts_a_run_in_flight_and_refuses_its_result(
    database_url: str, start_conveyor: Start
) -> None:
    worker = start_conveyor("run", CONVEYOR_LEASE="3", **CHAIN)
    with psycopg.connect(database_url, autocommit=True) as conn:
        run_id = conn.execute(
            "INSERT INTO conveyor.pipeline_runs (pipeline, input)"
            " VALUES ('chain', '{\"n\": 1, \"sleep\": 30}') RETURNING id"
        ).fetchone()[0]  # type: ignore[index]
    wait_until(
        lambda: scalar(database_url, "SELECT status FROM conveyor.pipeline_runs") == "ONE_RUNNING",
        30,
        "the run in flight",
    )
    result = conveyor_command(database_url, "cancel", str(run_id), **CHAIN)
    assert result.returncode == 0, result.stderr
    wait_until(lambda: '"run taken away; interrupting"' in worker.log(), 10, "the interruption")
    assert scalar(database_url, "SELECT status FROM conveyor.pipeline_runs") == "CANCELLED"
    events = scalar(
        database_url, "SELECT array_agg(to_status ORDER BY id) FROM conveyor.run_events"
    )
    assert events == ["CANCELLED"]
    # Cancelling a finished run is refused.
    again = conveyor_command(database_url, "cancel", str(run_id), **CHAIN)
    assert again.returncode == 1


def test_retry_failed_runs_from_their_stage_or_a_named_one(
    database_url: str, start_conveyor: Start
) -> None:
    start_conveyor("run", CONVEYOR_SWEEP_INTERVAL="0.5", **CHAIN)
    with psycopg.connect(database_url, autocommit=True) as conn:
        poison = conn.execute(
            "INSERT INTO conveyor.pipeline_runs (pipeline, input)"
            " VALUES ('chain', '{\"n\": 1, \"always_fail\": true}') RETURNING id"
        ).fetchone()[0]  # type: ignore[index]
    wait_until(
        lambda: scalar(database_url, "SELECT status FROM conveyor.pipeline_runs") == "FAILED",
        30,
        "the run FAILED",
    )
    result = conveyor_command(database_url, "retry", "--failed", **CHAIN)
    assert result.returncode == 0 and "retrying 1 failed runs" in result.stdout
    wait_until(
        lambda: (
            scalar(
                database_url, "SELECT count(*) FROM conveyor.run_events WHERE to_status = 'FAILED'"
            )
            == 2
        ),
        30,
        "the retried run FAILED again",
    )
    assert scalar(database_url, "SELECT attempt FROM conveyor.pipeline_runs") == 3

    # Re-run from a later stage keeps the outputs of the stages before it.
    with psycopg.connect(database_url, autocommit=True) as conn:
        conn.execute(
            'UPDATE conveyor.pipeline_runs SET outputs = \'{"one": {"n": 1}}\' WHERE id = %s',
            (poison,),
        )
    result = conveyor_command(database_url, "retry", str(poison), "--stage", "two", **CHAIN)
    assert result.returncode == 0, result.stderr
    wait_until(
        lambda: scalar(database_url, "SELECT status FROM conveyor.pipeline_runs") == "DONE",
        30,
        "the run DONE from stage two",
    )
    outputs = scalar(database_url, "SELECT outputs FROM conveyor.pipeline_runs")
    assert outputs["one"] == {"n": 1} and outputs["three"]["seen"] == 1


def test_prune_deletes_old_finished_runs_and_their_history(database_url: str) -> None:
    with psycopg.connect(database_url, autocommit=True) as conn:
        conn.execute(
            "INSERT INTO conveyor.pipeline_runs (pipeline, status, finished_at)"
            " SELECT 'chain', 'DONE', now() - interval '8 days' FROM generate_series(1, 2500)"
        )
        conn.execute(
            "INSERT INTO conveyor.pipeline_runs (pipeline, status, finished_at)"
            " VALUES ('chain', 'DONE', now() - interval '1 day'), ('chain', 'NEW', NULL)"
        )
        conn.execute(
            "INSERT INTO conveyor.run_events (run_id, pipeline, to_status)"
            " SELECT id, pipeline, status FROM conveyor.pipeline_runs"
        )
    result = conveyor_command(database_url, "prune", "--older-than", "7d", **CHAIN)
    assert result.returncode == 0, result.stderr
    assert "pruned 2500 finished runs" in result.stdout
    assert scalar(database_url, "SELECT count(*) FROM conveyor.pipeline_runs") == 2
    assert scalar(database_url, "SELECT count(*) FROM conveyor.run_events") == 2
    bad = conveyor_command(database_url, "prune", "--older-than", "soon", **CHAIN)
    assert bad.returncode == 2 and "--older-than" in bad.stderr


def test_submission_idempotency_priority_delay_and_size_limit(
    database_url: str, start_conveyor: Start
) -> None:
    with psycopg.connect(database_url, autocommit=True) as conn:
        first = submit(conn, {"n": 1}, pipeline="chain", idempotency_key="order-42")
        again = submit(conn, {"n": 2}, pipeline="chain", idempotency_key="order-42")
        assert (again.id, again.created, first.created) == (first.id, False, True)
        low = submit(conn, {"n": 3}, pipeline="chain", priority=-5)
        high = submit(conn, {"n": 4}, pipeline="chain", priority=10)
        later = submit(conn, {"n": 5}, pipeline="chain", delay_seconds=3600)
        with pytest.raises(SubmitError, match="limit"):
            submit(conn, {"blob": "x" * 1_100_000}, pipeline="chain")
    start_conveyor("run", CONVEYOR_STAGES="one=1", CONVEYOR_ONE_CONCURRENCY="1", **CHAIN)
    wait_until(
        lambda: scalar(database_url, "SELECT count(*) FROM conveyor.run_events") == 3,
        30,
        "three runs through stage one",
    )
    order = scalar(database_url, "SELECT array_agg(run_id ORDER BY id) FROM conveyor.run_events")
    assert order == [high.id, first.id, low.id]
    assert (
        scalar(database_url, "SELECT status FROM conveyor.pipeline_runs WHERE id = %s", (later.id,))
        == "NEW"
    )


def test_a_killed_workers_runs_are_rescued_within_seconds_not_a_lease(
    database_url: str, start_conveyor: Start
) -> None:
    """SIGKILL (what the out-of-memory killer sends) leaves the worker's leases behind: its
    replacement ends them, and the rescue frees the runs well before the leases would expire."""
    lease = 20.0  # extended every third: 13-20 s of it are left when the worker dies
    supervisor = start_conveyor(
        "run",
        CONVEYOR_STAGES="one=1",
        CONVEYOR_SWEEP_INTERVAL="1",
        CONVEYOR_LEASE=str(lease),
        CONVEYOR_DRAIN_TIMEOUT="1",  # the runs sleep a minute: no waiting for them at the end
        **CHAIN,
    )
    with psycopg.connect(database_url, autocommit=True) as conn:
        conn.execute(
            "INSERT INTO conveyor.pipeline_runs (pipeline, input)"
            " SELECT 'chain', jsonb_build_object('n', n, 'sleep', 60) FROM generate_series(1, 3) n"
        )
    held = "SELECT count(*) FROM conveyor.pipeline_runs WHERE status = 'ONE_RUNNING'"
    wait_until(lambda: scalar(database_url, held) == 3, 30, "three runs in flight")
    # A new maintenance leader rescues nothing for half a lease (the registry may be empty
    # after a server crash): the leader of a running system has led for longer than that.
    wait_until(lambda: '"leading maintenance"' in supervisor.log(), 30, "a maintenance leader")
    time.sleep(lease / 2 + 1)
    owner, pid = fetch_all(
        database_url,
        "SELECT w.worker_id, w.pid FROM conveyor.workers w"
        " WHERE w.worker_id = (SELECT DISTINCT lease_owner FROM conveyor.pipeline_runs)",
    )[0]
    os.kill(pid, signal.SIGKILL)
    rescued = "SELECT count(*) FROM conveyor.pipeline_runs WHERE rescues = 1"
    wait_until(lambda: scalar(database_url, rescued) == 3, lease / 3, "the three runs rescued")
    errors = {
        row[0] for row in fetch_all(database_url, "SELECT last_error FROM conveyor.pipeline_runs")
    }
    assert errors == {f"lease expired: worker {owner} stopped beating"}
    assert '"ended the leases of a worker process that died"' in supervisor.log()
    assert f'"dead_pid": {pid}, "runs": 3' in supervisor.log()
