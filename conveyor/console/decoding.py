"""Values the console reads from the database that Python cannot hold, made shown, not fatal.

Any login that can write a run can store what PostgreSQL accepts and Python does not: timestamps
at 'infinity' or beyond the year 9999, JSON nested deeper than Python's decoder (or a page) can
recurse. The console's connections load those as stand-ins that keep PostgreSQL's own text, so
one such row never takes a page down.
"""

from __future__ import annotations

import json
import re
from datetime import UTC, datetime
from typing import Any

import psycopg
from psycopg.types.datetime import TimestamptzLoader
from psycopg.types.json import set_json_loads

# Deeper JSON is shown as its text: pretty-printing and the JSON answer recurse once per level.
MAX_JSON_DEPTH = 100
_TIMESTAMP_TEXT = re.compile(
    r"^(-?infinity|\d{4,6}-\d{2}-\d{2} \d{2}:\d{2}:\d{2}(\.\d{1,6})?[+-]\d{2}(:\d{2}){0,2}( BC)?)$"
)


class OutOfRange(datetime):
    """A timestamp beyond Python's datetime ('infinity', after 9999, BC), clamped to
    datetime.max or .min so that it sorts and subtracts; `text` is PostgreSQL's own."""

    text: str = ""

    @classmethod
    def of(cls, text: str) -> OutOfRange:
        early = text.startswith("-") or text.endswith("BC")
        edge = datetime.min if early else datetime.max
        value = cls.combine(edge.date(), edge.time(), UTC)
        value.text = text
        return value

    @property
    def shown(self) -> str:
        return self.text or ("-infinity" if self.year == 1 else "infinity")


def timestamp_text(text: str) -> OutOfRange | None:
    """PostgreSQL's text of a timestamp Python cannot hold, or None for anything else."""
    return OutOfRange.of(text) if _TIMESTAMP_TEXT.match(text) else None


def sql_timestamp(value: datetime) -> datetime | str:
    """A timestamp as a query parameter: a stand-in goes back as PostgreSQL's text."""
    return value.shown if isinstance(value, OutOfRange) else value


class TolerantTimestamptzLoader(TimestamptzLoader):
    def load(self, data: Any) -> datetime:
        try:
            return super().load(data)
        except psycopg.DataError:
            return OutOfRange.of(bytes(data).decode("ascii", "replace"))


class DeepJSON:
    """JSON nested more than MAX_JSON_DEPTH levels: kept as the database's text."""

    def __init__(self, text: str) -> None:
        self.text = text

    def __repr__(self) -> str:
        return f"DeepJSON({len(self.text)} characters)"


def load_json(data: str | bytes) -> Any:
    text = data if isinstance(data, str) else bytes(data).decode()
    try:
        value = json.loads(text)
    except RecursionError:
        return DeepJSON(text)
    # Counting brackets is cheap and bounds the depth: most documents need no walk at all.
    if text.count("[") + text.count("{") > MAX_JSON_DEPTH and _deeper_than(value, MAX_JSON_DEPTH):
        return DeepJSON(text)
    return value


def _deeper_than(value: Any, limit: int) -> bool:
    """Without recursion: the walk must not fail on what it is guarding against."""
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict):
            children: Any = item.values()
        elif isinstance(item, list):
            children = item
        else:
            continue
        if depth > limit:
            return True
        stack.extend((child, depth + 1) for child in children)
    return False


def register(conn: psycopg.Connection[Any]) -> None:
    """Make one of the console's connections load such values as stand-ins."""
    conn.adapters.register_loader("timestamptz", TolerantTimestamptzLoader)
    set_json_loads(load_json, conn)
