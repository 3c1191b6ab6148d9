"""Where the database is and how to reach it: URL resolution, connections, the schema name."""

from __future__ import annotations

import re
from typing import Any

import psycopg
from psycopg import sql

from conveyor.settings import Settings

CONNECT_TIMEOUT_SECONDS = 5
# TCP keepalives let the kernel notice a peer that vanished without a FIN (a half-open socket).
KEEPALIVE_OPTIONS: dict[str, Any] = {
    "keepalives": 1,
    "keepalives_idle": 10,
    "keepalives_interval": 5,
    "keepalives_count": 3,
}


class DatabaseUnavailable(Exception):
    """The database cannot be reached; the message never carries a password."""


def database_url(settings: Settings) -> str:
    """The configured URL, or the embedded server's (started on first use)."""
    if settings.database_url:
        return settings.database_url
    from conveyor import _embedded

    try:
        return _embedded.ensure_running(settings.data_dir)
    except Exception as exc:  # the wheel raises assorted errors; the operator needs one line
        raise DatabaseUnavailable(
            f"could not start the embedded PostgreSQL in {settings.data_dir}: {exc}"
        ) from exc


def listen_url(settings: Settings, url: str) -> str:
    """The LISTEN connection may need a direct URL when the main one goes through a pooler."""
    return settings.listen_database_url or url


def redact(text: str) -> str:
    """Hide passwords in a URL or DSN, and anything that quotes one."""
    text = re.sub(r"(://[^:/@\s]*:)[^@\s]*@", r"\1***@", text)
    return re.sub(r"(password\s*=\s*)('[^']*'|\S+)", r"\1***", text, flags=re.IGNORECASE)


def brief(exc: BaseException | None) -> str:
    """An error in one line for a log: its last non-empty line (PostgreSQL puts the gist there),
    passwords hidden."""
    if exc is None:
        return ""
    lines = [line for line in str(exc).splitlines() if line.strip()]
    return redact(lines[-1].strip() if lines else type(exc).__name__)


def refusal(exc: psycopg.Error) -> dict[str, Any]:
    """The log fields of a statement PostgreSQL refused (not a lost connection)."""
    return {"error_type": type(exc).__name__, "sqlstate": exc.sqlstate, "error": brief(exc)}


def connect(url: str, **kwargs: Any) -> psycopg.Connection[Any]:
    try:
        return psycopg.connect(url, connect_timeout=CONNECT_TIMEOUT_SECONDS, **kwargs)
    except psycopg.OperationalError as exc:
        raise DatabaseUnavailable(
            f"cannot connect to the database at {redact(url)}: {redact(_first_line(exc))}"
        ) from exc


def schema_identifier(schema: str) -> str:
    """The schema name quoted for SQL text (validated by Settings)."""
    return sql.Identifier(schema).as_string()


def _first_line(exc: BaseException) -> str:
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return lines[-1] if lines else type(exc).__name__
