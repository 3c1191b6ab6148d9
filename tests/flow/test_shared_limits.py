"""Flow control held in PostgreSQL, for every worker of every pod: two `conveyor run`
supervisors, three processes each, calling a real HTTP server on loopback under one key."""

from __future__ import annotations

import signal
import time
from collections.abc import Callable
from typing import Any

from tests.flow.pipelines import MODEL
from tests.helpers import ConveyorProcess, fetch_all, scalar
from tests.llm_server import FakeLLM, Reply

FLOW = "tests.flow.pipelines:pipeline"


def _supervisors(
    start_conveyor: Callable[..., ConveyorProcess], server: FakeLLM, **env: str
) -> list[ConveyorProcess]:
    settings = {
        "CONVEYOR_PIPELINE": FLOW,
        "CONVEYOR_STAGES": "call=3",
        "CONVEYOR_SWEEP_INTERVAL": "1",
        "CONVEYOR_LOG_LEVEL": "warning",
        "FLOW_MODEL_URL": server.url + "/chat/completions",
        **env,
    }
    return [start_conveyor("run", **settings), start_conveyor("run", **settings)]


def _submit(database_url: str, runs: int) -> None:
    fetch_all(
        database_url,
        "INSERT INTO conveyor.pipeline_runs (pipeline) SELECT 'flow' FROM generate_series(1, %s)"
        " RETURNING id",
        (runs,),
    )


def _wait_done(database_url: str, runs: int, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    done = 0
    while time.monotonic() < deadline:
        done = scalar(
            database_url, "SELECT count(*) FROM conveyor.pipeline_runs WHERE status = 'DONE'"
        )
        if done == runs:
            return
        time.sleep(0.2)
    raise AssertionError(f"{done} of {runs} runs DONE after {timeout:g}s")


def _calls_in_30_seconds(model_server: FakeLLM) -> int:
    """The calls the server sees in the 30 s from the first."""
    deadline = time.monotonic() + 60
    while not model_server.requests and time.monotonic() < deadline:
        time.sleep(0.05)
    first = model_server.requests[0].at
    time.sleep(max(first + 30.5 - time.time(), 0))
    return len([request.at for request in model_server.requests if request.at < first + 30])


def test_a_cap_of_four_holds_across_two_supervisors(
    database_url: str, start_conveyor: Callable[..., ConveyorProcess], model_server: FakeLLM
) -> None:
    """18 slots (2 supervisors x 3 processes x 3 runs each), a cap of 4 on the key: the
    server never sees more than 4 requests at once, and every run is DONE, on its first try."""
    model_server.delay = 0.15
    _supervisors(start_conveyor, model_server, CONVEYOR_LIMIT_FAKE_MODEL_MAX_IN_FLIGHT="4")
    _submit(database_url, 60)
    _wait_done(database_url, 60)
    assert model_server.most_in_flight == 4
    assert len(model_server.requests) == 60
    events: list[Any] = fetch_all(
        database_url, "SELECT to_status, attempt, count(*) FROM conveyor.run_events GROUP BY 1, 2"
    )
    assert events == [("DONE", 1, 60)]


def test_places_given_back_reach_the_claims_held_back_without_a_sweep(
    database_url: str, start_conveyor: Callable[..., ConveyorProcess], model_server: FakeLLM
) -> None:
    """One place under the key, calls of 20 ms, one process per supervisor, sweeps a minute
    apart: claims find the place taken or take less than they ask, and are woken by the places
    given back. Every run is DONE long before a sweep (at least 48 s here) could have found it,
    one at a time."""
    model_server.delay = 0.02
    _supervisors(
        start_conveyor,
        model_server,
        CONVEYOR_STAGES="call=1",
        CONVEYOR_SWEEP_INTERVAL="60",
        CONVEYOR_LIMIT_FAKE_MODEL_MAX_IN_FLIGHT="1",
    )
    _submit(database_url, 20)
    _wait_done(database_url, 20, timeout=40)
    assert model_server.most_in_flight == 1


def test_requests_per_minute_hold_across_two_supervisors(
    database_url: str, start_conveyor: Callable[..., ConveyorProcess], model_server: FakeLLM
) -> None:
    """120 requests per minute, for 30 s: the server sees 60 +- 10% (a bucket holds one
    second of the rate: two at once, then one every half second)."""
    _supervisors(start_conveyor, model_server, CONVEYOR_LIMIT_FAKE_MODEL_RPM="120")
    _submit(database_url, 200)
    assert 54 <= _calls_in_30_seconds(model_server) <= 66


def test_a_429_with_retry_after_closes_the_key_for_every_worker(
    database_url: str, start_conveyor: Callable[..., ConveyorProcess], model_server: FakeLLM
) -> None:
    """The first call answers 429 with Retry-After: 2. No worker of either supervisor calls
    the key for 2 s, then they all resume; the throttled run spent no attempt."""
    model_server.push(MODEL, Reply(status=429, headers={"Retry-After": "2"}))
    _supervisors(start_conveyor, model_server, CONVEYOR_LIMIT_FAKE_MODEL_MAX_IN_FLIGHT="1")
    _submit(database_url, 8)
    _wait_done(database_url, 8)
    arrivals = [request.at for request in model_server.requests]
    assert len(arrivals) == 9  # the 429, then one call per run
    assert arrivals[1] - arrivals[0] >= 2.0
    assert arrivals[1] - arrivals[0] < 4.0  # resumed when it opened, not a sweep or more later
    events: list[Any] = fetch_all(
        database_url,
        "SELECT to_status, attempt, error FROM conveyor.run_events WHERE error IS NOT NULL",
    )
    [(to_status, attempt, error)] = events
    assert (to_status, attempt) == ("NEW", 1)
    assert error.startswith("throttled: fake:model until ")
    attempts = fetch_all(
        database_url,
        "SELECT attempt, count(*) FROM conveyor.run_events WHERE to_status = 'DONE' GROUP BY 1",
    )
    assert attempts == [(1, 8)]  # the throttled run too: waiting is not failing
    closed = scalar(
        database_url, "SELECT closed_reason FROM conveyor.limits WHERE key = 'fake:model'"
    )
    assert closed == "429"


def test_tokens_per_minute_hold_with_the_usage_the_server_reports(
    database_url: str, start_conveyor: Callable[..., ConveyorProcess], model_server: FakeLLM
) -> None:
    """Each call reserves 30 tokens and uses the 18 the server reports: 2,160 tokens per
    minute allow 120 such calls a minute, so 60 +- 10% in 30 s (the settled difference is
    given back; were it kept, 72 calls a minute would pass)."""
    _supervisors(
        start_conveyor,
        model_server,
        CONVEYOR_LIMIT_FAKE_MODEL_TPM="2160",
        FLOW_TOKEN_ESTIMATE="30",
    )
    _submit(database_url, 200)
    assert 54 <= _calls_in_30_seconds(model_server) <= 66


def test_a_holder_killed_gives_its_place_back_within_its_lease(
    database_url: str, start_conveyor: Callable[..., ConveyorProcess], model_server: FakeLLM
) -> None:
    """A cap of 1; the worker holding the place is SIGKILLed mid-call. The place comes back
    when its lease (2 s) runs out: another worker's call follows within the lease and a sweep,
    and both runs end DONE once each."""
    model_server.push(MODEL, Reply(delay=30))  # the first call hangs until the kill
    settings = {
        "CONVEYOR_PIPELINE": FLOW,
        "CONVEYOR_LEASE": "2",
        "CONVEYOR_SWEEP_INTERVAL": "1",
        "CONVEYOR_LOG_LEVEL": "warning",
        "CONVEYOR_LIMIT_FAKE_MODEL_MAX_IN_FLIGHT": "1",
        "FLOW_MODEL_URL": model_server.url + "/chat/completions",
    }
    holder = start_conveyor("worker", "--stage", "call", **settings)
    _submit(database_url, 2)
    deadline = time.monotonic() + 30
    while not model_server.requests and time.monotonic() < deadline:
        time.sleep(0.02)
    assert len(model_server.requests) == 1
    holder.signal(signal.SIGKILL)
    killed_at = time.time()
    start_conveyor("worker", "--stage", "call", **settings)
    _wait_done(database_url, 2, timeout=60)
    second = model_server.requests[1].at
    assert second - killed_at < 2 + 3  # the lease, then a sweep and the worker's start
    done = fetch_all(
        database_url,
        "SELECT run_id, count(*) FROM conveyor.run_events WHERE to_status = 'DONE' GROUP BY 1",
    )
    assert sorted(count for _run, count in done) == [1, 1]
