"""The agents' own database access: one small connection pool per worker process, made on first use.

Handlers run inside worker processes that the supervisor forks; a pool made before a fork, or on
another event loop, cannot be used, so the pool is keyed by process, loop and URL and made again
when any of them changes. The URL and schema come from the same environment as the engine's
(the supervisor exports CONVEYOR_DATABASE_URL to its children).
"""

from __future__ import annotations

import asyncio
import os
from dataclasses import dataclass
from typing import Any

from psycopg_pool import AsyncConnectionPool

from conveyor import Database

POOL_SIZE = 4


@dataclass
class _Current:
    key: tuple[int, int, str | None, str | None]
    pool: AsyncConnectionPool[Any]
    schema: str


_current: _Current | None = None


async def pool() -> tuple[AsyncConnectionPool[Any], str]:
    """This process's pool and the schema its tables live in."""
    global _current
    loop = asyncio.get_running_loop()
    key = (
        os.getpid(),
        id(loop),
        os.environ.get("CONVEYOR_DATABASE_URL") or os.environ.get("DATABASE_URL"),
        os.environ.get("CONVEYOR_SCHEMA"),
    )
    if _current is not None and _current.key == key:
        return _current.pool, _current.schema
    database = Database.from_env()
    new_pool: AsyncConnectionPool[Any] = AsyncConnectionPool(
        database.url(),
        min_size=1,
        max_size=POOL_SIZE,
        open=False,
        kwargs=database.connect_options(f"conveyor-agents:{os.getpid()}"),
    )
    await new_pool.open(wait=False)
    stale, _current = _current, _Current(key, new_pool, database.schema)
    if stale is not None and stale.key[:2] == key[:2]:
        await stale.pool.close()  # same process and loop: the old pool can be closed cleanly
    return new_pool, database.schema


def schema() -> str:
    """The schema the agents' tables live in, with no connection made."""
    return Database.from_env().schema


async def close() -> None:
    """Close this process's pool (tests, and the CLI before its loop ends)."""
    global _current
    current, _current = _current, None
    if current is not None and current.key[:2] == (os.getpid(), id(asyncio.get_running_loop())):
        await current.pool.close()
