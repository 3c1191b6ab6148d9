"""The database goes away under load: the server restarted (once cleanly, once crashed), every
backend terminated."""

from __future__ import annotations

import time

import psycopg
import pytest

from tests.chaos.audit import assert_each_once, audit
from tests.chaos.conftest import RecordCounts, Supervisors
from tests.chaos.load import all_in, count_status, event_counts, submit
from tests.helpers import PgServer, scalar, wait_until

RUNS = 1500
STAGES = "one=2,two=2,three=2"
LISTENERS = 6
# A short lease: a claim whose answer was lost with the connection is rescued quickly.
FAST_RECOVERY = {"CONVEYOR_LEASE": "3", "CONVEYOR_SWEEP_INTERVAL": "1"}
SHUTDOWNS = ("fast", "immediate")


def _wait_for_progress(url: str, beyond: int, message: str) -> int:
    return int(
        wait_until(
            lambda: (done := count_status(url, "DONE")) is not None and done > beyond and done,
            90,
            message,
        )
    )


def _conveyor_backends(url: str) -> int | None:
    try:
        return int(
            scalar(
                url,
                "SELECT count(*) FROM pg_stat_activity"
                " WHERE datname = current_database() AND application_name LIKE 'conveyor%%'",
            )
        )
    except psycopg.OperationalError:
        return None


@pytest.mark.chaos
@pytest.mark.timeout(180)
def test_server_restarted_twice_under_load(
    pg_server: PgServer, database_url: str, supervisors: Supervisors, record_counts: RecordCounts
) -> None:
    if pg_server.data_dir is None:
        pytest.skip("only the embedded server can be restarted by the tests")
    supervisor = supervisors.start(CONVEYOR_STAGES=STAGES, **FAST_RECOVERY)
    wait_until(
        lambda: scalar(database_url, "SELECT count(*) FROM conveyor.workers") == LISTENERS,
        60,
        "six registered workers",
    )
    submit(database_url, RUNS, sleep=0.1)

    done_at_restart, resumed_after = [], []
    try:
        for restart in range(2):
            done = _wait_for_progress(
                database_url, RUNS * (restart + 1) // 10, f"progress before restart {restart}"
            )
            assert done < RUNS, "the load was still running when the server went down"
            retries = event_counts(supervisor.log())["listener cannot connect; retrying"]
            # The second time the server crashes: moves between stages committed without a
            # flush may be lost, and their runs must still end DONE with each stage once.
            pg_server.stop(mode=SHUTDOWNS[restart])

            def listeners_retried(enough: int = retries + 5 * LISTENERS) -> bool:
                log = supervisor.log()
                return event_counts(log)["listener cannot connect; retrying"] >= enough

            # The server stays down until every listener has failed to reconnect a few times.
            wait_until(listeners_retried, 30, "the listeners to retry while the server is down")
            pg_server.start()
            back = time.monotonic()
            done = int(
                scalar(
                    database_url,
                    "SELECT count(*) FROM conveyor.pipeline_runs WHERE status = 'DONE'",
                )
            )
            done_at_restart.append(done)
            _wait_for_progress(database_url, done, f"progress after restart {restart}")
            resumed_after.append(round(time.monotonic() - back, 1))
    finally:
        pg_server.start()  # the other tests' databases live on this server

    wait_until(lambda: all_in(database_url, RUNS, "DONE"), 120, f"{RUNS} runs DONE")
    wait_until(
        lambda: event_counts(supervisor.log())["listener reconnected"] >= 2 * LISTENERS,
        60,
        "every listener to reconnect after each restart",
    )
    events = event_counts(supervisor.log())
    result = audit(database_url)
    record_counts(
        restarts=2,
        shutdowns=list(SHUTDOWNS),
        done_at_restart=done_at_restart,
        resumed_after_seconds=resumed_after,
        listener_reconnects=events["listener reconnected"],
        database_errors_retried=events["database error; will retry"],
        worker_restarts=events["worker process died; restarting"],
        **result.counts(),
    )
    assert_each_once(result, RUNS)
    assert events["worker process died; restarting"] == 0, "no worker died of an outage"
    assert supervisor.stop() == 0


@pytest.mark.chaos
@pytest.mark.timeout(180)
def test_every_backend_terminated_repeatedly_under_load(
    database_url: str, supervisors: Supervisors, record_counts: RecordCounts
) -> None:
    supervisor = supervisors.start(CONVEYOR_STAGES=STAGES, **FAST_RECOVERY)
    wait_until(
        lambda: scalar(database_url, "SELECT count(*) FROM conveyor.workers") == LISTENERS,
        60,
        "six registered workers",
    )
    submit(database_url, RUNS, sleep=0.1)

    rounds, terminated = 5, []
    for round_ in range(rounds):
        done = _wait_for_progress(
            database_url, RUNS * (round_ + 1) // 10, f"progress before round {round_}"
        )
        assert done < RUNS, "the load was still running when the backends were terminated"
        # Back to full strength (a pool and a listener per worker) before the next blow.
        wait_until(
            lambda: (_conveyor_backends(database_url) or 0) >= 2 * LISTENERS,
            30,
            "the workers' connections to be back",
        )
        terminated.append(
            int(
                scalar(
                    database_url,
                    "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity"
                    " WHERE datname = current_database()"
                    " AND application_name LIKE 'conveyor%%'",
                )
            )
        )

    wait_until(lambda: all_in(database_url, RUNS, "DONE"), 120, f"{RUNS} runs DONE")
    wait_until(
        lambda: event_counts(supervisor.log())["listener reconnected"] >= rounds * LISTENERS,
        60,
        "every listener to reconnect after each round",
    )
    events = event_counts(supervisor.log())
    result = audit(database_url)
    record_counts(
        rounds=rounds,
        backends_terminated=terminated,
        listener_reconnects=events["listener reconnected"],
        database_errors_retried=events["database error; will retry"],
        worker_restarts=events["worker process died; restarting"],
        **result.counts(),
    )
    assert_each_once(result, RUNS)
    assert all(count >= 2 * LISTENERS for count in terminated)
    assert events["worker process died; restarting"] == 0, "no worker died of an outage"
    assert supervisor.stop() == 0
