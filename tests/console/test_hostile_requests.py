"""Hostile and malformed requests against a running console, one list of them.

Each must get a 4xx or a correct 200 (or the 303 of an action that did nothing), never a 5xx
and never a traceback in the body; whatever the console itself answers carries its security
headers. The run counts what it tried and what held (`pytest -s` prints them).
"""

from __future__ import annotations

import base64
import json
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote, urlencode

import psycopg
import pytest

from tests.console import raw
from tests.console.conftest import StartConsole
from tests.console.test_http import _insert, _token
from tests.helpers import fetch_all

pytestmark = pytest.mark.timeout(300)

FORGED_CLIENT = "203.0.113.66"
FORM = {"Content-Type": "application/x-www-form-urlencoded"}
Check = Callable[[raw.Reply], bool]


@dataclass
class Case:
    name: str
    method: str
    target: str | bytes
    expect: Check
    host: str | bytes | None = "DEFAULT"
    headers: dict[str, str] = field(default_factory=dict)
    body: bytes = b""
    # False where uvicorn's HTTP parser answers before the console sees the request.
    console_answers: bool = True


def status(*codes: int) -> Check:
    return lambda reply: reply.status in codes


def json_200(key: str) -> Check:
    def check(reply: raw.Reply) -> bool:
        return reply.status == 200 and key in json.loads(reply.body)

    return check


def did_nothing(reply: raw.Reply) -> bool:
    return reply.status == 303 and "count=0" in reply.headers.get("location", "")


def refused_host(reply: raw.Reply) -> bool:
    return reply.status == 400 and "Host" in reply.body


def _cursor(text: str) -> str:
    return base64.urlsafe_b64encode(text.encode()).decode().rstrip("=")


def _form(**fields: str) -> bytes:
    return urlencode(fields).encode()


def _seed(database_url: str) -> dict[str, str]:
    """Runs at every status an action could touch, plus rows a careless writer leaves."""
    with psycopg.connect(database_url, autocommit=True) as conn:
        (failed, _) = _insert(conn, "FAILED", 2)
        (waiting, _) = _insert(conn, "NEW", 2)
        _insert(conn, "ANALYZED", 1)
        _insert(conn, "DONE", 1)
        deep_input = '{"deep": ' + "[" * 1500 + "]" * 1500 + "}"
        row = conn.execute(
            "INSERT INTO conveyor.pipeline_runs (status, input, created_at, run_after)"
            " VALUES ('NEW', %s::jsonb, 'infinity', '-infinity') RETURNING id",
            (deep_input,),
        ).fetchone()
        assert row is not None
    return {"failed": failed, "waiting": waiting, "odd": str(row[0])}


def _cases(port: int, token: str, runs: dict[str, str]) -> list[Case]:
    origin = {"Origin": f"http://127.0.0.1:{port}", **FORM}
    failed, odd = runs["failed"], runs["odd"]
    missing = str(uuid.uuid4())
    cases = [
        # Host: DNS rebinding and malformed names.
        Case("rebinding page", "GET", "/", refused_host, host=f"attacker.example:{port}"),
        Case("rebinding API", "GET", "/api/runs", refused_host, host="attacker.example"),
        Case("rebinding run", "GET", f"/runs/{failed}", refused_host, host="127.0.0.1.nip.io"),
        Case("rebinding stream", "GET", "/events", refused_host, host="evil.example"),
        Case("localhost suffix", "GET", "/", refused_host, host="localhost.attacker.example"),
        Case("no Host", "GET", "/", status(400), host=None, console_answers=False),
        Case("empty Host", "GET", "/", status(400), host=""),
        Case("Host port not a number", "GET", "/", status(400), host="127.0.0.1:http"),
        Case("Host bracket unclosed", "GET", "/", status(400), host="[::1"),
        Case("Host with NUL", "GET", "/", status(400), host=b"127.0.0.1\x00.evil",
             console_answers=False),
        Case("two Hosts", "GET", "/", status(400), headers={"Host": "evil.example"},
             console_answers=False),
        Case("rebinding cancel", "POST", f"/runs/{failed}/cancel", refused_host,
             host=f"attacker.example:{port}", body=_form(csrf_token=token),
             headers={"Origin": f"http://attacker.example:{port}", **FORM}),
        Case("LOCALHOST", "GET", "/api/overview", json_200("pipelines"), host=f"LOCALHOST:{port}"),
        Case("[::1]", "GET", "/api/runs", json_200("runs"), host=f"[::1]:{port}"),
        Case("probe, any Host", "GET", "/healthz", status(200), host="kubelet.example"),
        # Values no filter can use, and absurd paging.
        *(
            Case(f"NUL in {name} on {path}", "GET", f"{path}?{name}=a%00b", status(400))
            for name in ("pipeline", "stage", "status", "since", "key", "q", "cursor")
            for path in ("/runs", "/api/runs", "/fragments/runs")
        ),
        Case("since in weeks beyond time", "GET", "/api/runs?since=99999999999999w", status(400)),
        Case("since beyond a float", "GET", "/runs?since=" + "9" * 400, status(400)),
        Case("since in days beyond time", "GET", "/runs?since=99999999999999999999d", status(400)),
        Case("since in exponent form", "GET", "/api/runs?since=1e400", status(400)),
        Case("since infinity", "GET", "/api/runs?since=infinity", status(400)),
        Case("since negative", "GET", "/api/runs?since=-1h", status(400)),
        Case("since the year 1", "GET", "/api/runs?since=0001-01-01T00:00:00%2B14:00",
             json_200("runs")),
        Case("since the year 9999", "GET", "/api/runs?since=9999-12-31T23:59:59",
             json_200("runs")),
        Case("page beyond int64", "GET", "/api/runs?page=99999999999999999999", json_200("runs")),
        Case("negative limit", "GET", "/api/runs?limit=-1", json_200("runs")),
        Case("huge limit", "GET", "/runs?limit=" + "9" * 40, status(200)),
        Case("cursor not base64", "GET", "/api/runs?cursor=%%%%", status(400)),
        Case("cursor of junk", "GET", "/api/runs?cursor=" + "A" * 4000, status(400)),
        Case("cursor at infinity", "GET",
             f"/api/runs?cursor={_cursor(f'infinity|{missing}')}", json_200("runs")),
        Case("cursor past any calendar", "GET",
             f"/api/runs?cursor={_cursor(f'99999-99-99 99:99:99+00|{missing}')}", status(400)),
        Case("cursor naive", "GET",
             f"/api/runs?cursor={_cursor(f'2025-01-01T00:00:00|{missing}')}", status(400)),
        Case("unknown stage", "GET", "/api/runs?stage=" + quote("<script>"), status(400)),
        # Run ids that are not ids.
        Case("run id not a uuid", "GET", "/runs/not-a-uuid", status(404)),
        Case("run id a number", "GET", "/api/runs/123", status(404)),
        Case("run id with NUL", "GET", f"/runs/{failed}%00", status(404)),
        Case("fragment of NUL", "GET", "/fragments/runs/%00", status(404)),
        Case("run that does not exist", "GET", f"/runs/{missing}", status(404)),
        Case("run that does not exist, JSON", "GET", f"/api/runs/{missing}", status(404)),
        Case("retry of no id", "POST", "/runs/nope/retry", status(404, 405),
             headers=origin, body=_form(csrf_token=token)),
        Case("traversal in static", "GET", "/static/../../pyproject.toml", status(404)),
        Case("encoded traversal", "GET", "/static/%2e%2e/%2e%2e/settings.py", status(404)),
        # Overlong requests.
        Case("overlong path", "GET", "/" + "a" * 8000, status(404)),
        Case("overlong run id", "GET", "/runs/" + "9" * 12000, status(404)),
        Case("request line of 70 kB", "GET", "/runs/" + "9" * 70000,
             status(400, 404, 414, 431), console_answers=False),
        Case("overlong header", "GET", "/api/runs", json_200("runs"),
             headers={"Cookie": "c=" + "x" * 8000}),
        # Methods no route takes.
        *(
            Case(f"{method} {path}", method, path, status(405))
            for method, path in (
                ("FOO", "/"),
                ("DELETE", "/runs"),
                ("PUT", "/api/runs"),
                ("PATCH", "/actions/retry"),
                ("TRACE", "/"),
                ("OPTIONS", "/api/runs"),
                ("GET", "/actions/cancel"),
                ("PROPFIND", "/static/console.js"),
            )
        ),
        # Forms without a valid token, or from elsewhere.
        Case("bulk cancel without token", "POST", "/actions/cancel", status(403),
             headers=origin, body=_form(stage="analyze")),
        Case("bulk retry with forged token", "POST", "/actions/retry", status(403),
             headers=origin, body=_form(csrf_token="1.forged")),
        Case("retry without token", "POST", f"/runs/{failed}/retry", status(403),
             headers=origin),
        Case("cancel from another origin", "POST", f"/runs/{failed}/cancel", status(403),
             headers={**origin, "Origin": "http://evil.example"}, body=_form(csrf_token=token)),
        Case("cancel, cross-site fetch", "POST", f"/runs/{failed}/cancel", status(403),
             headers={**origin, "Sec-Fetch-Site": "cross-site"}, body=_form(csrf_token=token)),
        Case("multipart without token", "POST", "/actions/cancel", status(403),
             headers={"Origin": origin["Origin"],
                      "Content-Type": "multipart/form-data; boundary=xyz"},
             body=b'--xyz\r\nContent-Disposition: form-data; name="stage"\r\n\r\nanalyze'
                  b"\r\n--xyz--\r\n"),
        Case("JSON instead of a form", "POST", "/actions/cancel", status(403),
             headers={"Origin": origin["Origin"], "Content-Type": "application/json"},
             body=b'{"csrf_token": "x"}'),
        Case("undecodable form", "POST", "/actions/cancel", status(403),
             headers=origin, body=b"\xff\xfe=\x00"),
        Case("broken multipart", "POST", "/actions/cancel", status(400, 403),
             headers={"Origin": origin["Origin"],
                      "Content-Type": "multipart/form-data; boundary=xyz"},
             body=b"--xyz\r\nnot a part"),
        # Bulk actions whose filter shows nothing, and filters no bulk action can use.
        *(
            Case(f"bulk {action}, {stage} at {state}", "POST", f"/actions/{action}", did_nothing,
                 headers=origin, body=_form(csrf_token=token, stage=stage, status=state))
            for action in ("retry", "cancel")
            for stage, state in (("answer", "NEW"), ("analyze", "DONE"), ("assemble", "FAILED"))
        ),
        Case("bulk retry, NUL key", "POST", "/actions/retry", status(400),
             headers=origin, body=_form(csrf_token=token, key="a\x00")),
        Case("bulk cancel, since beyond time", "POST", "/actions/cancel", status(400),
             headers=origin, body=_form(csrf_token=token, since="99999999999999w")),
        Case("bulk cancel, unknown stage", "POST", "/actions/cancel", status(400),
             headers=origin, body=_form(csrf_token=token, stage="nope")),
        Case("retry from a NUL stage", "POST", f"/runs/{failed}/retry", status(400),
             headers=origin, body=_form(csrf_token=token, stage="an\x00alyze")),
        # A forged client address on an action (the log is checked below).
        Case("bulk retry, forged X-Forwarded-For", "POST", "/actions/retry", did_nothing,
             headers={**origin, "X-Forwarded-For": FORGED_CLIENT},
             body=_form(csrf_token=token, stage="answer", status="NEW")),
        Case("forged proxy headers", "GET", "/api/runs", json_200("runs"),
             headers={"X-Forwarded-For": FORGED_CLIENT, "X-Forwarded-Proto": "https",
                      "X-Forwarded-Host": "evil.example"}),
        Case("Basic auth nobody asked for", "GET", "/", status(200),
             headers={"Authorization": "Basic %%%"}),
        # Pages over rows at infinity and JSON nested past Python's recursion.
        Case("overview", "GET", "/", status(200)),
        Case("runs list", "GET", "/runs", status(200)),
        Case("runs JSON", "GET", "/api/runs", json_200("runs")),
        Case("overview JSON", "GET", "/api/overview", json_200("latest")),
        Case("odd run page", "GET", f"/runs/{odd}", status(200)),
        Case("odd run JSON", "GET", f"/api/runs/{odd}", json_200("run")),
    ]  # fmt: skip
    return cases


def test_hostile_requests_get_a_4xx_or_a_correct_200(
    database_url: str, start_console: StartConsole
) -> None:
    runs = _seed(database_url)
    before = fetch_all(database_url, "SELECT id, status FROM conveyor.pipeline_runs ORDER BY id")
    console = start_console("--allow-actions")
    token = _token(console, f"/runs/{runs['failed']}")

    tried = held = 0
    failures: list[str] = []

    def hold(name: str, ok: bool, detail: Any = "") -> None:
        nonlocal tried, held
        tried += 1
        held += ok
        if not ok:
            failures.append(f"{name}: {detail}")

    for case in _cases(console.port, token, runs):
        try:
            reply = raw.send(
                console.port,
                case.method,
                case.target,
                host=case.host,
                headers=case.headers,
                body=case.body,
                timeout=10,
            )
        except OSError as exc:
            hold(case.name, False, f"connection failed: {exc}")
            continue
        ok = (
            0 < reply.status < 500
            and "Traceback" not in reply.body
            and (reply.secured or not case.console_answers)
            and case.expect(reply)
        )
        hold(case.name, ok, f"{reply.status} {reply.body[:200]!r}")

    # Nothing above may have changed a run, and the log names the socket's peer.
    after = fetch_all(database_url, "SELECT id, status FROM conveyor.pipeline_runs ORDER BY id")
    hold("no run changed", after == before, after)
    events = fetch_all(database_url, "SELECT count(*) FROM conveyor.run_events")
    hold("no transition recorded", events == [(0,)], events)
    log = console.process.log()
    hold("forged address never logged", FORGED_CLIENT not in log, "in the log")
    hold("no traceback of a request in the log", '"console request failed"' not in log, "")
    assert console.get("/healthz")[0] == 200  # and it still serves

    print(f"hostile console requests: {tried} tried, {held} held")
    assert held == tried, "\n".join(failures)
