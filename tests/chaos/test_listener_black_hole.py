"""The LISTEN connection goes deaf (a proxy drops every byte, the socket stays open): the
worker notices within its health check, reconnects, and is woken by notifications again."""

from __future__ import annotations

import time

import pytest
from psycopg import conninfo

from tests.chaos.conftest import RecordCounts, Supervisors
from tests.chaos.load import event_counts, submit
from tests.chaos.proxy import BlackHoleProxy, upstream_of
from tests.helpers import scalar, wait_until

WORKERS = 3
SWEEP_SECONDS = 60.0  # only a notification can wake a worker much sooner than this
CHECK_SECONDS = 1.0


def _status(url: str, run_id: object) -> str:
    return str(scalar(url, "SELECT status FROM conveyor.pipeline_runs WHERE id = %s", (run_id,)))


def _listener_backends(url: str) -> int:
    return int(
        scalar(
            url,
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()"
            " AND application_name LIKE 'conveyor-listen:%%'",
        )
    )


def _time_to_done(url: str, run_id: object, within: float, what: str) -> float:
    started = time.monotonic()
    wait_until(lambda: _status(url, run_id) == "DONE", within, what)
    return round(time.monotonic() - started, 2)


@pytest.mark.chaos
@pytest.mark.timeout(150)
def test_black_holed_listener_is_detected_reconnected_and_woken_again(
    database_url: str, supervisors: Supervisors, record_counts: RecordCounts
) -> None:
    with BlackHoleProxy(upstream_of(database_url)) as proxy:
        # Only the LISTEN connections go through the proxy; the pools connect directly.
        listen_url = conninfo.make_conninfo(
            database_url,
            host="127.0.0.1",
            port=str(proxy.port),
            sslmode="disable",
            gssencmode="disable",
        )
        supervisor = supervisors.start(
            CONVEYOR_STAGES="one=1,two=1,three=1",
            CONVEYOR_LISTEN_DATABASE_URL=listen_url,
            CONVEYOR_SWEEP_INTERVAL=str(SWEEP_SECONDS),
            CONVEYOR_LISTENER_CHECK_INTERVAL=str(CHECK_SECONDS),
            CONVEYOR_LISTENER_CHECK_TIMEOUT=str(CHECK_SECONDS),
        )

        def events(name: str) -> int:
            return event_counts(supervisor.log())[name]

        wait_until(
            lambda: (
                scalar(database_url, "SELECT count(*) FROM conveyor.workers WHERE waiting")
                == WORKERS
            ),
            60,
            "three idle workers",
        )
        wait_until(lambda: _listener_backends(database_url) == WORKERS, 30, "three listeners")
        assert proxy.connections >= WORKERS, "the listeners connect through the proxy"
        [before] = submit(database_url, 1, first=1)
        woken_before = _time_to_done(database_url, before, 20, "a run woken through the proxy")

        # Counted from here: a check that timed out earlier (a stalled loop) is no detection.
        timeouts = events("listener health check timed out; reconnecting")
        reconnects = events("listener reconnected")
        proxy.black_hole()
        holed_at = time.monotonic()
        wait_until(
            lambda: events("listener health check timed out; reconnecting") >= timeouts + WORKERS,
            30,
            "every worker to find its listener deaf",
        )
        detected_after = round(time.monotonic() - holed_at, 2)
        # While the listeners are deaf the sweep tightens: a run submitted now still finishes.
        [deaf] = submit(database_url, 1, first=2)
        done_while_deaf = _time_to_done(database_url, deaf, 20, "a run found by the sweep")

        proxy.restore()
        restored_at = time.monotonic()
        wait_until(
            lambda: events("listener reconnected") >= reconnects + WORKERS,
            30,
            "every listener back",
        )
        reconnected_at = time.monotonic()
        reconnected_after = round(reconnected_at - restored_at, 2)
        # The abandoned backends went away with their client's sockets; one listener each.
        wait_until(lambda: _listener_backends(database_url) == WORKERS, 30, "three listeners again")
        # A sweep tightened while deaf sleeps at most 1.2 s; after that only a notification
        # can wake a worker well before the 60 s sweep.
        wait_until(lambda: time.monotonic() - reconnected_at > 1.5, 5, "the short sweeps to end")
        [after] = submit(database_url, 1, first=3)
        woken_after = _time_to_done(database_url, after, 20, "a run woken after the reconnect")

    record_counts(
        listeners=WORKERS,
        detected_after_seconds=detected_after,
        health_check_timeouts=events("listener health check timed out; reconnecting"),
        reconnects=events("listener reconnected"),
        woken_before_seconds=woken_before,
        done_while_deaf_seconds=done_while_deaf,
        reconnected_after_restore_seconds=reconnected_after,
        woken_after_seconds=woken_after,
        runs=3,
        duplicates=0,
        lost=0,
    )
    assert supervisor.stop() == 0
