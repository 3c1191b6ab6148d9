"""The console against what a careless or hostile writer leaves in the database and what a
hostile client sends: each case here once answered a 500, or acted on runs it did not show."""

from __future__ import annotations

import asyncio
import json
import re
import uuid
from typing import Any
from urllib.parse import urlencode

import psycopg
import pytest

from conveyor import submit
from conveyor.console.live import LiveHub
from conveyor.console.overview import Overview, OverviewCache
from conveyor.console.store import Store
from conveyor.reference import pipeline as reference
from tests.console import raw
from tests.console.conftest import Console, StartConsole
from tests.console.test_http import _insert, _json, _post, _streams, _token
from tests.helpers import fetch_all

pytestmark = pytest.mark.timeout(180)

DEEP = "[" * 1500 + "]" * 1500  # 3 kB; Python's json decoder gives up near 1,000 levels


def _statuses(database_url: str) -> dict[str, str]:
    return dict(fetch_all(database_url, "SELECT id::text, status FROM conveyor.pipeline_runs"))


def _log_lines(console: Console, event: str) -> list[dict[str, Any]]:
    lines = []
    for line in console.process.log().splitlines():
        if line.startswith("{") and f'"{event}"' in line:
            lines.append(json.loads(line))
    return lines


def test_a_bulk_action_under_a_filter_that_matches_nothing_changes_nothing(
    database_url: str, start_console: StartConsole
) -> None:
    with psycopg.connect(database_url, autocommit=True) as conn:
        _insert(conn, "FAILED", 2)
        _insert(conn, "NEW", 2)
        _insert(conn, "ANALYZED", 1)
    before = _statuses(database_url)
    console = start_console("--allow-actions")
    token = _token(console, "/runs")
    # Stages with a status they never hold: each list is empty, so each action does nothing.
    for fields in (
        {"stage": "answer", "status": "NEW"},
        {"stage": "analyze", "status": "DONE"},
        {"stage": "assemble", "status": "CANCELLED"},
    ):
        assert _json(console, f"/api/runs?{urlencode(fields)}")["runs"] == []
        for action in ("retry", "cancel"):
            status, location = _post(console, f"/actions/{action}", {"csrf_token": token, **fields})
            assert status == 303 and "count=0" in location, (action, fields, location)
    assert _statuses(database_url) == before
    assert fetch_all(database_url, "SELECT count(*) FROM conveyor.run_events") == [(0,)]


def test_rows_at_infinity_and_past_the_year_9999_render_on_every_page(
    database_url: str, start_console: StartConsole
) -> None:
    with psycopg.connect(database_url, autocommit=True) as conn:
        # More infinite rows than a page holds, so that a page ends on one and its cursor is
        # an infinite timestamp.
        endless = [
            str(row[0])
            for row in conn.execute(
                "INSERT INTO conveyor.pipeline_runs (status, input, created_at, updated_at,"
                " run_after) SELECT 'NEW', jsonb_build_object('n', n), 'infinity', 'infinity',"
                " '-infinity' FROM generate_series(1, 55) n RETURNING id"
            ).fetchall()
        ]
        odd = [
            str(row[0])
            for row in conn.execute(
                "INSERT INTO conveyor.pipeline_runs (status, input, created_at, updated_at,"
                " run_after, finished_at, lease_owner, lease_expires_at) VALUES"
                " ('DONE', '{}', '-infinity', '12000-01-01', now(), 'infinity', NULL, NULL),"
                " ('FAILED', '{}', '0200-01-01 BC', now(), 'infinity', '20000-06-01', NULL, NULL),"
                " ('ANALYZING', '{}', now(), now(), now(), NULL, 'gone', 'infinity')"
                " RETURNING id"
            ).fetchall()
        ]
        conn.execute(
            "INSERT INTO conveyor.run_events (run_id, pipeline, stage, from_status, to_status,"
            " attempt, worker, started_at, duration, created_at) VALUES"
            " (%s, 'agents', 'analyze', 'NEW', 'ANALYZED', 1, 'w', 'infinity', '1 second',"
            "  '-infinity'),"
            " (%s, 'agents', 'analyze', 'ANALYZING', 'FAILED', 1, 'w', now(), '1000000 years',"
            "  'infinity')",
            (odd[0], odd[1]),
        )
        ordinary = _insert(conn, "DONE", 10)
    console = start_console()

    seen: list[dict[str, Any]] = []
    cursor: str | None = None
    while True:
        page = _json(console, "/api/runs" + (f"?cursor={cursor}" if cursor else ""))
        seen.extend(page["runs"])
        cursor = page["next_cursor"]
        if cursor is None:
            break
        status, body = console.get(f"/runs?cursor={cursor}")  # the page behind each cursor
        assert status == 200, body
    ids = [run["id"] for run in seen]
    assert len(ids) == len(set(ids)) == 68
    assert set(ids) == {*endless, *odd, *ordinary}
    assert {run["created_at"] for run in seen if run["id"] in endless} == {"infinity"}

    detail = _json(console, f"/api/runs/{odd[0]}")
    assert (detail["run"]["created_at"], detail["run"]["finished_at"]) == ("-infinity", "infinity")
    assert detail["run"]["updated_at"].startswith("12000-01-01")
    assert detail["history"][0]["started_at"] == "infinity"
    for path in ("/", "/fragments/overview", "/runs", "/runs?status=NEW", "/runs?since=1h"):
        status, body = console.get(path)
        assert status == 200, (path, body)
    for run_id in (endless[0], *odd):
        status, body = console.get(f"/runs/{run_id}")
        assert status == 200, (run_id, body)
    assert "infinity" in console.get(f"/runs/{odd[0]}")[1]
    overview = _json(console, "/api/overview")
    analyze = overview["pipelines"][0]["stages"][0]
    assert analyze["waiting"] == 55 and analyze["oldest_due_seconds"] is None


@pytest.mark.parametrize(
    "query",
    [
        "since=99999999999999w",
        "since=" + "9" * 400,
        "since=99999999999999999999d",
        "since=1h%00",
        "key=a%00b",
        "q=a%00b",
        "pipeline=agents%00",
        "stage=analyze%00",
        "status=NEW%00",
        "cursor=%00",
    ],
)
def test_filter_values_no_run_can_match_are_a_400(
    database_url: str, start_console: StartConsole, query: str
) -> None:
    console = start_console()
    for path in ("/runs", "/api/runs", "/fragments/runs"):
        status, body = console.get(f"{path}?{query}")
        assert status == 400, (path, query, body[:300])
        assert "Traceback" not in body


def test_absurd_page_numbers_and_limits_get_the_first_page(
    database_url: str, start_console: StartConsole
) -> None:
    with psycopg.connect(database_url, autocommit=True) as conn:
        _insert(conn, "NEW", 3)
    console = start_console()
    for query in ("page=99999999999999999999", "limit=-1", "limit=1e400", "page=%00"):
        assert len(_json(console, f"/api/runs?{query}")["runs"]) == 3, query


def test_a_failing_request_answers_500_with_the_security_headers_and_no_traceback(
    database_url: str, start_console: StartConsole
) -> None:
    console = start_console()
    # Schema drift: the runs list's statement fails with an error the console has no page for.
    with psycopg.connect(database_url, autocommit=True) as conn:
        conn.execute("ALTER TABLE conveyor.pipeline_runs RENAME COLUMN last_error TO error_text")
    for path in ("/runs", "/api/runs"):
        reply = raw.send(console.port, "GET", path)
        assert reply.status == 500 and reply.secured, (path, reply)
        assert "Traceback" not in reply.body and "error_text" not in reply.body
    assert json.loads(raw.send(console.port, "GET", "/api/runs").body)["error"]
    assert _log_lines(console, "console request failed")


def test_a_page_under_another_host_name_is_refused(
    database_url: str, start_console: StartConsole
) -> None:
    with psycopg.connect(database_url, autocommit=True) as conn:
        (failed,) = _insert(conn, "FAILED", 1)
    console = start_console("--allow-actions")
    port = console.port
    token = _token(console, f"/runs/{failed}")
    # DNS rebinding: attacker.example resolves to 127.0.0.1 once the page is loaded, so the
    # browser sends its name and, to the browser, the console is the page's own origin.
    rebound = f"attacker.example:{port}"
    for path in ("/", "/runs", f"/runs/{failed}", "/api/runs", f"/api/runs/{failed}", "/events"):
        reply = raw.send(port, "GET", path, host=rebound)
        assert reply.status == 400 and "Host" in reply.body and reply.secured, (path, reply)
    form = urlencode({"csrf_token": token}).encode()
    reply = raw.send(
        port,
        "POST",
        f"/runs/{failed}/cancel",
        host=rebound,
        headers={
            "Origin": f"http://{rebound}",
            "Content-Type": "application/x-www-form-urlencoded",
        },
        body=form,
    )
    assert reply.status == 400
    assert _statuses(database_url)[failed] == "FAILED"
    assert raw.send(port, "GET", "/", host=None).status == 400  # no Host at all
    for host in (f"localhost:{port}", "LOCALHOST", f"127.0.0.1:{port}", f"[::1]:{port}"):
        assert raw.send(port, "GET", "/api/runs", host=host).status == 200, host
    assert raw.send(port, "GET", "/healthz", host=rebound).status == 200  # probes: any Host


def test_allowed_hosts_add_names_and_credentials_make_any_host_safe(
    database_url: str, start_console: StartConsole
) -> None:
    console = start_console(CONVEYOR_CONSOLE_ALLOWED_HOSTS="console.test, Ops.Example.")
    for host in (f"console.test:{console.port}", "ops.example", "OPS.example."):
        assert raw.send(console.port, "GET", "/api/runs", host=host).status == 200, host
    assert raw.send(console.port, "GET", "/api/runs", host="attacker.example").status == 400

    # A browser never sends a console's credentials to another name: no Host list is needed.
    credentials = {"CONVEYOR_CONSOLE_USER": "ops", "CONVEYOR_CONSOLE_PASSWORD": "pw"}
    guarded = start_console(**credentials)
    assert raw.send(guarded.port, "GET", "/api/runs", host="attacker.example").status == 401


def test_the_action_log_names_the_socket_peer_not_x_forwarded_for(
    database_url: str, start_console: StartConsole
) -> None:
    def retry_with_forged_address(console: Console, run_id: str) -> None:
        token = _token(console, f"/runs/{run_id}")
        reply = raw.send(
            console.port,
            "POST",
            f"/runs/{run_id}/retry",
            headers={
                "Origin": console.url,
                "Content-Type": "application/x-www-form-urlencoded",
                "X-Forwarded-For": "203.0.113.66",
            },
            body=urlencode({"csrf_token": token}).encode(),
        )
        assert reply.status == 303, reply

    with psycopg.connect(database_url, autocommit=True) as conn:
        first, second = _insert(conn, "FAILED", 2)
    console = start_console("--allow-actions")
    retry_with_forged_address(console, first)
    (line,) = [line for line in _log_lines(console, "console action") if line["action"] == "retry"]
    assert line["client"] == "127.0.0.1"

    # Named as a trusted proxy, the same peer's header is believed.
    proxied = start_console("--allow-actions", CONVEYOR_CONSOLE_TRUSTED_PROXIES="127.0.0.1")
    retry_with_forged_address(proxied, second)
    (line,) = [line for line in _log_lines(proxied, "console action") if line["action"] == "retry"]
    assert line["client"] == "203.0.113.66"


def test_json_nested_deeper_than_python_recurses_renders(
    database_url: str, start_console: StartConsole
) -> None:
    def insert(conn: psycopg.Connection[Any], input_text: str, outputs_text: str) -> str:
        row = conn.execute(
            "INSERT INTO conveyor.pipeline_runs (status, input, outputs)"
            " VALUES ('FAILED', %s::jsonb, %s::jsonb) RETURNING id",
            (input_text, outputs_text),
        ).fetchone()
        assert row is not None
        return str(row[0])

    with psycopg.connect(database_url, autocommit=True) as conn:
        deep = insert(conn, '{"deep": ' + DEEP + "}", '{"analyze": ' + DEEP + "}")
        shapeless = insert(conn, '{"q": 1}', '[1, "not an object"]')
    console = start_console()
    status, body = console.get(f"/runs/{deep}")
    assert status == 200 and "nested more than" in body
    assert _json(console, f"/api/runs/{deep}")["run"]["input"].startswith('{"deep": [[[')
    status, body = console.get(f"/runs/{shapeless}")
    assert status == 200 and "not an object" in body
    for path in ("/", "/runs", "/api/runs", "/api/overview", f"/fragments/runs/{deep}"):
        assert console.get(path)[0] == 200, path


def test_hostile_observer_payloads_are_skipped_and_live_updates_go_on(
    database_url: str, start_console: StartConsole
) -> None:
    console = start_console()
    payloads = [
        "[" * 3999 + "]" * 3999,  # as deep as NOTIFY carries
        "[" * 500 + "]" * 500,  # small enough to decode: not an object
        "{" * 1000,
        "not json",
        '"a string"',
        "[1, 2]",
        '{"id": 5}',
        '{"id": {"nested": true}}',
        '{"id": "not-a-uuid", "status": "NEW"}',
        json.dumps({"id": str(uuid.uuid4()), "status": ["NEW"]}),
        json.dumps({"id": str(uuid.uuid4()), "padding": "x" * 5000}),
    ]
    with _streams(console, 1) as (stream,):
        if not stream.next("hello")["listening"]:
            stream.next("listener", where=lambda d: d["listening"])
        with psycopg.connect(database_url, autocommit=True) as conn:
            for payload in payloads:
                conn.execute("SELECT pg_notify('pipeline_events', %s)", (payload,))
            run_id = str(submit(conn, {"question": "still live?"}).id)
        stream.next("runs", where=lambda d: run_id in d.get("ids", []))
    (line, *_) = _log_lines(console, "console skipped a malformed observer payload")
    assert line["channel"] == "pipeline_events"
    assert not _log_lines(console, "console live task died; replacing it")


def test_a_live_task_that_dies_is_replaced(
    database_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = Store(database_url, "conveyor", reference, read_only=True)

    async def load() -> Overview:
        return await asyncio.to_thread(store.overview)

    async def notify(run_id: str) -> None:
        async with await psycopg.AsyncConnection.connect(database_url, autocommit=True) as conn:
            payload = json.dumps({"id": run_id, "status": "NEW", "operation": "INSERT"})
            await conn.execute("SELECT pg_notify('pipeline_events', %s)", (payload,))

    async def scenario() -> None:
        hub = LiveHub(database_url, OverviewCache(load, 2.0))
        heard, listening = hub.note_change, hub.note_listening
        note_bugs = ["a bug in handling one notification"]
        reconnect_bugs = ["a bug in taking a reconnect"]
        connects: list[None] = []

        def note_change(payload: str) -> None:
            if note_bugs:
                raise RuntimeError(note_bugs.pop())
            heard(payload)

        def note_listening() -> None:
            connects.append(None)
            if len(connects) == 2:  # the first reconnect
                raise RuntimeError(reconnect_bugs.pop())
            listening()

        monkeypatch.setattr(hub, "note_change", note_change)
        monkeypatch.setattr(hub, "note_listening", note_listening)
        hub.start()
        stream = hub.stream()
        try:
            await asyncio.wait_for(hub.connected.wait(), 30)
            await anext(stream)  # retry:
            await anext(stream)  # hello

            async def next_runs(match: Any) -> None:
                while True:
                    encoded = await anext(stream)
                    if encoded.startswith("event: runs") and match(encoded):
                        return

            # A notification the hub fails to handle is skipped: the listener lives on.
            await notify(str(uuid.uuid4()))
            after = str(uuid.uuid4())
            await notify(after)
            await asyncio.wait_for(next_runs(lambda e: after in e), 30)
            assert hub.restarts == 0

            # A bug on reconnecting ends the listening task: it is replaced, and pages re-read.
            await asyncio.to_thread(
                fetch_all,
                database_url,
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                " WHERE datname = current_database()"
                " AND application_name LIKE 'conveyor-console-listen:%'",
            )
            await asyncio.wait_for(next_runs(lambda e: '"all":true' in e), 30)
            assert hub.restarts == 1 and not reconnect_bugs
            after = str(uuid.uuid4())
            await notify(after)
            await asyncio.wait_for(next_runs(lambda e: after in e), 30)
        finally:
            await stream.aclose()
            await hub.stop()

    store.open()
    try:
        asyncio.run(scenario())
    finally:
        store.close()


def test_ids_tell_runs_created_together_apart_and_a_young_table_is_counted(
    database_url: str, start_console: StartConsole
) -> None:
    with psycopg.connect(database_url, autocommit=True) as conn:
        ids = _insert(conn, "NEW", 5)  # one statement: the same millisecond
    console = start_console()
    status, body = console.get("/runs")
    assert status == 200
    shown = re.findall(r'title="([0-9a-f-]{36})"><code>([^<]+)</code>', body)
    assert {full for full, _ in shown} == set(ids)
    assert len({text for _, text in shown}) == 5  # no two read alike
    assert all(full.endswith(text.lstrip("…")) for full, text in shown)

    status, body = console.get("/")
    assert status == 200 and "5 runs stored" in body and "about 0" not in body
    overview = _json(console, "/api/overview")
    assert (overview["runs_total"], overview["runs_exact"]) == (5, True)
