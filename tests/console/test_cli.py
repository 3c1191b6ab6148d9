"""`conveyor console` at start: refusals are one line and exit 2; credentials guard every page."""

from __future__ import annotations

import base64
import http.client
import json
import signal
import socket
import subprocess
import sys
from typing import Any

import pytest

from conveyor.event_loop import EVENT_LOOPS
from tests.console.conftest import StartConsole
from tests.helpers import ROOT, conveyor_env

pytestmark = pytest.mark.timeout(120)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _console(database_url: str, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "conveyor", "console", *args],
        env=conveyor_env(database_url, **env),
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )


def _records(log: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in log.splitlines() if line.startswith("{")]


def _nothing_listens(port: int) -> bool:
    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) != 0


def test_a_public_bind_without_credentials_is_refused_in_one_line(database_url: str) -> None:
    port = _free_port()
    result = _console(database_url, "--bind", f"0.0.0.0:{port}")
    assert result.returncode == 2
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("conveyor: error: --bind='0.0.0.0:")
    assert "CONVEYOR_CONSOLE_USER" in lines[0] and "--no-auth" in lines[0]
    assert _nothing_listens(port)

    # The same from the environment names the variable.
    result = _console(database_url, CONVEYOR_CONSOLE_BIND=f"[::]:{port}")
    assert result.returncode == 2
    assert result.stderr.startswith("conveyor: error: CONVEYOR_CONSOLE_BIND='[::]:")
    assert len(result.stderr.splitlines()) == 1


@pytest.mark.parametrize(
    ("env", "variable"),
    [
        ({"CONVEYOR_CONSOLE_BIND": "localhost"}, "CONVEYOR_CONSOLE_BIND"),
        ({"CONVEYOR_CONSOLE_BIND": "127.0.0.1:99999"}, "CONVEYOR_CONSOLE_BIND"),
        ({"CONVEYOR_CONSOLE_ACTIONS": "maybe"}, "CONVEYOR_CONSOLE_ACTIONS"),
        ({"CONVEYOR_CONSOLE_USER": "ops"}, "CONVEYOR_CONSOLE_PASSWORD"),
        ({"CONVEYOR_CONSOLE_PASSWORD": "secret"}, "CONVEYOR_CONSOLE_USER"),
    ],
)
def test_a_bad_setting_names_its_variable_in_one_line(
    database_url: str, env: dict[str, str], variable: str
) -> None:
    result = _console(database_url, **env)
    assert result.returncode == 2
    assert result.stderr.startswith(f"conveyor: error: {variable}=")
    assert len(result.stderr.splitlines()) == 1
    assert "secret" not in result.stderr


def test_a_taken_port_is_one_line_and_exit_2(database_url: str) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        result = _console(database_url, "--bind", f"127.0.0.1:{port}")
    assert result.returncode == 2
    assert len(result.stderr.splitlines()) == 1
    assert "cannot listen there" in result.stderr


def test_with_credentials_every_request_without_them_gets_401(
    start_console: StartConsole,
) -> None:
    console = start_console(CONVEYOR_CONSOLE_USER="ops", CONVEYOR_CONSOLE_PASSWORD="s3cret:pw")

    def basic(user: str, password: str) -> dict[str, str]:
        token = base64.b64encode(f"{user}:{password}".encode()).decode()
        return {"Authorization": f"Basic {token}"}

    for path in ("/", "/runs", "/api/overview", "/api/runs", "/events", "/static/console.js"):
        status, _ = console.get(path)
        assert status == 401, path
        assert console.get(path, basic("ops", "wrong"))[0] == 401, path
        assert console.get(path, basic("other", "s3cret:pw"))[0] == 401, path
    request_headers = basic("ops", "s3cret:pw")
    status, body = console.get("/api/overview", request_headers)
    assert status == 200 and '"pipelines"' in body
    status, body = console.get("/", request_headers)
    assert status == 200 and ">ops<" in body  # the page says who is looking
    assert console.get("/healthz")[0] == 200  # the probe needs none and shows nothing


def test_no_auth_allows_a_public_bind_behind_a_proxy(
    database_url: str, start_console: StartConsole
) -> None:
    port = _free_port()
    console = start_console("--no-auth", "--bind", f"0.0.0.0:{port}")
    assert console.port == port
    assert console.get("/api/overview")[0] == 200


@pytest.mark.parametrize("loop_name", EVENT_LOOPS)
def test_sigterm_ends_open_event_streams_and_exits_0(
    start_console: StartConsole, loop_name: str
) -> None:
    console = start_console(CONVEYOR_EVENT_LOOP=loop_name)
    serving = [r for r in _records(console.process.log()) if r["event"] == "console serving"]
    assert [r["event_loop"] for r in serving] == [loop_name]  # the loop the workers would run on
    stream = http.client.HTTPConnection("127.0.0.1", console.port, timeout=30)
    stream.request("GET", "/events")
    response = stream.getresponse()
    assert response.readline() == b"retry: 2000\n"
    console.process.signal(signal.SIGTERM)
    assert console.process.wait(timeout=20) == 0  # an open stream does not hold the exit
    response.read()  # returns: the server ended the stream rather than leaving it hanging
    stream.close()
