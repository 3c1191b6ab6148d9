"""The idempotency key stays unique per pipeline, and the plain-SQL insert of the README, with its
conflict target, is harmless to repeat."""

from __future__ import annotations

import psycopg
import pytest

README_INSERT = """
INSERT INTO conveyor.pipeline_runs (pipeline, input, idempotency_key)
VALUES (%s, '{"question": "What is a lease?"}', %s)
ON CONFLICT (pipeline, idempotency_key) WHERE idempotency_key IS NOT NULL DO NOTHING
RETURNING id
"""


def test_a_key_is_unique_per_pipeline_and_runs_without_one_are_not_indexed(
    conn: psycopg.Connection[tuple[object, ...]],
) -> None:
    first = conn.execute(README_INSERT, ("agents", "order-1234")).fetchall()
    again = conn.execute(README_INSERT, ("agents", "order-1234")).fetchall()
    elsewhere = conn.execute(README_INSERT, ("other", "order-1234")).fetchall()
    assert len(first) == 1 and again == [] and len(elsewhere) == 1
    for _ in range(2):  # no key: no conflict, however many
        conn.execute(README_INSERT, ("agents", None))
    counts = conn.execute(
        "SELECT count(*) FILTER (WHERE idempotency_key IS NULL), count(*)"
        " FROM conveyor.pipeline_runs"
    ).fetchone()
    assert counts == (2, 4)
    with pytest.raises(psycopg.errors.UniqueViolation):
        conn.execute(
            "INSERT INTO conveyor.pipeline_runs (pipeline, idempotency_key)"
            " VALUES ('agents', 'order-1234')"
        )
    # only keyed runs have an entry in the key's index
    row = conn.execute(
        "SELECT pg_get_indexdef('conveyor.pipeline_runs_idempotency'::regclass)"
    ).fetchone()
    assert row is not None and str(row[0]).endswith("WHERE (idempotency_key IS NOT NULL)")
