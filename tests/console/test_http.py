"""The console over plain HTTP: JSON, keyset pages, actions and their guards, the event stream."""

from __future__ import annotations

import http.client
import json
import queue
import re
import subprocess
import sys
import threading
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from typing import Any
from urllib.parse import urlencode

import psycopg
import pytest

from conveyor import submit
from conveyor.console.store import Store
from conveyor.reference import pipeline as reference
from tests.console.conftest import Console, StartConsole
from tests.helpers import ROOT, conveyor_env, fetch_all, insert_skipping_run, scalar, wait_until

pytestmark = pytest.mark.timeout(120)


def _json(console: Console, path: str) -> Any:
    status, body = console.get(path)
    assert status == 200, (path, body)
    return json.loads(body)


def _post(
    console: Console, path: str, fields: dict[str, str], origin: str | None = "same"
) -> tuple[int, str]:
    """A form POST that does not follow the redirect; `origin` "same" sends the console's."""
    connection = http.client.HTTPConnection("127.0.0.1", console.port, timeout=30)
    headers = {"Content-Type": "application/x-www-form-urlencoded"}
    if origin == "same":
        headers["Origin"] = console.url
    elif origin is not None:
        headers["Origin"] = origin
    try:
        connection.request("POST", path, body=urlencode(fields), headers=headers)
        response = connection.getresponse()
        return response.status, response.getheader("location") or response.read().decode()
    finally:
        connection.close()


def _token(console: Console, path: str) -> str:
    status, body = console.get(path)
    assert status == 200
    match = re.search(r'name="csrf_token" value="([^"]+)"', body)
    assert match, "the page carries no action form"
    return match.group(1)


def _insert(conn: psycopg.Connection[Any], status: str, count: int) -> list[str]:
    """`count` runs of the reference pipeline at `status`, in one statement (one created_at)."""
    rows = conn.execute(
        "INSERT INTO conveyor.pipeline_runs (status, input, finished_at, idempotency_key)"
        " SELECT %(status)s, jsonb_build_object('n', n),"
        "        CASE WHEN %(status)s IN ('DONE', 'FAILED', 'CANCELLED') THEN now() END,"
        "        %(prefix)s || n FROM generate_series(1, %(count)s) n RETURNING id",
        {"status": status, "prefix": f"{status.lower()}-{uuid.uuid4().hex[:6]}-", "count": count},
    ).fetchall()
    return [str(row[0]) for row in rows]


def _status(database_url: str, run_id: str) -> str:
    return str(
        scalar(database_url, "SELECT status FROM conveyor.pipeline_runs WHERE id = %s", (run_id,))
    )


def test_runs_are_paged_by_keyset_newest_first_without_gaps_or_repeats(
    database_url: str, start_console: StartConsole
) -> None:
    with psycopg.connect(database_url, autocommit=True) as conn:
        older = _insert(conn, "DONE", 30)
        # One transaction: 100 runs with the very same created_at; the id breaks the tie.
        same_instant = _insert(conn, "NEW", 100)
    console = start_console()

    seen: list[dict[str, Any]] = []
    cursor: str | None = None
    pages = 0
    while True:
        query = "/api/runs" + (f"?cursor={cursor}" if cursor else "")
        page = _json(console, query)
        pages += 1
        seen.extend(page["runs"])
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert pages == 3  # 50 + 50 + 30
    ids = [run["id"] for run in seen]
    assert len(ids) == len(set(ids)) == 130
    assert set(ids) == set(older) | set(same_instant)
    order = [(run["created_at"], run["id"]) for run in seen]
    assert order == sorted(order, reverse=True)

    # Filters: status, a stage's statuses, an idempotency key, a run id.
    assert {r["id"] for r in _json(console, "/api/runs?status=DONE")["runs"]} == set(older)
    staged = _json(console, "/api/runs?stage=analyze")["runs"]
    assert len(staged) == 50 and {r["status"] for r in staged} == {"NEW"}
    key = scalar(
        database_url,
        "SELECT idempotency_key FROM conveyor.pipeline_runs WHERE id = %s",
        (older[3],),
    )
    assert [r["id"] for r in _json(console, f"/api/runs?key={key}")["runs"]] == [older[3]]
    assert _json(console, "/api/runs?stage=answer&status=NEW")["runs"] == []
    status, body = console.get(f"/runs?{urlencode({'q': key})}")
    assert status == 200 and older[3] in body

    connection = http.client.HTTPConnection("127.0.0.1", console.port, timeout=10)
    connection.request("GET", f"/runs?q={older[0]}")
    response = connection.getresponse()
    assert (response.status, response.getheader("location")) == (303, f"/runs/{older[0]}")
    connection.close()

    # A cursor this console did not issue, or an unknown stage, is a clear 400.
    status, body = console.get("/api/runs?cursor=bm90LWEtY3Vyc29y")
    assert status == 400 and "cursor" in json.loads(body)["error"]
    status, body = console.get("/api/runs?stage=nope")
    assert status == 400 and "no stage 'nope'" in json.loads(body)["error"]


def test_run_json_has_input_outputs_and_history(
    database_url: str, start_console: StartConsole, start_conveyor: Any
) -> None:
    start_conveyor("run")
    with psycopg.connect(database_url, autocommit=True) as conn:
        run_id = str(submit(conn, {"question": "json please"}).id)
    console = start_console()
    wait_until(lambda: _json(console, f"/api/runs/{run_id}")["run"]["status"] == "DONE", 60, "DONE")
    detail = _json(console, f"/api/runs/{run_id}")
    assert detail["run"]["input"] == {"question": "json please"}
    assert set(detail["run"]["outputs"]) == {"analyze", "assemble", "answer"}
    assert [h["to_status"] for h in detail["history"]] == ["ANALYZED", "CONTEXT_READY", "DONE"]
    assert all(h["worker"] and h["duration_seconds"] is not None for h in detail["history"])
    status, body = console.get(f"/api/runs/{uuid.uuid4()}")
    assert status == 404 and "no run" in json.loads(body)["error"]


def test_the_run_page_shows_the_route_a_run_took(
    database_url: str, start_console: StartConsole
) -> None:
    with psycopg.connect(database_url, autocommit=True) as conn:
        skipped = str(insert_skipping_run(conn))
        (waiting,) = _insert(conn, "NEW", 1)
    console = start_console()
    status, body = console.get(f"/runs/{skipped}")
    assert status == 200
    assert '<p id="route">route: analyze -&gt; answer -&gt; DONE</p>' in body
    status, body = console.get(f"/runs/{waiting}")
    assert status == 200 and 'id="route"' not in body


def _parent(conn: psycopg.Connection[Any], status: str, pending: int, width: int) -> str:
    """A run of the fan pipeline (tests/shapes) that fanned out `width` children."""
    fan_out = {"waiting": "SPLIT_WAITING", "join": "SPLIT", "fail_fast": True, "first": 0}
    row = conn.execute(
        "INSERT INTO conveyor.pipeline_runs (pipeline, status, input, children_pending, fan_out,"
        " finished_at) VALUES ('fan', %s, '{}', %s, %s,"
        " CASE WHEN %s = 'GATHERED' THEN now() END) RETURNING id",
        (status, pending, json.dumps({**fan_out, "width": width}), status),
    ).fetchone()
    assert row is not None
    return str(row[0])


def _children(conn: psycopg.Connection[Any], parent: str, statuses: list[str]) -> list[str]:
    """Children at these statuses, in index order, numbered and counted here as the engine's
    fan_out statement does (conveyor.fan_out)."""
    rows = conn.execute(
        "WITH engine AS (SELECT set_config('conveyor.fan_out', 'on', true))"
        " INSERT INTO conveyor.pipeline_runs (pipeline, status, input, parent_id, child_index)"
        " SELECT 'fan', s.status, '{}', %s, s.n - 1"
        "   FROM unnest(%s::text[]) WITH ORDINALITY AS s(status, n), engine"
        "  ORDER BY s.n RETURNING id",
        (parent, statuses),
    ).fetchall()
    return [str(row[0]) for row in rows]


def test_the_run_page_shows_a_parents_children_and_a_childs_parent(
    database_url: str, start_console: StartConsole
) -> None:
    hostile = "<i>\"odd'</i>"
    with psycopg.connect(database_url, autocommit=True) as conn:
        waiting = _parent(conn, "SPLIT_WAITING", pending=2, width=3)
        children = _children(conn, waiting, ["DONE", "PART", hostile])
        wide = _parent(conn, "GATHERED", pending=0, width=103)
        wide_children = _children(conn, wide, ["DONE"] * 103)
        lone = _insert(conn, "NEW", 1)[0]
    console = start_console()

    status, body = console.get(f"/runs/{waiting}")
    assert status == 200
    summary = re.search(r'<p id="children-summary">(.*?)</p>', body, re.S)
    assert summary, body
    text = " ".join(re.sub(r"<[^>]+>", "", summary.group(1)).split())
    assert text.startswith("3 children:") and text.endswith("— waiting for 2")
    assert "DONE 1" in text and "PART 1" in text
    assert "&lt;i&gt;&#34;odd&#39;&lt;/i&gt; 1" in text
    assert hostile not in body
    listed = re.findall(
        r'<tr data-child="([^"]+)" data-status="([^"]*)">\s*<td class="num">(\d+)</td>\s*'
        r'<td><a href="/runs/([^"]+)"',
        body,
    )
    assert listed == [
        (children[0], "DONE", "0", children[0]),
        (children[1], "PART", "1", children[1]),
        (children[2], "&lt;i&gt;&#34;odd&#39;&lt;/i&gt;", "2", children[2]),
    ]
    assert 'id="children-more"' not in body

    # Past the first hundred the rest are counted; a parent that moved on waits for none.
    status, body = console.get(f"/runs/{wide}")
    assert status == 200
    assert body.count("<tr data-child=") == 100
    assert f'href="/runs/{wide_children[99]}"' in body
    assert f'href="/runs/{wide_children[100]}"' not in body
    assert '<p class="dim" id="children-more">and 3 more</p>' in body
    assert "waiting for" not in body

    status, body = console.get(f"/runs/{children[2]}")
    assert status == 200 and 'id="children"' not in body
    assert f'<dd id="parent">child 2 of <a href="/runs/{waiting}"' in body
    assert _json(console, f"/api/runs/{waiting}")["children"]["total"] == 3
    status, body = console.get(f"/runs/{lone}")
    assert status == 200 and 'id="children"' not in body and 'id="parent"' not in body


def test_actions_need_a_token_from_a_console_page_and_the_same_origin(
    database_url: str, start_console: StartConsole
) -> None:
    with psycopg.connect(database_url, autocommit=True) as conn:
        (failed,) = _insert(conn, "FAILED", 1)
    console = start_console("--allow-actions")
    token = _token(console, f"/runs/{failed}")

    path = f"/runs/{failed}/retry"
    assert _post(console, path, {})[0] == 403  # no token
    assert _post(console, path, {"csrf_token": "1.forged"})[0] == 403
    assert _post(console, path, {"csrf_token": token}, origin="http://evil.example")[0] == 403
    assert _status(database_url, failed) == "FAILED"

    status, location = _post(console, path, {"csrf_token": token})
    assert (status, location) == (303, f"/runs/{failed}?notice=retried")
    assert _status(database_url, failed) == "NEW"
    events = fetch_all(
        database_url,
        "SELECT from_status, to_status, worker FROM conveyor.run_events WHERE run_id = %s",
        (failed,),
    )
    assert events == [("FAILED", "NEW", "console:anonymous")]
    log = console.process.log()
    assert '"action": "retry"' in log and '"actor": "console:anonymous"' in log
    assert '"reason": "cross-site request or missing token"' in log

    status, location = _post(console, f"/runs/{failed}/cancel", {"csrf_token": token})
    assert (status, location) == (303, f"/runs/{failed}?notice=cancelled")
    assert _status(database_url, failed) == "CANCELLED"


def test_with_actions_off_every_action_is_refused(
    database_url: str, start_console: StartConsole
) -> None:
    with psycopg.connect(database_url, autocommit=True) as conn:
        (failed,) = _insert(conn, "FAILED", 1)
        (waiting,) = _insert(conn, "NEW", 1)
    console = start_console()
    status, body = console.get(f"/runs/{failed}")
    assert status == 200 and "csrf_token" not in body and '<form method="post"' not in body
    for path in (
        f"/runs/{failed}/retry",
        f"/runs/{waiting}/cancel",
        "/actions/retry",
        "/actions/cancel",
    ):
        assert _post(console, path, {"csrf_token": "anything"})[0] == 403, path
    statuses = dict(fetch_all(database_url, "SELECT id::text, status FROM conveyor.pipeline_runs"))
    assert statuses == {failed: "FAILED", waiting: "NEW"}


def test_bulk_retry_and_cancel_follow_the_current_filter(
    database_url: str, start_console: StartConsole
) -> None:
    with psycopg.connect(database_url, autocommit=True) as conn:
        failed = _insert(conn, "FAILED", 3)
        waiting = _insert(conn, "NEW", 2)
        in_flight = _insert(conn, "ANALYZING", 1)
        done = _insert(conn, "DONE", 2)
    console = start_console("--allow-actions")
    token = _token(console, "/runs?status=FAILED")

    status, location = _post(console, "/actions/retry", {"csrf_token": token, "status": "FAILED"})
    assert status == 303 and "notice=bulk-retried" in location and "count=3" in location
    # Bulk cancel takes only the waiting runs the filter selects: not in flight, not finished.
    status, location = _post(console, "/actions/cancel", {"csrf_token": token, "stage": "analyze"})
    assert status == 303 and "count=5" in location
    statuses = dict(fetch_all(database_url, "SELECT id::text, status FROM conveyor.pipeline_runs"))
    assert {statuses[i] for i in failed + waiting} == {"CANCELLED"}
    assert [statuses[i] for i in in_flight] == ["ANALYZING"]
    assert {statuses[i] for i in done} == {"DONE"}
    actors = fetch_all(database_url, "SELECT DISTINCT worker FROM conveyor.run_events")
    assert actors == [("console:anonymous",)]


def test_the_overview_is_one_shared_result_for_every_viewer(
    database_url: str, start_console: StartConsole
) -> None:
    console = start_console()
    with ThreadPoolExecutor(max_workers=20) as pool:
        results = list(pool.map(lambda _: _json(console, "/api/overview"), range(20)))
    assert len({result["generated_at"] for result in results}) == 1
    stages = [s["name"] for s in results[0]["pipelines"][0]["stages"]]
    assert stages == ["analyze", "assemble", "answer"]


class EventStream:
    """A browser's /events connection, read on a thread."""

    def __init__(self, console: Console) -> None:
        self.events: queue.Queue[tuple[str, dict[str, Any]]] = queue.Queue()
        self.connection = http.client.HTTPConnection("127.0.0.1", console.port, timeout=60)
        self.connection.request("GET", "/events")
        self.response = self.connection.getresponse()
        assert self.response.status == 200
        assert self.response.getheader("content-type", "").startswith("text/event-stream")
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()

    def _read(self) -> None:
        name, data = "message", ""
        try:
            for raw in self.response:
                line = raw.decode().rstrip("\n")
                if line.startswith("event: "):
                    name = line[7:]
                elif line.startswith("data: "):
                    data = line[6:]
                elif line == "" and data:
                    self.events.put((name, json.loads(data)))
                    name, data = "message", ""
        except (OSError, ValueError, AttributeError):
            pass  # closed by the test

    def next(self, event: str, timeout: float = 30, where: Any = None) -> dict[str, Any]:
        def found() -> dict[str, Any] | None:
            try:
                name, data = self.events.get(timeout=0.2)
            except queue.Empty:
                return None
            return data if name == event and (where is None or where(data)) else None

        return wait_until(found, timeout, f"a {event!r} event", interval=0)

    def close(self) -> None:
        self.connection.close()


@contextmanager
def _streams(console: Console, count: int) -> Iterator[list[EventStream]]:
    streams = [EventStream(console) for _ in range(count)]
    try:
        yield streams
    finally:
        for stream in streams:
            stream.close()


def _listeners(database_url: str) -> list[int]:
    rows = fetch_all(
        database_url,
        "SELECT pid FROM pg_stat_activity"
        " WHERE datname = current_database() AND application_name LIKE 'conveyor-console-listen:%'",
    )
    return [row[0] for row in rows]


def test_one_listen_connection_fans_out_and_comes_back_after_a_cut(
    database_url: str, start_console: StartConsole
) -> None:
    console = start_console()
    with _streams(console, 3) as streams:
        for stream in streams:
            if not stream.next("hello")["listening"]:  # the console has only just started
                stream.next("listener", where=lambda d: d["listening"])
        (listener,) = _listeners(database_url)  # one connection, however many browsers

        with psycopg.connect(database_url, autocommit=True) as conn:
            run_id = str(submit(conn, {"question": "heard?"}).id)
        for stream in streams:
            assert run_id in stream.next("runs")["ids"]
            stream.next("overview")  # the shared overview was refreshed and announced

        fetch_all(database_url, "SELECT pg_terminate_backend(%s)", (listener,))
        for stream in streams:
            assert stream.next("listener", where=lambda d: d["listening"])["listening"]
            # Back: what changed meanwhile was not heard, so every page re-reads.
            assert stream.next("runs")["all"] is True
        (again,) = wait_until(lambda: _listeners(database_url), 30, "the listener back")
        assert again != listener

        with psycopg.connect(database_url, autocommit=True) as conn:
            run_id = str(submit(conn, {"question": "still heard?"}).id)
        assert run_id in streams[0].next("runs", where=lambda d: "ids" in d)["ids"]
    assert '"console listener reconnected"' in console.process.log()


def test_a_worker_that_stops_beating_drops_out_and_its_run_shows_as_orphaned(
    database_url: str, start_console: StartConsole, start_conveyor: Any
) -> None:
    chain = {"CONVEYOR_PIPELINE": "tests.pipelines:chain", "CONVEYOR_LEASE": "3"}
    worker = start_conveyor("worker", "--stage", "one", **chain)
    console = start_console(**chain)

    def stage_one() -> dict[str, Any]:
        overview = _json(console, "/api/overview")
        stages: list[dict[str, Any]] = overview["pipelines"][0]["stages"]
        return stages[0]

    with psycopg.connect(database_url, autocommit=True) as conn:
        run_id = str(submit(conn, {"sleep": 60}, pipeline="chain").id)
    wait_until(lambda: _status(database_url, run_id) == "ONE_RUNNING", 30, "the run in flight")
    one = wait_until(lambda: (s := stage_one())["in_flight"] == 1 and s, 30, "in flight")
    assert one["orphaned"] == 0
    assert [w["worker_id"].split("-")[0] for w in one["workers"]] == ["one"]
    status = _conveyor_status(database_url, **chain)
    assert re.search(r"^chain\s+one\s+one-\d+-[0-9a-f]{8}\s", status, re.MULTILINE), status

    worker.process.kill()  # no goodbye: only the missing heartbeats tell
    worker.wait(10)
    one = wait_until(lambda: (s := stage_one())["workers"] == [] and s, 30, "the worker gone")
    assert (one["in_flight"], one["orphaned"]) == (1, 1)  # claimed by a worker that is gone
    assert "no live workers" in _conveyor_status(database_url, **chain)


def _conveyor_status(database_url: str, **env: str) -> str:
    result = subprocess.run(
        [sys.executable, "-m", "conveyor", "status"],
        env=conveyor_env(database_url, **env),
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_with_actions_off_the_consoles_connections_cannot_write(database_url: str) -> None:
    with psycopg.connect(database_url, autocommit=True) as conn:
        (waiting,) = _insert(conn, "NEW", 1)
    read_only = Store(database_url, "conveyor", reference, read_only=True)
    read_only.open()
    try:
        assert read_only.run(uuid.UUID(waiting))[0] is not None
        with pytest.raises(psycopg.errors.ReadOnlySqlTransaction):
            read_only.cancel(uuid.UUID(waiting), "console:test")
    finally:
        read_only.close()
    assert _status(database_url, waiting) == "NEW"


def test_the_overview_shows_each_limit_key_and_until_when_it_is_closed(
    database_url: str, start_console: StartConsole
) -> None:
    fetch_all(
        database_url,
        "INSERT INTO conveyor.limits (key, max_in_flight, requests_per_minute, closed_until)"
        " VALUES ('primary:answer-model', 4, 120, NULL),"
        "        ('fallback:small', NULL, NULL, '2100-01-01T00:00:00Z') RETURNING key",
    )
    fetch_all(
        database_url,
        "INSERT INTO conveyor.limit_stages (key, pipeline, stage, working, channel)"
        " VALUES ('primary:answer-model', 'agents', 'answer', 'ANSWERING', 'c') RETURNING key",
    )
    fetch_all(
        database_url,
        "INSERT INTO conveyor.pipeline_runs (status, lease_owner, lease_expires_at)"
        " VALUES ('ANSWERING', 'w', now() + interval '1 hour') RETURNING id",
    )
    console = start_console()
    limits = {item["key"]: item for item in _json(console, "/api/overview")["limits"]}
    assert limits["primary:answer-model"]["in_flight"] == 1
    assert limits["primary:answer-model"]["max_in_flight"] == 4
    assert limits["primary:answer-model"]["closed_until"] is None
    assert limits["fallback:small"]["closed_until"] == 4102444800
    status, page = console.get("/")
    assert status == 200
    assert "primary:answer-model" in page and "1 of 4" in page
    assert "closed</span> until 2100-01-01 00:00:00.000" in page
