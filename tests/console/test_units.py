"""The console's pure parts: settings, filters, the overview's shape and cache, the run view."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta
from typing import Any
from uuid import uuid4

import pytest

from conveyor.console.filters import FilterError, RunFilter, decode_cursor, encode_cursor
from conveyor.console.formatting import age, number
from conveyor.console.overview import (
    EVENTS_WINDOW_SECONDS,
    FAILED_CAP,
    Overview,
    OverviewCache,
    build_overview,
)
from conveyor.console.runview import build_run_view
from conveyor.console.security import CsrfTokens
from conveyor.console.settings import DEFAULT_PORT, ConsoleSettings, is_loopback, parse_bind
from conveyor.reference import pipeline as reference
from conveyor.settings import ConfigError

NOW = datetime(2025, 1, 1, 12, 0, 0, tzinfo=UTC)


def test_default_bind_is_loopback_on_the_documented_port() -> None:
    settings = ConsoleSettings.from_env({})
    assert (settings.host, settings.port) == ("127.0.0.1", DEFAULT_PORT) == ("127.0.0.1", 8474)
    assert not settings.allow_actions and not settings.auth_required


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("127.0.0.1:9000", ("127.0.0.1", 9000)),
        (":9000", ("127.0.0.1", 9000)),
        ("[::1]:9000", ("::1", 9000)),
        ("console.internal:80", ("console.internal", 80)),
        ("0.0.0.0:0", ("0.0.0.0", 0)),
    ],
)
def test_bind_values(text: str, expected: tuple[str, int]) -> None:
    assert parse_bind("X", text) == expected


@pytest.mark.parametrize("text", ["localhost", "::1:9000", "host:port", "h:70000", "a b:1", ""])
def test_bad_bind_values_name_the_variable(text: str) -> None:
    with pytest.raises(ConfigError, match=r"^CONVEYOR_CONSOLE_BIND="):
        parse_bind("CONVEYOR_CONSOLE_BIND", text)


def test_only_loopback_addresses_count_as_loopback() -> None:
    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost")
    assert not is_loopback("0.0.0.0") and not is_loopback("::")
    assert not is_loopback("console.internal")  # a name may resolve anywhere


def test_a_public_bind_needs_credentials_or_no_auth() -> None:
    with pytest.raises(ConfigError, match=r"^--bind=.0.0.0.0:8474.*CONVEYOR_CONSOLE_USER"):
        ConsoleSettings.from_env({}, bind="0.0.0.0:8474")
    with_credentials = {"CONVEYOR_CONSOLE_USER": "ops", "CONVEYOR_CONSOLE_PASSWORD": "pw"}
    assert ConsoleSettings.from_env(with_credentials, bind="0.0.0.0:8474").auth_required
    assert ConsoleSettings.from_env({}, bind="0.0.0.0:8474", no_auth=True).host == "0.0.0.0"


@pytest.mark.parametrize(("raw", "allowed"), [("1", True), ("yes", True), ("off", False)])
def test_actions_flag(raw: str, allowed: bool) -> None:
    assert ConsoleSettings.from_env({"CONVEYOR_CONSOLE_ACTIONS": raw}).allow_actions is allowed
    assert ConsoleSettings.from_env({}, allow_actions=True).allow_actions


def test_cursor_round_trips_and_rejects_forgeries() -> None:
    run_id = uuid4()
    assert decode_cursor(encode_cursor(NOW, run_id)) == (NOW, run_id)
    for forged in ("nonsense", "bm90LWEtY3Vyc29y", encode_cursor(NOW, run_id)[:-4]):
        with pytest.raises(FilterError):
            decode_cursor(forged)


def test_filter_maps_stages_to_statuses() -> None:
    params = RunFilter.from_query({"stage": "assemble"}).parameters(reference)
    assert params["statuses"] == ["ANALYZED", "ASSEMBLING"] and params["pipeline"] == "agents"
    failed_in = RunFilter.from_query({"stage": "answer", "status": "failed"}).parameters(reference)
    assert (failed_in["statuses"], failed_in["failed_stage"]) == (["FAILED"], "answer")
    never = RunFilter.from_query({"stage": "answer", "status": "NEW"}).parameters(reference)
    assert never["statuses"] == []
    waiting = ("NEW", "ANALYZED", "CONTEXT_READY")
    bulk = RunFilter.from_query({"stage": "analyze"}).restricted_to(waiting)
    assert bulk.parameters(reference)["statuses"] == ["NEW"]
    since = RunFilter.from_query({"since": "1h"}).parameters(reference)["since"]
    assert timedelta(minutes=59) < datetime.now(UTC) - since < timedelta(minutes=61)
    with pytest.raises(FilterError, match="since"):
        RunFilter.from_query({"since": "yesterday"})
    with pytest.raises(FilterError, match="pipeline"):
        RunFilter.from_query({"pipeline": "Robert'); DROP TABLE"})


def _overview_row(**changes: Any) -> dict[str, Any]:
    row: dict[str, Any] = {
        "generated_at": NOW,
        "unfinished": [
            {"pipeline": "agents", "status": "NEW", "runs": 7, "due": 5,
             "oldest_due_seconds": 42.0, "orphaned": 0},
            {"pipeline": "agents", "status": "ANALYZING", "runs": 3, "due": 3,
             "oldest_due_seconds": 1.0, "orphaned": 2},
            {"pipeline": "crawl", "status": "FETCHED", "runs": 4, "due": 4,
             "oldest_due_seconds": 3.0, "orphaned": 0},
        ],
        "finished": [{"pipeline": "agents", "status": "DONE", "runs": 90}],
        "finished_sampled": 90,
        "finished_span_seconds": 100.0,
        "events": [
            {"pipeline": "agents", "stage": "answer", "from_status": "CONTEXT_READY",
             "to_status": "DONE", "events": 60},
            {"pipeline": "agents", "stage": "analyze", "from_status": "ANALYZING",
             "to_status": "NEW", "events": 4},
            {"pipeline": "agents", "stage": "analyze", "from_status": "ANALYZING",
             "to_status": "FAILED", "events": 1},
        ],
        "events_sampled": 65,
        "events_span_seconds": 250.0,
        "failed": [{"pipeline": "agents", "runs": FAILED_CAP + 1}],
        "workers": [
            {"worker_id": "analyze-1-aa", "pipeline": "agents", "stage": "analyze",
             "hostname": "h", "pid": 1, "started_at": "x", "heartbeat_at": "y",
             "beat_age_seconds": 0.5, "waiting": True},
        ],
        "latest": [],
        "runs_estimate": 1000,
    }  # fmt: skip
    row.update(changes)
    return row


def test_overview_is_shaped_per_stage() -> None:
    overview = build_overview(_overview_row(), reference)
    agents, crawl = overview.pipelines
    analyze, assemble, answer = agents.stages
    assert (analyze.waiting, analyze.due, analyze.oldest_due_seconds) == (7, 5, 42.0)
    assert (analyze.in_flight, analyze.orphaned) == (3, 2)
    assert (analyze.retried, analyze.failed) == (4, 1)
    assert [w.worker_id for w in analyze.workers] == ["analyze-1-aa"]
    assert assemble.waiting == 0 and assemble.workers == []
    # Fewer events than the sample: the rate is over the whole window.
    assert answer.per_minute == pytest.approx(60 * 60 / EVENTS_WINDOW_SECONDS)
    assert (agents.failed_total, agents.failed_capped) == (FAILED_CAP, True)
    assert crawl.name == "crawl" and not crawl.declared and crawl.other_statuses == {"FETCHED": 4}


def test_failed_counts_are_floors_once_the_shared_cap_is_reached() -> None:
    failed = [
        {"pipeline": "agents", "runs": 6_000},
        {"pipeline": "crawl", "runs": FAILED_CAP + 1 - 6_000},
    ]
    agents, crawl = build_overview(_overview_row(failed=failed), reference).pipelines
    assert (agents.failed_total, agents.failed_capped) == (6_000, True)
    assert crawl.failed_capped
    below = [{"pipeline": "agents", "runs": 12}]
    agents = build_overview(_overview_row(failed=below), reference).pipelines[0]
    assert (agents.failed_total, agents.failed_capped) == (12, False)


def test_a_full_sample_rates_over_the_span_it_covers() -> None:
    overview = build_overview(
        _overview_row(events_sampled=10_000, events_span_seconds=30.0), reference
    )
    assert overview.events_sample_full
    assert overview.pipelines[0].stages[2].per_minute == pytest.approx(60 * 60 / 30.0)


def test_overview_cache_runs_one_load_for_many_concurrent_viewers() -> None:
    loads = 0

    async def load() -> Overview:
        nonlocal loads
        loads += 1
        await asyncio.sleep(0.05)
        return build_overview(_overview_row(), reference)

    async def scenario() -> None:
        cache = OverviewCache(load, max_age=60.0)
        results = await asyncio.gather(*(cache.get() for _ in range(50)))
        assert all(result is results[0] for result in results)
        assert loads == 1
        await cache.get()
        assert loads == 1  # fresh: served from the cache
        await cache.refresh(older_than=0.0)
        assert loads == 2

    asyncio.run(scenario())


def test_csrf_tokens_are_bound_to_the_user_and_the_process() -> None:
    tokens = CsrfTokens()
    token = tokens.issue("ops")
    assert tokens.verify("ops", token)
    assert not tokens.verify("other", token)
    assert not CsrfTokens().verify("ops", token)  # another process (or a restart)
    assert not tokens.verify("ops", "1." + token.split(".")[1])
    assert not tokens.verify("ops", "")


def test_run_view_orders_outputs_and_times_each_attempt() -> None:
    created = NOW
    run = {
        "id": uuid4(), "pipeline": "agents", "status": "DONE", "created_at": created,
        "finished_at": created + timedelta(seconds=10), "input": {"question": "q"},
        "outputs": {"answer": {"a": 1}, "analyze": {"b": 2}, "assemble": {"c": 3}},
    }  # fmt: skip

    def event(stage: str, to: str, attempt: int, start: float, seconds: float) -> dict[str, Any]:
        started = created + timedelta(seconds=start)
        return {
            "stage": stage, "from_status": "x", "to_status": to, "attempt": attempt,
            "started_at": started, "duration_seconds": seconds,
            "created_at": started + timedelta(seconds=seconds),
        }  # fmt: skip

    history = [
        event("analyze", "NEW", 1, 1.0, 1.0),  # failed, retried after backoff
        event("analyze", "ANALYZED", 2, 4.0, 1.0),
        event("assemble", "CONTEXT_READY", 1, 5.0, 2.0),
        event("answer", "DONE", 1, 7.0, 3.0),
    ]
    view = build_run_view(run, history, reference, NOW)
    assert [stage for stage, _ in view.outputs] == ["analyze", "assemble", "answer"]
    assert [row.label for row in view.timeline] == [
        "analyze #1",
        "analyze #2",
        "assemble #1",
        "answer #1",
    ]
    second = view.timeline[1]
    assert second.queued is not None and second.running is not None
    assert second.queued.seconds == pytest.approx(2.0)  # backoff between the attempts
    assert (second.running.x, second.running.width) == (400.0, 100.0)
    times = {t.stage: t for t in view.stage_times}
    assert times["analyze"].attempts == 2 and times["analyze"].running_seconds == 2.0
    assert not view.can_retry and not view.can_cancel and view.finished


def test_numbers_and_ages_read_well() -> None:
    assert number(12345) == "12,345" and number(10_000, capped=True) == "10,000+"
    assert age(3.25) == "3.2s" and age(250) == "4m 10s" and age(7500) == "2h 05m"
    assert age(None) == "–"
