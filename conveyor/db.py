"""Where the database is and how to reach it: URL resolution, connections, the schema name."""

from __future__ import annotations

from typing import Any

import psycopg
from psycopg import sql

from conveyor.settings import ConfigError, Settings
from conveyor.urls import first_line, redact, redact_url, url_problem

CONNECT_TIMEOUT_SECONDS = 5
# TCP keepalives let the kernel notice a peer that vanished without a FIN (a half-open socket).
KEEPALIVE_OPTIONS: dict[str, Any] = {
    "keepalives": 1,
    "keepalives_idle": 10,
    "keepalives_interval": 5,
    "keepalives_count": 3,
}


def session_options(application_name: str) -> dict[str, Any]:
    """What every conveyor session is opened with: autocommit, its name (what pg_stat_activity
    shows, cut to PostgreSQL's 63 bytes), a bounded connect and keepalives."""
    return {
        "autocommit": True,
        "application_name": application_name[:63],
        "connect_timeout": CONNECT_TIMEOUT_SECONDS,
        **KEEPALIVE_OPTIONS,
    }


async def connect_async(url: str, application_name: str) -> psycopg.AsyncConnection[Any]:
    """One autocommit session of its own (a LISTEN, the leader's lock), opened as all are."""
    return await psycopg.AsyncConnection.connect(url, **session_options(application_name))


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


def check_url(variable: str, url: str) -> str:
    """A database URL or DSN as libpq will read it, or a ConfigError naming the variable, with
    the value's password hidden."""
    problem = url_problem(url)
    if problem is not None:
        raise ConfigError(variable, redact_url(url), problem)
    return url


def brief(exc: BaseException | None) -> str:
    """An error in one line for a log, passwords hidden: the server's primary message (not its
    DETAIL, which may quote a row, nor its CONTEXT, which says where: "deadlock detected", not
    "while updating tuple (12,7)"), else the error's last non-empty line."""
    if exc is None:
        return ""
    primary = exc.diag.message_primary if isinstance(exc, psycopg.Error) else None
    return redact(primary or first_line(exc))


def refusal(exc: psycopg.Error) -> dict[str, Any]:
    """The log fields of a statement PostgreSQL refused (not a lost connection)."""
    return {"error_type": type(exc).__name__, "sqlstate": exc.sqlstate, "error": brief(exc)}


def connect(url: str, **kwargs: Any) -> psycopg.Connection[Any]:
    try:
        return psycopg.connect(url, connect_timeout=CONNECT_TIMEOUT_SECONDS, **kwargs)
    except psycopg.OperationalError as exc:
        raise DatabaseUnavailable(
            f"cannot connect to the database at {redact_url(url)}: {redact(first_line(exc))}"
        ) from exc
    except (psycopg.ProgrammingError, ValueError):  # a URL libpq cannot read
        try:
            check_url("database URL", url)
        except ConfigError as bad:  # the reason, without the password libpq's message quotes
            raise DatabaseUnavailable(str(bad)) from None
        raise


def schema_identifier(schema: str) -> str:
    """The schema name quoted for SQL text (validated by Settings)."""
    return sql.Identifier(schema).as_string()


# The errors after which a connection is no use, though a new one may be: the server went away,
# or it answers but cannot take writes (a standby, or a primary demoted by a failover). A new
# connection through a multi-host URL with target_session_attrs=read-write finds the primary.
DATABASE_AWAY: tuple[type[psycopg.Error], ...] = (
    psycopg.OperationalError,
    psycopg.InterfaceError,
    psycopg.errors.ReadOnlySqlTransaction,
)


def server_read_only(exc: BaseException) -> bool:
    """The connection works but its server is read-only: only new connections can help."""
    return isinstance(exc, psycopg.errors.ReadOnlySqlTransaction)
