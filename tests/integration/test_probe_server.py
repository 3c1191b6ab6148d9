"""The supervisor's probe port against clients that misbehave: idle connections, half-sent and
oversized requests, garbage, floods. None of them may delay supervision (replacing a killed
worker, handling SIGTERM); each gets an error or is dropped, never a traceback."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from datetime import datetime

import pytest

from benchmarks.procstat import children as children_of
from conveyor.supervisor.http import HEAD_TIMEOUT_SECONDS
from tests.helpers import ROOT, ConveyorProcess, conveyor_env, wait_until
from tests.observability.prom import http_get, metrics_port

CHAIN = {"CONVEYOR_PIPELINE": "tests.pipelines:chain", "CONVEYOR_STAGES": "one=1"}
Start = Callable[..., ConveyorProcess]
# What a client that never finishes its request sends, besides nothing at all.
HALF_REQUESTS = (b"GET /metr", b"GET /healthz HTTP/1.1\r\nHost: x\r\n")


def _ready(start_conveyor: Start, **env: str) -> tuple[ConveyorProcess, int]:
    supervisor = start_conveyor("run", **CHAIN, **env)
    port = metrics_port(supervisor)
    wait_until(lambda: _get(port, "/readyz") == 200, 60, "readiness")
    return supervisor, port


def _get(port: int, path: str, host: str = "127.0.0.1") -> int:
    return http_get(f"http://{host}:{port}{path}", timeout=10)[0]


@contextlib.contextmanager
def _held(port: int, count: int = 4) -> Iterator[list[socket.socket]]:
    """Connections that never complete a request: idle ones and half-sent ones."""
    held: list[socket.socket] = []
    try:
        for i in range(count):
            sock = socket.create_connection(("127.0.0.1", port), timeout=10)
            held.append(sock)
            for half in HALF_REQUESTS[: i % (len(HALF_REQUESTS) + 1)]:
                sock.sendall(half)
        yield held
    finally:
        for sock in held:
            sock.close()


def _still_open(sock: socket.socket) -> bool:
    """Neither answered nor closed by the server (yet)."""
    sock.setblocking(False)  # a timeout would make recv wait for data first
    try:
        sock.recv(1, socket.MSG_PEEK)
    except BlockingIOError:
        return True  # nothing to read, and no end of stream
    except OSError:
        return False
    return False  # an answer, or the end of the stream


def _events(process: ConveyorProcess) -> list[dict[str, object]]:
    events = []
    for line in process.log().splitlines():
        if line.startswith("{"):
            events.append(json.loads(line))
    return events


def _started_pids(process: ConveyorProcess) -> set[int]:
    return {int(str(e["pid"])) for e in _events(process) if e["event"] == "worker process started"}


def _replace_one_child(supervisor: ConveyorProcess) -> int:
    """SIGKILL one child and wait for the supervisor to start its successor; its pid."""
    before = _started_pids(supervisor)
    victim = children_of(supervisor.pid)[0]
    os.kill(victim, signal.SIGKILL)
    new = wait_until(lambda: _started_pids(supervisor) - before, 30, "the replacement child")
    return new.pop()


def _answer(sock: socket.socket, timeout: float = 20) -> bytes:
    """Everything the server sends until it closes; b"" when it drops the connection."""
    sock.settimeout(timeout)
    data = b""
    try:
        while chunk := sock.recv(65536):
            data += chunk
    except ConnectionResetError:
        pass
    return data


def test_held_connections_delay_neither_restarts_nor_shutdown(start_conveyor: Start) -> None:
    supervisor, port = _ready(start_conveyor)

    with _held(port, 6) as held:
        replacement = _replace_one_child(supervisor)
        # The child was replaced before the server gave up on any held connection.
        assert all(_still_open(sock) for sock in held)
        assert replacement in children_of(supervisor.pid)
        assert _get(port, "/healthz") == 200  # probes are answered beside them

    with _held(port, 6):
        held_since = time.time()
        supervisor.signal(signal.SIGTERM)
        wait_until(lambda: '"supervisor stopping"' in supervisor.log(), 30, "the stop")
        # The stop began while the server still held every connection (it drops held ones
        # after HEAD_TIMEOUT_SECONDS); the server then closes them itself on the way out.
        stopping = next(e for e in _events(supervisor) if e["event"] == "supervisor stopping")
        stopped_at = datetime.fromisoformat(str(stopping["timestamp"])).timestamp()
        assert stopped_at - held_since < HEAD_TIMEOUT_SECONDS
        assert supervisor.wait(60) == 0
    assert "Traceback" not in supervisor.log()


def _exchange(port: int, request: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        try:
            sock.sendall(request)
        except OSError:
            return b""  # dropped while sending: as good as an error
        return _answer(sock)


@pytest.mark.parametrize(
    ("request_bytes", "status"),
    [
        (b"\x00\xffgarbage\r\n\r\n", b"400"),
        (b"GET\r\n\r\n", b"400"),
        (b"POST /metrics HTTP/1.1\r\nContent-Length: 3\r\n\r\nabc", b"405"),
        (b"GET /nowhere HTTP/1.1\r\n\r\n", b"404"),
        (b"GET /metrics HTTP/1.1\r\nX-Big: " + b"a" * 200_000 + b"\r\n\r\n", b"431"),
    ],
)
def test_bad_requests_get_an_error_or_are_dropped(
    start_conveyor: Start, request_bytes: bytes, status: bytes
) -> None:
    supervisor, port = _ready(start_conveyor)
    answer = _exchange(port, request_bytes)
    assert answer == b"" or answer.startswith(b"HTTP/1.1 " + status), answer[:200]
    assert _get(port, "/healthz") == 200
    assert "Traceback" not in supervisor.log()


def test_slow_and_idle_clients_are_dropped_and_a_flood_is_survived(
    start_conveyor: Start,
) -> None:
    supervisor, port = _ready(start_conveyor)
    flood: list[socket.socket] = []
    try:
        for _ in range(300):
            with contextlib.suppress(OSError):  # refused or timed out: dropped, as allowed
                flood.append(socket.create_connection(("127.0.0.1", port), timeout=5))
        # Probes and supervision go on while hundreds of connections are open.
        wait_until(lambda: _get(port, "/healthz") == 200, 30, "a probe answered in the flood")
        _replace_one_child(supervisor)
    finally:
        for sock in flood:
            sock.close()

    with socket.create_connection(("127.0.0.1", port), timeout=10) as idle:
        assert _answer(idle, timeout=30) == b""  # the server gives up on it
    with socket.create_connection(("127.0.0.1", port), timeout=10) as slow:
        slow.sendall(b"GET /metrics HTTP/1.1\r\n")
        slow.settimeout(0.5)
        closed = False
        for _ in range(120):  # one header line every half second, never the end of the head
            try:
                slow.sendall(b"X-Slow: 1\r\n")
                if slow.recv(1) == b"":
                    closed = True
                    break
            except TimeoutError:
                continue
            except OSError:
                closed = True
                break
        assert closed, "a slowloris client kept its connection for a minute"
    assert _get(port, "/metrics") == 200
    assert "Traceback" not in supervisor.log()


def _reachable(host: str, port: int) -> bool:
    try:
        socket.create_connection((host, port), timeout=5).close()
        return True
    except OSError:
        return False


def test_bind_address_from_the_environment(start_conveyor: Start) -> None:
    anywhere_port = _ready(start_conveyor)[1]
    loopback, loopback_port = _ready(start_conveyor, CONVEYOR_METRICS_HOST="127.0.0.1")
    served = [e for e in _events(loopback) if e["event"] == "serving /metrics, /healthz, /readyz"]
    assert served[0]["host"] == "127.0.0.1"
    # Another address of this machine reaches the default bind, not the loopback one.
    assert _reachable("127.0.0.2", anywhere_port)
    assert not _reachable("127.0.0.2", loopback_port)
    assert _get(loopback_port, "/healthz") == 200


def _run_until_exit(database_url: str, **env: str) -> subprocess.CompletedProcess[str]:
    """`conveyor run` that is expected to refuse to start."""
    return subprocess.run(
        [sys.executable, "-m", "conveyor", "run"],
        env=conveyor_env(database_url, **CHAIN, **env),
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )


@pytest.mark.parametrize(
    "host",
    [
        "not an address",
        "300.1.2.3",
        "203.0.113.7",  # well-formed, but not this machine's (TEST-NET-3): refused at bind time
    ],
)
def test_a_bad_bind_address_exits_2_naming_the_variable(database_url: str, host: str) -> None:
    result = _run_until_exit(database_url, CONVEYOR_METRICS_HOST=host)
    assert result.returncode == 2, result.stdout + result.stderr
    assert "CONVEYOR_METRICS_HOST" in result.stderr
    assert "Traceback" not in result.stdout + result.stderr


def test_a_taken_port_exits_2_naming_the_port(database_url: str) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = str(taken.getsockname()[1])
        result = _run_until_exit(
            database_url, CONVEYOR_METRICS_HOST="127.0.0.1", CONVEYOR_METRICS_PORT=port
        )
    assert result.returncode == 2, result.stdout + result.stderr
    assert "CONVEYOR_METRICS_PORT" in result.stderr
    assert "Traceback" not in result.stdout + result.stderr
