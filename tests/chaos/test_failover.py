"""Failover under load: a primary and a synchronous streaming standby, workers on a multi-host
URL (`target_session_attrs=read-write`). Once the primary is crashed, once it is left up but
read-only (a demoted primary); each time the standby is promoted and more runs are submitted
to it."""

from __future__ import annotations

import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from uuid import UUID

import psycopg
import pytest

from conveyor import migrate
from tests.chaos.audit import assert_each_once, audit
from tests.chaos.conftest import RecordCounts, Supervisors
from tests.chaos.load import count_status, log_events, submit
from tests.chaos.replication import Node, Pair, demote_read_only, start_pair
from tests.helpers import ConveyorProcess, fetch_all, scalar, wait_until

DATABASE = "conveyor_failover"
RUNS_BEFORE = 1000  # submitted to the first primary
RUNS_AFTER = 1000  # submitted to the promoted standby
STAGES = "one=2,two=2,three=2"
WORKERS = 6
SETTINGS = {
    "CONVEYOR_STAGES": STAGES,
    # A short lease: a claim or a move the failover lost is rescued within seconds.
    "CONVEYOR_LEASE": "3",
    "CONVEYOR_SWEEP_INTERVAL": "1",
    "CONVEYOR_MAX_RESCUES": "10",
}
# How long the workers may take to be on the new primary, counted from its promotion.
MOVE_BOUND_SECONDS = 30.0


@pytest.fixture
def pair() -> Iterator[Pair]:
    started = start_pair()
    try:
        with psycopg.connect(started.primary.url(), autocommit=True) as conn:
            conn.execute(f"CREATE DATABASE {DATABASE}")
        with psycopg.connect(started.primary.url(DATABASE), autocommit=True) as conn:
            migrate.migrate(conn, "conveyor")
        yield started
    finally:
        started.stop()
        shutil.rmtree(started.base, ignore_errors=True)


@pytest.fixture
def workers(pair: Pair, tmp_path: Path) -> Iterator[Supervisors]:
    """Supervisors on the multi-host URL; stopped before the servers are (fixture order)."""
    started = Supervisors(pair.multi_host_url(DATABASE), tmp_path)
    yield started
    started.cleanup()


def _backends(node: Node, pattern: str, *, older_than: float = 0.0) -> int | None:
    """Connections of this test's database whose application_name matches, or None while the
    server is down."""
    try:
        return int(
            scalar(
                node.url(DATABASE),
                "SELECT count(*) FROM pg_stat_activity"
                " WHERE datname = current_database() AND application_name LIKE %s"
                " AND backend_start <= now() - make_interval(secs => %s)",
                (pattern, older_than),
            )
        )
    except psycopg.OperationalError:
        return None


def _done_ids(node: Node) -> set[UUID]:
    rows = fetch_all(
        node.url(DATABASE), "SELECT id FROM conveyor.pipeline_runs WHERE status = 'DONE'"
    )
    return {row[0] for row in rows}


def _start_under_load(pair: Pair, workers: Supervisors) -> tuple[ConveyorProcess, int]:
    """The workers up on the primary, RUNS_BEFORE runs submitted, a fifth of them DONE."""
    supervisor = workers.start(**SETTINGS)
    primary_url = pair.primary.url(DATABASE)
    wait_until(
        lambda: _backends(pair.primary, "conveyor-listen:%") == WORKERS,
        60,
        "every worker listening on the primary",
    )
    submit(primary_url, RUNS_BEFORE, sleep=0.1)
    done = wait_until(
        lambda: (
            (count := count_status(primary_url, "DONE")) and count >= RUNS_BEFORE // 5 and count
        ),
        90,
        "a fifth of the runs DONE",
    )
    assert done < RUNS_BEFORE, "the load was still running at the failover"
    return supervisor, int(done)


def _moved(pair: Pair, old_primary_up: bool) -> bool:
    """Every worker listens on the new primary, and nothing of conveyor is left on the old."""
    on_new = _backends(pair.standby, "conveyor-listen:%") == WORKERS
    # Every new connection tries the old primary first and leaves it within milliseconds
    # (libpq's read-write check): those are not connections left behind.
    left_on_old = _backends(pair.primary, "conveyor%", older_than=1.0) if old_primary_up else 0
    return on_new and not left_on_old


def _finish(
    pair: Pair,
    supervisor: ConveyorProcess,
    acknowledged: set[UUID],
    record_counts: RecordCounts,
    **counts: object,
) -> None:
    """Every run DONE once on the new primary, and no run acknowledged DONE before the failover
    lost."""
    runs = RUNS_BEFORE + RUNS_AFTER
    new_url = pair.standby.url(DATABASE)
    wait_until(lambda: count_status(new_url, "DONE") == runs, 120, f"{runs} runs DONE")
    lost_done = acknowledged - _done_ids(pair.standby)
    events = log_events(supervisor.log())
    names = [str(event.get("event")) for event in events]
    result = audit(new_url)
    record_counts(
        **counts,
        acknowledged_done=len(acknowledged),
        acknowledged_done_lost=len(lost_done),
        refused_read_only=sum(
            1 for event in events if "read-only transaction" in str(event.get("error", ""))
        ),
        database_errors_retried=names.count("database error; will retry"),
        listener_reconnects=names.count("listener reconnected"),
        worker_restarts=names.count("worker process died; restarting"),
        **result.counts(),
    )
    assert_each_once(result, runs)
    # Synchronous replication: a transition that ended a run waited for the standby's flush.
    assert not lost_done, f"{len(lost_done)} runs acknowledged DONE were lost"
    assert names.count("worker process died; restarting") == 0, "no worker died of the failover"
    assert supervisor.stop() == 0


@pytest.mark.chaos
@pytest.mark.timeout(240)
def test_primary_crashed_and_standby_promoted_under_load(
    pair: Pair, workers: Supervisors, record_counts: RecordCounts
) -> None:
    supervisor, done_at_failover = _start_under_load(pair, workers)
    acknowledged = _done_ids(pair.primary)
    pair.primary.stop("immediate")
    # The standby is promoted once every listener has failed to reconnect (the primary is
    # gone, the standby refuses read-write sessions), as a failover tool takes seconds.
    wait_until(
        lambda: (
            sum(
                1
                for event in log_events(supervisor.log())
                if event.get("event") == "listener cannot connect; retrying"
            )
            >= WORKERS
        ),
        30,
        "the listeners to retry while no server takes writes",
    )
    pair.standby.promote()
    promoted = time.monotonic()
    submit(pair.standby.url(DATABASE), RUNS_AFTER, first=RUNS_BEFORE + 1, sleep=0.1)
    wait_until(
        lambda: _moved(pair, old_primary_up=False),
        MOVE_BOUND_SECONDS,
        "every worker on the new primary",
    )
    moved_after = round(time.monotonic() - promoted, 1)
    _finish(
        pair,
        supervisor,
        acknowledged,
        record_counts,
        failover="primary crashed (immediate stop)",
        done_at_failover=done_at_failover,
        moved_after_seconds=moved_after,
    )


@pytest.mark.chaos
@pytest.mark.timeout(240)
def test_primary_left_read_only_and_standby_promoted_under_load(
    pair: Pair, workers: Supervisors, record_counts: RecordCounts
) -> None:
    supervisor, done_at_failover = _start_under_load(pair, workers)
    # The old primary keeps running and keeps the workers' connections, refusing writes.
    demote_read_only(pair.primary)
    pair.wait_for_replay()
    acknowledged = _done_ids(pair.primary)
    pair.standby.promote()
    promoted = time.monotonic()
    submit(pair.standby.url(DATABASE), RUNS_AFTER, first=RUNS_BEFORE + 1, sleep=0.1)
    try:
        wait_until(
            lambda: _moved(pair, old_primary_up=True),
            MOVE_BOUND_SECONDS,
            "every worker to leave the read-only old primary for the new one",
        )
    finally:
        print(
            "failover: backends on the old primary",
            _backends(pair.primary, "conveyor%"),
            "listeners on the new primary",
            _backends(pair.standby, "conveyor-listen:%"),
            "runs DONE on the new primary",
            count_status(pair.standby.url(DATABASE), "DONE"),
        )
    moved_after = round(time.monotonic() - promoted, 1)
    _finish(
        pair,
        supervisor,
        acknowledged,
        record_counts,
        failover="primary left up read-only",
        done_at_failover=done_at_failover,
        moved_after_seconds=moved_after,
    )
