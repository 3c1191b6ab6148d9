"""The failures users fear most are silent: a LISTEN connection that never came back, wake-ups
that stopped arriving. Their metrics must move when they happen."""

from __future__ import annotations

import time
from collections.abc import Callable

import psycopg
import pytest
from psycopg import conninfo, sql

from tests.helpers import ConveyorProcess, PgServer, scalar, wait_until
from tests.observability.prom import http_get, metrics_port, sample, scrape

CHAIN = {"CONVEYOR_PIPELINE": "tests.pipelines:chain"}


def _value(port: int, name: str, **labels: str) -> float | None:
    return sample(scrape(port), name, **labels)


@pytest.mark.timeout(120)
def test_a_cut_listener_shows_in_the_connected_gauge_and_the_reconnect_counter(
    database_url: str, pg_server: PgServer, start_conveyor: Callable[..., ConveyorProcess]
) -> None:
    supervisor = start_conveyor(
        "run", CONVEYOR_STAGES="one=2", CONVEYOR_LISTENER_CHECK_INTERVAL="0.5", **CHAIN
    )
    port = metrics_port(supervisor)
    connected = ("conveyor_listeners_connected", {"pipeline": "chain", "stage": "one"})
    reconnects = ("conveyor_listener_reconnects_total", {"stage": "one"})
    heard = ("conveyor_listener_last_notification_timestamp_seconds", {"stage": "one"})
    wait_until(lambda: _value(port, connected[0], **connected[1]) == 2, 30, "2 listeners up")
    assert _value(port, reconnects[0], **reconnects[1]) == 0

    name = conninfo.conninfo_to_dict(database_url)["dbname"]
    dbname = sql.Identifier(str(name))
    with psycopg.connect(pg_server.admin_url, autocommit=True) as conn:
        # New connections are refused, so the listeners cannot come straight back.
        conn.execute(sql.SQL("ALTER DATABASE {} ALLOW_CONNECTIONS false").format(dbname))
        try:
            conn.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                " WHERE datname = %s AND application_name LIKE 'conveyor-listen:%%'",
                (name,),
            )
            wait_until(
                lambda: _value(port, connected[0], **connected[1]) == 0, 30, "listeners down"
            )
            assert http_get(f"http://127.0.0.1:{port}/readyz")[0] == 503
            silent_since = _value(port, heard[0], **heard[1])
            assert silent_since is not None and silent_since < time.time()
        finally:
            conn.execute(sql.SQL("ALTER DATABASE {} ALLOW_CONNECTIONS true").format(dbname))

    wait_until(lambda: _value(port, connected[0], **connected[1]) == 2, 30, "listeners back")
    wait_until(lambda: _value(port, reconnects[0], **reconnects[1]) == 2, 10, "2 reconnects")
    # Back, each has heard from the server again (its connect, then its pings).
    wait_until(
        lambda: (_value(port, heard[0], **heard[1]) or 0) > (silent_since or 0),
        10,
        "the last-heard timestamp moving again",
    )


@pytest.mark.timeout(120)
def test_with_the_wake_up_trigger_disabled_runs_are_found_by_the_sweep(
    database_url: str, start_conveyor: Callable[..., ConveyorProcess]
) -> None:
    supervisor = start_conveyor(
        "run", CONVEYOR_STAGES="one=2", CONVEYOR_SWEEP_INTERVAL="1", **CHAIN
    )
    port = metrics_port(supervisor)
    labels = {"pipeline": "chain", "stage": "one"}
    wait_until(
        lambda: _value(port, "conveyor_listeners_connected", **labels) == 2, 30, "listeners up"
    )

    def settle_idle() -> None:
        """Both workers waiting (trigger armed), their post-idle grace claim behind them."""
        wait_until(
            lambda: (
                scalar(database_url, "SELECT count(*) FROM conveyor.workers WHERE waiting") == 2
            ),
            30,
            "both workers waiting",
        )
        time.sleep(0.3)

    def insert_and_finish(count: int) -> None:
        before = scalar(database_url, "SELECT count(*) FROM conveyor.pipeline_runs")
        with psycopg.connect(database_url, autocommit=True) as conn:
            conn.execute(
                "INSERT INTO conveyor.pipeline_runs (pipeline, input)"
                " SELECT 'chain', jsonb_build_object('n', n) FROM generate_series(1, %s) n",
                (count,),
            )
        wait_until(
            lambda: (
                scalar(
                    database_url,
                    "SELECT count(*) FROM conveyor.pipeline_runs WHERE status = 'ONE_DONE'",
                )
                == before + count
            ),
            30,
            f"{count} runs through stage one",
        )

    # With the trigger, idle workers are woken by a notification.
    settle_idle()
    insert_and_finish(5)
    wait_until(
        lambda: (_value(port, "conveyor_notifications_received_total", **labels) or 0) >= 1,
        10,
        "a wake-up counted",  # written a moment after it is heard (WRITE_DELAY)
    )

    with psycopg.connect(database_url, autocommit=True) as conn:
        conn.execute("ALTER TABLE conveyor.pipeline_runs DISABLE TRIGGER wake_waiting_workers")
    settle_idle()
    notified = _value(port, "conveyor_notifications_received_total", **labels)
    swept = _value(port, "conveyor_sweep_pickups_total", **labels) or 0
    insert_and_finish(5)
    # Every one of them was found by a sweep, and no wake-up arrived.
    wait_until(
        lambda: _value(port, "conveyor_sweep_pickups_total", **labels) == swept + 5,
        10,
        "5 sweep pick-ups",
    )
    assert _value(port, "conveyor_notifications_received_total", **labels) == notified
