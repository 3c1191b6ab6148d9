"""Logs: JSON lines a machine can read, the run's context on every line about a run, and no
password in any line, whatever path it took (settings, connection errors, handler errors,
library warnings, tracebacks)."""

from __future__ import annotations

import json
import os
import pty
import subprocess
import sys
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import psycopg
import pytest
from psycopg import conninfo, sql

from conveyor import runs
from tests.helpers import (
    ROOT,
    ConveyorProcess,
    conveyor_command,
    conveyor_env,
    fetch_all,
    scalar,
    wait_until,
)

LOGGED = {"CONVEYOR_PIPELINE": "tests.observability.pipelines:logged"}
RUN_FIELDS = ("run_id", "pipeline", "stage", "attempt", "worker")


def _records(text: str) -> list[dict[str, Any]]:
    """Every line must be one JSON object."""
    records = []
    for line in text.splitlines():
        if line.strip():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                raise AssertionError(f"not a JSON line: {line!r}") from None
    return records


def _insert(url: str, payload: dict[str, Any]) -> str:
    with psycopg.connect(url, autocommit=True) as conn:
        row = conn.execute(
            "INSERT INTO conveyor.pipeline_runs (pipeline, input) VALUES ('logged', %s)"
            " RETURNING id",
            (json.dumps(payload),),
        ).fetchone()
    assert row is not None
    return str(row[0])


def _one_run_logged(
    url: str, start_conveyor: Callable[..., ConveyorProcess], payload: dict[str, Any], **env: str
) -> tuple[str, list[dict[str, Any]]]:
    """One run through the logged pipeline under `conveyor run`: its id, and every log line."""
    supervisor = start_conveyor("run", **env, **LOGGED)
    run_id = _insert(url, payload)
    wait_until(
        lambda: scalar(url, "SELECT status FROM conveyor.pipeline_runs") == "DONE",
        60,
        "the run DONE",
    )
    assert supervisor.stop() == 0
    return run_id, _records(supervisor.log())


@pytest.mark.timeout(120)
def test_a_runs_life_reads_as_json_lines_with_its_context_on_each(
    database_url: str, start_conveyor: Callable[..., ConveyorProcess]
) -> None:
    run_id, records = _one_run_logged(
        database_url, start_conveyor, {"n": 7}, CONVEYOR_SWEEP_INTERVAL="0.5"
    )

    # Any line that mentions the run is a line about the run: it carries the whole context.
    about_run = [r for r in records if run_id in json.dumps(r)]
    for record in about_run:
        assert record.get("run_id") == run_id, record
        for field in RUN_FIELDS:
            assert record.get(field) not in (None, ""), (field, record)
        assert record["pipeline"] == "logged"
        assert record["timestamp"].endswith("Z") and record["level"]
        assert isinstance(record["pid"], int)

    events = {(r["stage"], r["event"]) for r in about_run}
    for stage, handler in (("first", "async handler"), ("second", "sync handler")):
        assert (stage, "run finished") in events
        assert (stage, f"{handler} working") in events  # the handler's own structlog line
        # ... and its standard-library line, through the same processors.
        assert (stage, f"{handler} warns through the standard library") in events
    finished = [r for r in about_run if r["event"] == "run finished"]
    assert {r["outcome"] for r in finished} == {"completed"}
    assert all(r["duration"] >= 0 and r["attempt"] == 1 for r in finished)
    # The worker field names the worker the database recorded for the transition.
    workers = dict(
        fetch_all(
            database_url,
            "SELECT stage, worker FROM conveyor.run_events WHERE run_id = %s",
            (run_id,),
        )
    )
    assert {r["stage"]: r["worker"] for r in finished} == workers

    # Lines about the process, not a run, still say which process.
    started = [r for r in records if r["event"] == "worker started"]
    assert {r["stage"] for r in started} == {"first", "second"}
    assert all(r["worker"].startswith(r["stage"] + "-") and "run_id" not in r for r in started)
    assert {r["event_loop"] for r in started} == {"uvloop"}  # the default


@pytest.mark.timeout(120)
def test_workers_run_on_asyncios_own_loop_when_asked(
    database_url: str, start_conveyor: Callable[..., ConveyorProcess]
) -> None:
    run_id, records = _one_run_logged(
        database_url, start_conveyor, {"n": 3}, CONVEYOR_EVENT_LOOP="asyncio"
    )
    started = [r for r in records if r["event"] == "worker started"]
    assert sorted((r["stage"], r["event_loop"]) for r in started) == [
        ("first", "asyncio"),
        ("second", "asyncio"),
    ]
    # Both handlers (the sync one in a thread) ran with the run's context on their lines.
    handled = {r["stage"] for r in records if r.get("run_id") == run_id and "handler" in r["event"]}
    assert handled == {"first", "second"}


@pytest.mark.timeout(120)
def test_a_run_taken_away_ends_with_its_run_finished_line(
    database_url: str, start_conveyor: Callable[..., ConveyorProcess]
) -> None:
    supervisor = start_conveyor("run", CONVEYOR_LEASE="3", **LOGGED)
    run_id = _insert(database_url, {"sleep": 60})
    wait_until(
        lambda: (
            scalar(database_url, "SELECT status FROM conveyor.pipeline_runs") == "FIRST_RUNNING"
        ),
        30,
        "the run in flight",
    )
    with psycopg.connect(database_url, autocommit=True) as conn:
        assert runs.cancel(conn, "conveyor", uuid.UUID(run_id), actor="test")
    wait_until(lambda: '"taken away"' in supervisor.log(), 30, "the interruption logged")
    assert supervisor.stop() == 0
    about_run = [r for r in _records(supervisor.log()) if r.get("run_id") == run_id]
    assert [r["event"] for r in about_run][-2:] == ["run taken away; interrupting", "run finished"]
    last = about_run[-1]
    assert last["outcome"] == "taken away" and last["duration"] > 0
    assert all(last.get(field) for field in RUN_FIELDS)


SECRET = "S3cr3t-Pa55w0rd"


@pytest.fixture
def secret_user(database_url: str) -> Iterator[str]:
    """A role whose password is SECRET: a DSN for the test database that works whatever the
    server's authentication method (trust ignores the password, scram checks it)."""
    role = f"conveyor_secret_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(database_url, autocommit=True) as conn:
        conn.execute(
            sql.SQL("CREATE ROLE {} LOGIN SUPERUSER PASSWORD {}").format(
                sql.Identifier(role), sql.Literal(SECRET)
            )
        )
    yield role
    with psycopg.connect(database_url, autocommit=True) as conn:
        conn.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = %s", (role,)
        )
        conn.execute(sql.SQL("DROP ROLE IF EXISTS {}").format(sql.Identifier(role)))


def test_an_unreachable_database_url_is_reported_without_its_password() -> None:
    url = f"postgresql://conveyor:{SECRET}@127.0.0.1:1/nowhere"
    for args in (("run",), ("status",), ("worker", "--stage", "first")):
        result = conveyor_command(url, *args, **LOGGED)
        assert result.returncode == 2, result
        assert "127.0.0.1" in result.stderr  # it does say where it tried
        assert SECRET not in result.stdout + result.stderr


@pytest.mark.timeout(120)
def test_no_password_in_any_log_line_through_reconnects_and_handler_errors(
    database_url: str, secret_user: str, start_conveyor: Callable[..., ConveyorProcess]
) -> None:
    params = conninfo.conninfo_to_dict(database_url)
    dsn = conninfo.make_conninfo(database_url, user=secret_user, password=SECRET)
    # The LISTEN connection gets a URL that cannot connect: it retries and says so.
    unreachable = f"postgresql://{secret_user}:{SECRET}@127.0.0.1:1/{params['dbname']}"
    supervisor = start_conveyor(
        "run",
        CONVEYOR_DATABASE_URL=dsn,
        CONVEYOR_LISTEN_DATABASE_URL=unreachable,
        CONVEYOR_SWEEP_INTERVAL="0.5",
        **LOGGED,
    )
    wait_until(
        lambda: supervisor.log().count('"listener cannot connect; retrying"') >= 4,
        30,
        "the listener's retries logged",
    )
    # A handler error that quotes the URL, and the pool and leader connections cut under them.
    _insert(database_url, {"leak_url": True})
    wait_until(
        lambda: scalar(database_url, "SELECT status FROM conveyor.pipeline_runs") == "FAILED",
        30,
        "the leaking run FAILED (found by the sweep)",
    )
    with psycopg.connect(database_url, autocommit=True) as conn:
        conn.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = %s",
            (secret_user,),
        )
    # The leader holds its session lock over the LISTEN URL (a pooler cannot keep a session),
    # which here cannot connect: it says so, once per streak of failures.
    wait_until(
        lambda: '"maintenance cannot reach the database"' in supervisor.log(),
        30,
        "the leader's failed connection logged",
    )
    assert supervisor.stop() == 0
    text = supervisor.log()
    records = _records(text)
    assert SECRET not in text
    failed = [r for r in records if r["event"] == "run finished" and r.get("outcome") == "failed"]
    assert failed and "cannot reach" in failed[0]["error"] and "***" in failed[0]["error"]
    retries = [r for r in records if r["event"] == "listener cannot connect; retrying"]
    assert retries and all(r["error"] for r in retries)


def test_tracebacks_carry_frames_but_never_local_variables() -> None:
    program = f"""
import structlog
from conveyor.logs import configure_logging
configure_logging("json", "info")
def connect(url):
    raise ConnectionError("refused")
try:
    connect("postgresql://ops:{SECRET}@db/x")
except ConnectionError:
    structlog.get_logger().exception("could not connect", url="postgresql://ops:{SECRET}@db/x")
import logging
try:
    connect("host=db password={SECRET}")
except ConnectionError:
    logging.getLogger("psycopg").exception("library error with dsn host=db password={SECRET}")
"""
    result = subprocess.run(
        [sys.executable, "-c", program], cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    records = _records(result.stdout)
    assert len(records) == 2
    assert SECRET not in result.stdout
    for record in records:
        frames = record["exception"][0]["frames"]
        assert any(frame["name"] == "connect" for frame in frames)
        assert all("locals" not in frame for frame in frames)
    assert records[0]["url"] == "postgresql://ops:***@db/x"
    assert records[1]["logger"] == "psycopg" and "password=***" in records[1]["event"]


@pytest.mark.timeout(120)
def test_lines_of_processes_sharing_stdout_never_interleave(tmp_path: Any) -> None:
    """Forked workers share the supervisor's stdout; containers set PYTHONUNBUFFERED, under
    which a line written in two pieces (text, then newline) gets split by another's line."""
    program = """
import logging, structlog
from conveyor.logs import configure_logging
configure_logging("json", "info")
for i in range(3000):
    structlog.get_logger().info("line", i=i, pad="x" * 50)
    if i % 10 == 0:
        logging.getLogger("lib").warning("library line %s", i)
"""
    env = conveyor_env("unused", PYTHONUNBUFFERED="1")
    output = tmp_path / "shared.log"
    with open(output, "wb") as shared:
        writers = [
            subprocess.Popen([sys.executable, "-c", program], stdout=shared, env=env, cwd=ROOT)
            for _ in range(4)
        ]
        assert [writer.wait(timeout=100) for writer in writers] == [0] * 4
    records = _records(output.read_text())
    assert len(records) == 4 * 3300


_EMIT = """
import logging, structlog
from conveyor.logs import configure_logging
configure_logging({log_format!r}, {level!r})
structlog.get_logger().debug("structlog debug")
structlog.get_logger().info("structlog info")
structlog.get_logger().warning("structlog warning")
logging.getLogger("lib").debug("library debug")
logging.getLogger("lib").info("library info")
logging.getLogger("lib").warning("library warning")
"""


def _emit(log_format: str, level: str, *, tty: bool = False) -> str:
    code = _EMIT.format(log_format=log_format, level=level)
    if not tty:
        result = subprocess.run(
            [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60
        )
        assert result.returncode == 0, result.stderr
        return result.stdout
    leader, follower = pty.openpty()
    process = subprocess.Popen(
        [sys.executable, "-c", code], cwd=ROOT, stdout=follower, stderr=subprocess.PIPE
    )
    os.close(follower)
    chunks = []
    while True:
        try:
            chunk = os.read(leader, 4096)
        except OSError:  # the pty closes when the child exits
            break
        if not chunk:
            break
        chunks.append(chunk)
    assert process.wait(timeout=60) == 0
    os.close(leader)
    return b"".join(chunks).decode(errors="replace")


def test_levels_come_from_the_setting() -> None:
    events = {r["event"] for r in _records(_emit("json", "warning"))}
    assert events == {"structlog warning", "library warning"}
    events = {r["event"] for r in _records(_emit("json", "info"))}
    assert events == {"structlog info", "structlog warning", "library warning"}
    events = {r["event"] for r in _records(_emit("json", "debug"))}
    assert {"structlog debug", "library debug", "library info"} <= events


def test_json_off_a_terminal_and_readable_console_output_on_one() -> None:
    assert len(_records(_emit("auto", "info"))) == 3  # a pipe: JSON lines
    console = _emit("auto", "info", tty=True)
    assert "structlog warning" in console and "library warning" in console
    assert not any(line.lstrip().startswith("{") for line in console.splitlines())
    forced = _emit("json", "info", tty=True)  # CONVEYOR_LOG_FORMAT=json wins over the terminal
    assert len(_records(forced.replace("\r\n", "\n"))) == 3
