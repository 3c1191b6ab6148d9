"""/metrics, /healthz and /readyz on one port, served from the supervisor's own loop.

The supervisor forks its children, so it stays single-threaded: a thread holding a lock (the
logger's, an allocator's) at fork time would leave that lock held forever in the child. The
server is therefore non-blocking and driven by the supervisor's loop instead: `serve_once` waits
on a selector for at most its timeout, then does a bounded amount of work (a few accepts, one
read or write per ready socket, a few answers) and returns. No call waits on a client. Every
connection has a deadline, a request head is bounded in size and open connections are capped,
so an idle, slow, oversized or garbage request gets an error or is dropped, and the supervisor
goes back to its children between turns whatever its clients do.
"""

from __future__ import annotations

import contextlib
import json
import os
import selectors
import socket
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from http import HTTPStatus
from typing import Any

import structlog

log = structlog.get_logger("conveyor.http")

Probe = Callable[[], tuple[bool, dict[str, Any]]]

HEAD_TIMEOUT_SECONDS = 5.0  # probes and scrapers send their request at once
ANSWER_TIMEOUT_SECONDS = 10.0  # for the client to read the answer (Prometheus' default timeout)
MAX_HEAD_BYTES = 8192
MAX_CONNECTIONS = 64  # past it the oldest connection is dropped for the new one
ACCEPTS_PER_TURN = 16
# Building /metrics reads every process's samples: a burst of requests is spread over turns.
ANSWERS_PER_TURN = 4
READ_CHUNK = 4096


@dataclass(eq=False)
class _Connection:
    sock: socket.socket
    deadline: float
    head: bytearray = field(default_factory=bytearray)
    outbox: memoryview | None = None  # the answer still to send, once there is one
    closed: bool = False


class ProbeServer:
    def __init__(self, port: int, *, health: Probe, ready: Probe, host: str = "0.0.0.0") -> None:
        self.health = health
        self.ready = ready
        self.listener = _listen(host, port)
        self.port: int = self.listener.getsockname()[1]
        self.selector = selectors.DefaultSelector()
        self.selector.register(self.listener, selectors.EVENT_READ)
        self.connections: set[_Connection] = set()
        self.waiting: deque[_Connection] = deque()  # complete requests not answered yet
        log.info("serving /metrics, /healthz, /readyz", host=host, port=self.port)

    def serve_once(self, timeout: float) -> None:
        """Wait up to timeout for clients, then do a bounded amount of work for them."""
        for key, _events in self.selector.select(0 if self.waiting else timeout):
            if key.fileobj is self.listener:
                self._accept()
            else:
                self._step(key.data)
        self._answer_waiting()
        self._expire(time.monotonic())

    def close(self) -> None:
        for connection in list(self.connections):
            self._close(connection)
        self.selector.close()
        self.listener.close()

    def close_inherited(self) -> None:
        """In a forked child: drop its copies of the server's descriptors, without shutting
        down the sockets the supervisor still serves."""
        for connection in self.connections:
            connection.sock.close()
        self.selector.close()
        self.listener.close()

    def _accept(self) -> None:
        for _ in range(ACCEPTS_PER_TURN):
            try:
                sock, _address = self.listener.accept()
            except OSError:  # none left, reset before accept, or out of descriptors
                return
            sock.setblocking(False)
            if len(self.connections) >= MAX_CONNECTIONS:
                self._close(min(self.connections, key=lambda c: c.deadline))
            connection = _Connection(sock, time.monotonic() + HEAD_TIMEOUT_SECONDS)
            self.connections.add(connection)
            self.selector.register(sock, selectors.EVENT_READ, connection)

    def _step(self, connection: _Connection) -> None:
        if connection.closed:  # dropped earlier in this turn
            return
        try:
            if connection.outbox is None:
                self._read(connection)
            else:
                self._write(connection)
        except (BlockingIOError, InterruptedError):
            pass  # a spurious wake-up: try again next turn
        except OSError:  # reset, broken pipe: the client is gone
            self._close(connection)
        except Exception as exc:  # a bug here must not end supervision: drop the client
            log.warning("probe connection failed", error=repr(exc))
            self._close(connection)

    def _read(self, connection: _Connection) -> None:
        data = connection.sock.recv(READ_CHUNK)
        if not data:
            self._close(connection)
            return
        connection.head += data
        if len(connection.head) > MAX_HEAD_BYTES:
            self._reply(connection, _response(HTTPStatus.REQUEST_HEADER_FIELDS_TOO_LARGE))
        elif b"\r\n\r\n" in connection.head or b"\n\n" in connection.head:
            self.selector.unregister(connection.sock)  # nothing more is read from it
            self.waiting.append(connection)

    def _write(self, connection: _Connection) -> None:
        assert connection.outbox is not None
        sent = connection.sock.send(connection.outbox)
        connection.outbox = connection.outbox[sent:]
        if not connection.outbox:
            self._close(connection)

    def _answer_waiting(self) -> None:
        answered = 0
        while self.waiting and answered < ANSWERS_PER_TURN:
            connection = self.waiting.popleft()
            if not connection.closed:
                self._reply(connection, self._answer(bytes(connection.head)))
                answered += 1

    def _reply(self, connection: _Connection, response: bytes) -> None:
        connection.outbox = memoryview(response)
        connection.deadline = time.monotonic() + ANSWER_TIMEOUT_SECONDS
        if connection.sock in self.selector.get_map():
            self.selector.modify(connection.sock, selectors.EVENT_WRITE, connection)
        else:
            self.selector.register(connection.sock, selectors.EVENT_WRITE, connection)
        self._step(connection)  # most answers fit in the socket's buffer at once

    def _answer(self, head: bytes) -> bytes:
        request_line = head.split(b"\n", 1)[0].rstrip(b"\r").split()
        if len(request_line) != 3 or not request_line[2].startswith(b"HTTP/"):
            return _response(HTTPStatus.BAD_REQUEST)
        method, target = request_line[0], request_line[1]
        if method not in (b"GET", b"HEAD"):
            return _response(HTTPStatus.METHOD_NOT_ALLOWED)
        try:
            status, body, content_type = self._route(target.split(b"?", 1)[0])
        except Exception as exc:  # a probe's failure is the client's 500, not the supervisor's
            log.warning("probe request failed", error=repr(exc))
            return _response(HTTPStatus.INTERNAL_SERVER_ERROR)
        return _response(status, body, content_type, with_body=method == b"GET")

    def _route(self, path: bytes) -> tuple[HTTPStatus, bytes, str]:
        if path == b"/metrics":
            body, content_type = metrics_exposition()
            return HTTPStatus.OK, body, content_type
        if path in (b"/healthz", b"/readyz"):
            ok, detail = (self.health if path == b"/healthz" else self.ready)()
            status = HTTPStatus.OK if ok else HTTPStatus.SERVICE_UNAVAILABLE
            return status, json.dumps({"ok": ok, **detail}).encode(), "application/json"
        return HTTPStatus.NOT_FOUND, b"not found\n", "text/plain"

    def _expire(self, now: float) -> None:
        for connection in [c for c in self.connections if c.deadline <= now]:
            self._close(connection)

    def _close(self, connection: _Connection) -> None:
        if connection.closed:
            return
        connection.closed = True
        self.connections.discard(connection)
        if connection.sock in self.selector.get_map():
            self.selector.unregister(connection.sock)
        with contextlib.suppress(OSError):  # already reset by the client
            connection.sock.shutdown(socket.SHUT_RDWR)
        connection.sock.close()


def _listen(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(MAX_CONNECTIONS)
        sock.setblocking(False)
    except OSError:
        sock.close()
        raise
    return sock


def _response(
    status: HTTPStatus,
    body: bytes | None = None,
    content_type: str = "text/plain",
    *,
    with_body: bool = True,
) -> bytes:
    """One answer, then the connection closes: no keep-alive to time out."""
    if body is None:
        body = f"{status.phrase.lower()}\n".encode()
    head = (
        f"HTTP/1.1 {status.value} {status.phrase}\r\n"
        f"Content-Type: {content_type}\r\n"
        f"Content-Length: {len(body)}\r\n"
        + ("Allow: GET, HEAD\r\n" if status is HTTPStatus.METHOD_NOT_ALLOWED else "")
        + "Connection: close\r\n\r\n"
    ).encode()
    return head + body if with_body else head


def metrics_exposition() -> tuple[bytes, str]:
    """Every process's metrics: a fresh registry holding only the multiprocess collector."""
    from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, CollectorRegistry, generate_latest

    from conveyor.supervisor.multiproc import collect_all

    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        registry = CollectorRegistry()
        collect_all(registry)
        return generate_latest(registry), CONTENT_TYPE_LATEST
    return generate_latest(REGISTRY), CONTENT_TYPE_LATEST
