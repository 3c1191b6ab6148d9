"""The array literals the batched statements receive survive PostgreSQL's parser unchanged."""

from __future__ import annotations

import uuid

import psycopg

from conveyor.batch_arrays import microseconds_array, number_array, text_array, uuid_array


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


def test_times_travel_as_whole_microseconds(conn: psycopg.Connection[tuple[object, ...]]) -> None:
    """What complete_if_leased and fail_if_leased make of them: the same instant and span,
    to the microsecond (truncated, not rounded up)."""
    started, duration = 1795706355.6562083, 0.0001234
    row = conn.execute(
        "SELECT extract(epoch FROM 'epoch'::timestamptz + s * interval '1 microsecond'),"
        "       extract(epoch FROM d * interval '1 microsecond')"
        "  FROM unnest(%s::int8[], %s::int8[]) AS t(s, d)",
        (microseconds_array([started]), microseconds_array([duration])),
    ).fetchone()
    assert row is not None
    assert 0 <= started - float(row[0]) < 1e-6
    assert float(row[1]) == 0.000123
