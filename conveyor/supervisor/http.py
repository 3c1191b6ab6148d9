"""/metrics, /healthz and /readyz on one port, served from the supervisor's own loop.

The supervisor stays single-threaded (it forks children; a thread holding a lock at fork time
could deadlock them), so requests are handled between its checks of the children.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, HTTPServer
from typing import Any

import structlog

log = structlog.get_logger("conveyor.http")

Probe = Callable[[], tuple[bool, dict[str, Any]]]


class ProbeServer:
    def __init__(self, port: int, *, health: Probe, ready: Probe, host: str = "0.0.0.0") -> None:
        self.health = health
        self.ready = ready
        server_self = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                server_self._respond(self)

            def log_message(self, format: str, *args: Any) -> None:
                pass  # scrapes and probes every few seconds are not news

        self.server = HTTPServer((host, port), Handler)
        self.server.timeout = 0.1
        self.port = self.server.server_address[1]
        log.info("serving /metrics, /healthz, /readyz", port=self.port)

    def serve_once(self, timeout: float) -> None:
        """Handle at most one request, waiting up to timeout for it."""
        self.server.timeout = timeout
        self.server.handle_request()

    def close(self) -> None:
        self.server.server_close()

    def _respond(self, request: BaseHTTPRequestHandler) -> None:
        path = request.path.split("?", 1)[0]
        if path == "/metrics":
            body, content_type = metrics_exposition()
            self._send(request, 200, body, content_type)
        elif path in ("/healthz", "/readyz"):
            ok, detail = (self.health if path == "/healthz" else self.ready)()
            body = json.dumps({"ok": ok, **detail}).encode()
            self._send(request, 200 if ok else 503, body, "application/json")
        else:
            self._send(request, 404, b"not found\n", "text/plain")

    @staticmethod
    def _send(request: BaseHTTPRequestHandler, code: int, body: bytes, content_type: str) -> None:
        request.send_response(code)
        request.send_header("Content-Type", content_type)
        request.send_header("Content-Length", str(len(body)))
        request.end_headers()
        request.wfile.write(body)


def metrics_exposition() -> tuple[bytes, str]:
    """Every process's metrics: a fresh registry holding only the multiprocess collector."""
    from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, CollectorRegistry, generate_latest

    from conveyor.supervisor.multiproc import collect_all

    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        registry = CollectorRegistry()
        collect_all(registry)
        return generate_latest(registry), CONTENT_TYPE_LATEST
    return generate_latest(REGISTRY), CONTENT_TYPE_LATEST
