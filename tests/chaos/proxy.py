"""A loopback TCP proxy to a PostgreSQL server that can turn into a black hole.

It listens on 127.0.0.1:<free port> and forwards every connection to the server: its unix
socket (the embedded server listens on nothing else) or a TCP host and port.
`black_hole()` makes it silently drop every byte in both directions while every socket stays
open, like a network path that died without a FIN or a reset (a half-open connection, a NAT
or proxy that forgot the flow); `restore()` forwards again. While dropping, a client that
gives up still closes its upstream (so abandoned server backends go away), but nothing the
server does reaches the client: not data, not a close.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Coroutine
from concurrent.futures import Future
from typing import Any

from psycopg import conninfo


def upstream_of(url: str) -> str | tuple[str, int]:
    """Where a libpq URL or conninfo connects: a unix socket path, or (host, port)."""
    info = conninfo.conninfo_to_dict(url)
    host, port = str(info.get("host") or "/tmp"), int(info.get("port") or 5432)
    return f"{host}/.s.PGSQL.{port}" if host.startswith("/") else (host, port)


class BlackHoleProxy:
    def __init__(self, upstream: str | tuple[str, int]) -> None:
        self.upstream = upstream  # a unix socket path, or (host, port)
        self.port = 0
        self.connections = 0  # accepted so far
        self._dropping = False
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="proxy", daemon=True)
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()

    def start(self) -> BlackHoleProxy:
        self._thread.start()
        self._call(self._listen())
        return self

    def black_hole(self) -> None:
        self._dropping = True

    def restore(self) -> None:
        self._dropping = False

    def close(self) -> None:
        if self._thread.is_alive():
            self._call(self._close())
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(10)
        self._loop.close()

    def __enter__(self) -> BlackHoleProxy:
        return self.start()

    def __exit__(self, *_exc: object) -> None:
        self.close()

    # -- on the proxy's own event loop ---------------------------------------------------------

    def _call(self, coroutine: Coroutine[Any, Any, None]) -> None:
        future: Future[None] = asyncio.run_coroutine_threadsafe(coroutine, self._loop)
        future.result(10)

    async def _listen(self) -> None:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    async def _close(self) -> None:
        if self._server is not None:
            self._server.close()
        for writer in list(self._writers):
            writer.close()

    async def _accept(self, client_in: asyncio.StreamReader, client: asyncio.StreamWriter) -> None:
        self.connections += 1
        self._writers.add(client)
        try:
            if isinstance(self.upstream, str):
                server_in, server = await asyncio.open_unix_connection(self.upstream)
            else:
                server_in, server = await asyncio.open_connection(*self.upstream)
        except OSError:
            client.close()
            self._writers.discard(client)
            return
        self._writers.add(server)
        await asyncio.gather(
            self._pump(client_in, server, close_while_dropping=True),
            self._pump(server_in, client, close_while_dropping=False),
        )

    async def _pump(
        self,
        source: asyncio.StreamReader,
        sink: asyncio.StreamWriter,
        *,
        close_while_dropping: bool,
    ) -> None:
        with contextlib.suppress(OSError):
            while data := await source.read(65536):
                if not self._dropping:
                    sink.write(data)
                    await sink.drain()
        if close_while_dropping or not self._dropping:
            sink.close()
            self._writers.discard(sink)
