"""Serving the console: bind first (a taken port is one line), then uvicorn on that socket."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import socket
import sys
from types import FrameType

import structlog
import uvicorn
from starlette.applications import Starlette

from conveyor.console.app import create_app
from conveyor.console.context import Console
from conveyor.console.settings import ConsoleSettings
from conveyor.pipeline import Pipeline
from conveyor.settings import ConfigError

log = structlog.get_logger("conveyor.console")
# Event streams never end by themselves: shutdown ends them at once, and whatever is still open
# after this many seconds is cut.
SHUTDOWN_GRACE_SECONDS = 3


def listen(settings: ConsoleSettings) -> socket.socket:
    family = socket.AF_INET6 if ":" in settings.host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((settings.host, settings.port))
    except OSError as exc:
        sock.close()
        raise ConfigError(
            settings.bind_from, settings.bind, f"cannot listen there: {exc.strerror or exc}"
        ) from None
    sock.listen(128)
    return sock


def serve(
    settings: ConsoleSettings,
    sock: socket.socket,
    pipeline: Pipeline,
    url: str,
    listen_url: str,
    schema: str,
    event_loop: str,
) -> None:
    application = create_app(settings, pipeline, url, listen_url, schema)
    server = _Server(
        uvicorn.Config(
            application,
            log_config=None,  # the structlog configuration set at CLI entry stays in force
            access_log=False,
            lifespan="on",
            loop=event_loop,  # CONVEYOR_EVENT_LOOP, as the workers'; uvicorn names them alike
            timeout_graceful_shutdown=SHUTDOWN_GRACE_SECONDS,
            # X-Forwarded-For only from proxies named in the settings: uvicorn's default trusts
            # any local client's header, which would let it write the action log's address.
            proxy_headers=bool(settings.trusted_proxies),
            forwarded_allow_ips=list(settings.trusted_proxies) or None,
        )
    )
    host, port = sock.getsockname()[:2]
    shown = f"[{host}]" if ":" in host else host
    log.info(
        "console listening",
        url=f"http://{shown}:{port}/",
        host=host,
        port=port,
        pipeline=pipeline.name,
        actions=settings.allow_actions,
        auth=settings.auth_required,
    )
    # uvicorn raises the signal it caught again once it has shut down: exit 0 then, not -15.
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, _exit_cleanly)
    server.run(sockets=[sock])


class _Server(uvicorn.Server):
    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        app = self.config.app
        if isinstance(app, Starlette):
            console: Console = app.state.console
            with contextlib.suppress(RuntimeError):  # not serving yet: no loop, no streams
                asyncio.get_running_loop().call_soon_threadsafe(console.hub.end_streams)
        super().handle_exit(sig, frame)


def _exit_cleanly(signum: int, frame: FrameType | None) -> None:
    sys.exit(0)
