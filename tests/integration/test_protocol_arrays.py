"""The array literals the batched statements receive survive PostgreSQL's parser unchanged."""

from __future__ import annotations

import uuid

import psycopg

from conveyor.protocol import number_array, text_array, uuid_array


def test_array_literals_round_trip(conn: psycopg.Connection[tuple[object, ...]]) -> None:
    texts = [
        '{"a": "b\\\\c"}',
        "",
        "NULL",
        None,
        'quote " and \\ backslash',
        "a,b{c}",
        "line\nnext",
        "é ✓",
    ]
    numbers = [1, None, -3, 2.5, 1e-07, 1795706355.6562083]
    ids = [uuid.uuid4() for _ in range(3)]
    row = conn.execute(
        "SELECT %s::text[], %s::float8[], %s::uuid[], %s::text[]",
        (text_array(texts), number_array(numbers), uuid_array(ids), text_array([])),
    ).fetchone()
    assert row == (texts, [float(n) if n is not None else None for n in numbers], ids, [])
