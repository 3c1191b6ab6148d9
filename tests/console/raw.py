"""Requests written byte by byte: any Host (or none), NUL bytes, unknown methods, any length.

http.client and urllib refuse to send most of what a hostile client sends; a socket does not.
"""

from __future__ import annotations

import re
import socket
import time
from dataclasses import dataclass, field

SECURITY_HEADERS = ("content-security-policy", "x-content-type-options", "x-frame-options")
_STATUS_LINE = re.compile(rb"^HTTP/1\.[01] (\d{3})")


@dataclass
class Reply:
    status: int  # 0: the server closed the connection without an answer
    headers: dict[str, str] = field(default_factory=dict)
    body: str = ""

    @property
    def secured(self) -> bool:
        return all(name in self.headers for name in SECURITY_HEADERS)


def send(
    port: int,
    method: str,
    target: str | bytes,
    *,
    host: str | bytes | None = "DEFAULT",
    headers: dict[str, str] | None = None,
    body: bytes = b"",
    timeout: float = 30.0,
) -> Reply:
    """One request on its own connection; `host` None sends no Host header at all. Reads until
    the server closes, or for `timeout` seconds at most (an event stream never closes)."""
    lines = [method.encode() + b" " + _bytes(target) + b" HTTP/1.1"]
    if host == "DEFAULT":
        host = f"127.0.0.1:{port}"
    if host is not None:
        lines.append(b"Host: " + _bytes(host))
    for name, value in (headers or {}).items():
        lines.append(_bytes(name) + b": " + _bytes(value))
    lines.append(b"Connection: close")
    if body or method in ("POST", "PUT", "PATCH"):
        lines.append(b"Content-Length: " + str(len(body)).encode())
    raw = b"\r\n".join(lines) + b"\r\n\r\n" + body
    deadline = time.monotonic() + timeout
    received = bytearray()
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(raw)
        while (left := deadline - time.monotonic()) > 0:
            sock.settimeout(left)
            try:
                chunk = sock.recv(65536)
            except TimeoutError:
                break
            if not chunk:
                break
            received += chunk
    return _parse(bytes(received))


def _bytes(value: str | bytes) -> bytes:
    return value if isinstance(value, bytes) else value.encode("utf-8")


def _parse(received: bytes) -> Reply:
    match = _STATUS_LINE.match(received)
    if match is None:
        return Reply(0, body=received.decode("utf-8", "replace"))
    head, _, body = received.partition(b"\r\n\r\n")
    headers = {}
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        headers[name.strip().lower().decode("latin-1")] = value.strip().decode("latin-1")
    return Reply(int(match.group(1)), headers, body.decode("utf-8", "replace"))
