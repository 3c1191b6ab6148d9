"""Run ids are UUID version 7: the creation time in their first 48 bits, so the runs in flight
sit together at the right edge of the primary key's index."""

from __future__ import annotations

import time
import uuid

import psycopg


def test_new_runs_get_time_ordered_version_7_ids(
    conn: psycopg.Connection[tuple[object, ...]],
) -> None:
    before_ms = int(time.time() * 1000)
    first = conn.execute(
        "INSERT INTO conveyor.pipeline_runs (pipeline) SELECT 'agents' FROM generate_series(1, 500)"
        " RETURNING id"
    ).fetchall()
    time.sleep(0.01)
    later = conn.execute(
        "INSERT INTO conveyor.pipeline_runs DEFAULT VALUES RETURNING id"
    ).fetchone()
    after_ms = int(time.time() * 1000)
    ids = [row[0] for row in first]
    assert all(isinstance(i, uuid.UUID) and i.version == 7 for i in ids)
    assert all(i.variant == uuid.RFC_4122 for i in ids)
    assert len(set(ids)) == 500
    stamps = [int.from_bytes(i.bytes[:6], "big") for i in ids]
    # the server's clock and ours agree to well within a second on one machine
    assert before_ms - 1000 <= min(stamps) <= max(stamps) <= after_ms + 1000
    assert stamps == sorted(stamps)  # within a statement, in creation order
    assert later is not None and later[0] > max(ids)  # a later insert sorts after
