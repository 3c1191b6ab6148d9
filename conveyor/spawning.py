"""Storing fan-outs: the children of runs whose output was just stored, created a few parents
at a time in the completing transaction (sql/queries.sql `fan_out`)."""

from __future__ import annotations

from typing import Any
from uuid import UUID

from psycopg import AsyncConnection

from conveyor.batch_arrays import number_array, text_array, uuid_array
from conveyor.fan_out import Spawn

# One fan_out statement carries at most about this many children, or bytes of their inputs.
FAN_OUT_ROWS = 20_000
FAN_OUT_BYTES = 32 * 1024 * 1024

Parent = tuple[UUID, Spawn | None]


async def store_fan_outs(
    conn: AsyncConnection[Any], statement: str, params: dict[str, Any], parents: list[Parent]
) -> None:
    """The children of `parents` (none for a run that created none), each statement bounded in
    rows and bytes."""
    chunk: list[Parent] = []
    rows = size = 0
    for parent in parents:
        inputs = parent[1].inputs if parent[1] is not None else ()
        if chunk and (rows + len(inputs) > FAN_OUT_ROWS or size > FAN_OUT_BYTES):
            await _store(conn, statement, params, chunk)
            chunk, rows, size = [], 0, 0
        chunk.append(parent)
        rows += len(inputs)
        size += sum(map(len, inputs))
    if chunk:
        await _store(conn, statement, params, chunk)


async def _store(
    conn: AsyncConnection[Any], statement: str, params: dict[str, Any], parents: list[Parent]
) -> None:
    child_parents: list[UUID] = []
    indexes: list[int] = []
    pipelines: list[str] = []
    statuses: list[str] = []
    inputs: list[str] = []
    for run_id, spawn in parents:
        if spawn is None:
            continue
        width = len(spawn.inputs)
        child_parents.extend([run_id] * width)
        indexes.extend(range(width))
        pipelines.extend([spawn.pipeline] * width)
        statuses.extend([spawn.status] * width)
        inputs.extend(spawn.inputs)
    await conn.execute(
        statement,
        {
            **params,
            "parents": uuid_array([run_id for run_id, _ in parents]),
            "widths": number_array([len(spawn.inputs) if spawn else 0 for _, spawn in parents]),
            "child_parents": uuid_array(child_parents),
            "child_indexes": number_array(indexes),
            "child_pipelines": text_array(pipelines),
            "child_statuses": text_array(statuses),
            "child_inputs": text_array(inputs),
        },
    )
