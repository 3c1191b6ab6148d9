"""The console's pure parts: settings, filters, the overview's shape and cache, the run view."""

from __future__ import annotations

import asyncio
import base64
from datetime import UTC, datetime, timedelta
from typing import Any
from uuid import UUID, uuid4

import pytest

from conveyor.console.context import to_jsonable
from conveyor.console.decoding import DeepJSON, OutOfRange, load_json
from conveyor.console.filters import (
    FilterError,
    RunFilter,
    decode_cursor,
    encode_cursor,
    first_id_at,
)
from conveyor.console.formatting import age, duration, number, short_id, timestamp
from conveyor.console.live import MAX_IDS_PER_MESSAGE, LiveHub, run_id_of
from conveyor.console.overview import (
    EVENTS_WINDOW_SECONDS,
    EXACT_COUNT_CAP,
    FAILED_CAP,
    Overview,
    OverviewCache,
    build_overview,
)
from conveyor.console.runview import build_run_view
from conveyor.console.security import CsrfTokens, host_of, host_refusal
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


def test_a_routed_completion_counts_for_its_stage() -> None:
    events = [
        # analyze sent these past assemble, straight to the answer stage
        {"pipeline": "agents", "stage": "analyze", "from_status": "NEW",
         "to_status": "CONTEXT_READY", "events": 25},
        {"pipeline": "agents", "stage": "analyze", "from_status": "NEW",
         "to_status": "ANALYZED", "events": 5},
        {"pipeline": "agents", "stage": "analyze", "from_status": "ANALYZING",
         "to_status": "NEW", "events": 2},
    ]  # fmt: skip
    analyze = build_overview(_overview_row(events=events), reference).pipelines[0].stages[0]
    assert (analyze.completed, analyze.retried, analyze.failed) == (30, 2, 0)


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


def test_observer_payloads_are_read_only_while_a_browser_streams() -> None:
    """A busy pipeline notifies thousands of times a second: nobody streaming, or a message
    that says `all` already, and the console does not read them."""

    async def load() -> Overview:
        return build_overview(_overview_row(), reference)

    async def scenario() -> None:
        hub = LiveHub("postgresql://unused", OverviewCache(load, max_age=60.0))
        hub.note_change("not json")
        hub.note_change(f'{{"id": "{uuid4()}", "status": "NEW"}}')
        assert hub.malformed == 0 and not hub._wake.is_set()
        stream = hub.stream()
        await anext(stream)  # a browser streams from here on
        hub.note_change("not json")
        assert hub.malformed == 1
        for _ in range(MAX_IDS_PER_MESSAGE + 1):
            hub.note_change(f'{{"id": "{uuid4()}", "status": "NEW"}}')
        assert hub._wake.is_set() and hub._everything_changed
        hub.note_change("not json")  # the next message says `all`: not read
        assert hub.malformed == 1
        await stream.aclose()
        assert hub.subscribers == 0

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


def test_run_view_counts_children_and_waits_only_while_unfinished() -> None:
    parent_id, child_id = uuid4(), uuid4()
    run = {
        "id": parent_id, "pipeline": "fan", "status": "SPLIT_WAITING", "created_at": NOW,
        "finished_at": None, "input": {}, "outputs": {}, "children_pending": 2,
        "parent_id": None, "child_index": None,
    }  # fmt: skip
    found = {
        "total": 5,
        "by_status": {"DONE": 3, "PART": 2},
        "first": [{"index": 0, "id": child_id, "status": "DONE"}],
    }
    children = build_run_view(run, [], reference, NOW, found).children
    assert children is not None
    assert (children.total, children.more, children.waiting_for) == (5, 4, 2)
    assert children.by_status == [("DONE", 3), ("PART", 2)]
    assert [c["id"] for c in children.listed] == [child_id]
    finished = {**run, "status": "FAILED", "finished_at": NOW}
    moved_on = build_run_view(finished, [], reference, NOW, found).children
    assert moved_on is not None and moved_on.waiting_for == 0
    none = {"total": 0, "by_status": {}, "first": []}
    assert build_run_view(run, [], reference, NOW, none).children is None
    assert build_run_view(run, [], reference, NOW).children is None

    child = build_run_view({**run, "parent_id": parent_id, "child_index": 3}, [], reference, NOW)
    assert (child.parent_id, child.child_index) == (parent_id, 3)


def test_numbers_and_ages_read_well() -> None:
    assert number(12345) == "12,345" and number(10_000, capped=True) == "10,000+"
    assert age(3.25) == "3.2s" and age(250) == "4m 10s" and age(7500) == "2h 05m"
    assert age(None) == "–"


def test_a_bulk_action_under_an_empty_filter_selects_no_status() -> None:
    waiting = ("NEW", "ANALYZED", "CONTEXT_READY")
    for query, only in (
        ({"stage": "answer", "status": "NEW"}, ("FAILED",)),
        ({"stage": "answer", "status": "NEW"}, waiting),
        ({"stage": "analyze", "status": "DONE"}, waiting),
        ({"status": "DONE"}, waiting),
    ):
        bulk = RunFilter.from_query(query).restricted_to(only)
        assert bulk.parameters(reference)["statuses"] == [], query
    unfiltered = RunFilter.from_query({}).restricted_to(waiting)
    assert unfiltered.parameters(reference)["statuses"] == list(waiting)


@pytest.mark.parametrize(
    "query",
    [
        {"since": "99999999999999w"},
        {"since": "9" * 400},
        {"key": "a\x00b"},
        {"pipeline": "agents\x00"},
        {"cursor": "\x00"},
    ],
)
def test_filter_values_that_no_run_can_match_are_filter_errors(query: dict[str, str]) -> None:
    with pytest.raises(FilterError):
        RunFilter.from_query(query).parameters(reference)


def test_a_cursor_at_infinity_round_trips_as_postgresqls_text() -> None:
    run_id = uuid4()
    for text in ("infinity", "-infinity", "12000-01-01 00:00:00+00", "0200-01-01 00:00:00+00 BC"):
        at, back = decode_cursor(encode_cursor(OutOfRange.of(text), run_id))
        assert isinstance(at, OutOfRange) and (at.shown, back) == (text, run_id)
        before_at = RunFilter().after(at, run_id).parameters(reference)["before_at"]
        assert before_at == text
    for forged in ("99999-99-99 junk", "infinity; DROP TABLE"):
        with pytest.raises(FilterError):
            decode_cursor(base64.urlsafe_b64encode(f"{forged}|{run_id}".encode()).decode())


def test_times_python_cannot_hold_read_as_postgresql_wrote_them() -> None:
    endless = OutOfRange.of("infinity")
    assert endless > NOW and OutOfRange.of("-infinity") < NOW
    assert timestamp(endless) == "infinity" and to_jsonable(endless) == "infinity"
    assert timestamp("infinity") == "infinity"  # as the overview's JSON carries it
    assert timestamp("12000-01-01T00:00:00+00:00") == "12000-01-01T00:00:00+00:00"
    assert timestamp(NOW) == "2025-01-01 12:00:00.000"
    assert age(float("inf")) == "∞" and age(float("nan")) == "–" and duration(float("inf")) == "∞"
    assert to_jsonable([float("inf"), float("-inf")]) == ["Infinity", "-Infinity"]


def test_json_nested_too_deeply_is_kept_as_its_text() -> None:
    deep = '{"deep": ' + "[" * 1500 + "]" * 1500 + "}"
    loaded = load_json(deep.encode())
    assert isinstance(loaded, DeepJSON) and loaded.text == deep
    assert isinstance(load_json("[" * 150 + "]" * 150), DeepJSON)  # decodable, not showable
    assert load_json('{"a": [[1], {"b": 2}]}') == {"a": [[1], {"b": 2}]}
    assert load_json("[" * 50 + "]" * 50) is not None
    assert to_jsonable({"input": loaded}) == {"input": deep}


def test_run_view_shows_deep_or_shapeless_json_and_infinite_times() -> None:
    deep = DeepJSON("[" * 1500 + "]" * 1500)
    run = {
        "id": uuid4(), "pipeline": "agents", "status": "FAILED",
        "created_at": OutOfRange.of("-infinity"), "finished_at": OutOfRange.of("infinity"),
        "input": deep, "outputs": [1, "not an object"],
    }  # fmt: skip
    history = [
        {"stage": "analyze", "from_status": "NEW", "to_status": "FAILED", "attempt": 1,
         "started_at": OutOfRange.of("infinity"), "duration_seconds": float("inf"),
         "created_at": OutOfRange.of("infinity")},
    ]  # fmt: skip
    view = build_run_view(run, history, reference, NOW)
    assert view.input_json.startswith("(nested more than 100 levels deep")
    assert view.outputs[0][0] == "(all outputs)" and "not an object" in view.outputs[0][1]
    assert len(view.timeline) == 1 and view.stage_times[0].attempts == 1
    whole = build_run_view({**run, "outputs": deep}, [], reference, NOW)
    assert whole.outputs[0][1].startswith("(nested more than")


def test_an_overview_with_infinite_ages_and_a_young_table() -> None:
    unfinished = [
        {"pipeline": "agents", "status": "NEW", "runs": 1, "due": 1,
         "oldest_due_seconds": "Infinity", "orphaned": 0},
    ]  # fmt: skip
    row = _overview_row(unfinished=unfinished, runs_estimate=0, runs_counted=7)
    overview = build_overview(row, reference)
    assert overview.pipelines[0].stages[0].oldest_due_seconds is None
    assert (overview.runs_total, overview.runs_exact, overview.runs_capped) == (7, True, False)
    full = build_overview(
        _overview_row(runs_estimate=0, runs_counted=EXACT_COUNT_CAP + 1), reference
    )
    assert (full.runs_total, full.runs_exact, full.runs_capped) == (EXACT_COUNT_CAP, False, True)
    large = build_overview(_overview_row(runs_estimate=2_000_000), reference)
    assert (large.runs_total, large.runs_exact, large.runs_capped) == (2_000_000, False, False)


def test_ids_shown_keep_the_random_tail() -> None:
    # Two UUID v7 ids of the same millisecond: the same first 12 hex digits.
    first = UUID("01a23ab8-1234-7abc-8def-0123456789ab")
    second = UUID("01a23ab8-1234-7abc-9fed-ba9876543210")
    assert short_id(first) == "…0123456789ab" and short_id(second) == "…ba9876543210"
    assert short_id("not an id") == "not an id"


@pytest.mark.parametrize(
    ("payload", "run_id"),
    [
        ('{"id": "01a23ab8-1234-7abc-8def-0123456789ab", "status": "NEW", "operation": "INSERT"}',
         "01a23ab8-1234-7abc-8def-0123456789ab"),
        ("[" * 3000 + "]" * 3000, None),
        ("[" * 400 + "]" * 400, None),
        ("not json", None),
        ("[1]", None),
        ('"01a23ab8-1234-7abc-8def-0123456789ab"', None),
        ('{"id": 5}', None),
        ('{"id": "nope"}', None),
        ('{"id": "01a23ab8-1234-7abc-8def-0123456789ab", "status": 5}', None),
        ('{"id": "01a23ab8-1234-7abc-8def-0123456789ab", "x": "' + "y" * 2000 + '"}', None),
    ],
)  # fmt: skip
def test_only_the_observer_triggers_payloads_name_a_run(payload: str, run_id: str | None) -> None:
    assert run_id_of(payload) == run_id


def test_allowed_hosts_and_trusted_proxies_settings() -> None:
    default = ConsoleSettings.from_env({})
    assert default.accepted_hosts == frozenset({"localhost", "127.0.0.1", "::1"})
    assert default.trusted_proxies == ()
    named = ConsoleSettings.from_env(
        {"CONVEYOR_CONSOLE_ALLOWED_HOSTS": " Console.Example. ,[fd00::1], 10.0.0.5"},
        bind="127.0.0.2:9000",
    )
    assert named.accepted_hosts == frozenset(
        {"localhost", "127.0.0.1", "::1", "127.0.0.2", "console.example", "fd00::1", "10.0.0.5"}
    )
    credentials = {"CONVEYOR_CONSOLE_USER": "ops", "CONVEYOR_CONSOLE_PASSWORD": "pw"}
    assert ConsoleSettings.from_env(credentials, bind="0.0.0.0:1").accepted_hosts is None
    assert ConsoleSettings.from_env({"CONVEYOR_CONSOLE_ALLOWED_HOSTS": "*"}).accepted_hosts is None
    proxies = {"CONVEYOR_CONSOLE_TRUSTED_PROXIES": "10.0.0.7, 10.1.0.0/16"}
    assert ConsoleSettings.from_env(proxies).trusted_proxies == ("10.0.0.7", "10.1.0.0/16")
    for variable, bad in (
        ("CONVEYOR_CONSOLE_ALLOWED_HOSTS", "console.example:8474"),
        ("CONVEYOR_CONSOLE_ALLOWED_HOSTS", "a b"),
        ("CONVEYOR_CONSOLE_TRUSTED_PROXIES", "proxy.internal"),
    ):
        with pytest.raises(ConfigError, match=f"^{variable}="):
            ConsoleSettings.from_env({variable: bad})


def test_host_headers_are_read_as_names() -> None:
    assert host_of(b"LocalHost:8474") == "localhost" and host_of(b"[::1]:80") == "::1"
    assert host_of(b"console.example.") == "console.example"
    for bad in (b"", b"::1", b"[::1", b"a:b", b"a b", b"x\x00y", b"[::1]x"):
        assert host_of(bad) is None, bad
    hosts = frozenset({"localhost", "127.0.0.1"})
    assert host_refusal([(b"host", b"127.0.0.1:1")], hosts) is None
    refusal = host_refusal([(b"host", b"attacker.example")], hosts)
    assert refusal is not None and "CONVEYOR_CONSOLE_ALLOWED_HOSTS" in refusal
    assert host_refusal([], hosts) is not None
    assert host_refusal([(b"host", b"localhost"), (b"host", b"evil")], hosts) is not None


def test_the_first_id_of_an_instant_is_its_milliseconds_then_zeros() -> None:
    at = datetime(2026, 12, 5, 1, 2, 3, 456789, tzinfo=UTC)
    milliseconds = 1_796_432_523_456
    assert first_id_at(at) == UUID(int=milliseconds << 80)
    assert first_id_at(at).hex.startswith(f"{milliseconds:012x}0000")
    assert first_id_at(datetime(1, 1, 1, tzinfo=UTC)) == UUID(int=0)  # before 1970: no bound
    assert first_id_at(datetime(9999, 12, 31, tzinfo=UTC)).int >> 80 == 253_402_214_400_000
    params = RunFilter.from_query({"since": at.isoformat()}).parameters(reference)
    assert (params["since"], params["id_from"]) == (at, first_id_at(at))


def test_a_cursor_bounds_the_ids_to_its_millisecond_and_no_further() -> None:
    run_id = uuid4()
    at = datetime(2026, 12, 5, 1, 2, 3, 456789, tzinfo=UTC)
    below = RunFilter().after(at, run_id).parameters(reference)["id_below"]
    assert below == UUID(int=1_796_432_523_457 << 80)  # ids of .456 included, none of .457
    endless = RunFilter().after(OutOfRange.of("infinity"), run_id).parameters(reference)
    assert endless["id_below"] is None and endless["before_at"] == "infinity"
    early = RunFilter().after(OutOfRange.of("-infinity"), run_id).parameters(reference)
    assert early["id_below"] == UUID(int=0)
    last = datetime(9999, 12, 31, 23, 59, 59, 999999, tzinfo=UTC)
    assert RunFilter().after(last, run_id).parameters(reference)["id_below"] is None
    assert RunFilter().parameters(reference)["id_below"] is None
