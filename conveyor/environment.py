"""What a pipeline's own code may read of the environment conveyor runs in: the database its
runs live in, and the same reading of environment variables the engine's settings use.

A handler reads over a connection of its own (its writes go through `Run.write`); `Database`
says where and how to open it::

    database = Database.from_env()
    pool = AsyncConnectionPool(database.url(), kwargs=database.connect_options("my-pipeline"))
    ... SELECT ... FROM {database.schema}.my_table ...
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from conveyor.db import database_url, session_options
from conveyor.settings import Settings


@dataclass(frozen=True)
class Database:
    """The database the workers use: its `url()` (CONVEYOR_DATABASE_URL, DATABASE_URL, or the
    embedded server's), its `schema` (CONVEYOR_SCHEMA), and whether server-side prepared
    statements may be used (CONVEYOR_PREPARED_STATEMENTS: off behind PgBouncer in transaction
    mode)."""

    schema: str
    prepared_statements: bool
    _settings: Settings = field(repr=False, compare=False)

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Database:
        """Read from `env` (default: os.environ) as the worker reads it: a bad value raises
        ConfigError naming its variable. Nothing is connected or started yet."""
        settings = Settings.from_env(env)
        return cls(settings.schema, settings.prepared_statements, settings)

    def url(self) -> str:
        """The URL to connect to; with none configured, the embedded server's (started now if
        it is not running: DatabaseUnavailable when it cannot be)."""
        return database_url(self._settings)

    def connect_options(self, application_name: str) -> dict[str, Any]:
        """psycopg connection options as conveyor opens its own sessions: autocommit, the name
        pg_stat_activity shows, a bounded connect, TCP keepalives, and prepared statements only
        where they work."""
        return {
            **session_options(application_name),
            "prepare_threshold": 5 if self.prepared_statements else None,
        }
