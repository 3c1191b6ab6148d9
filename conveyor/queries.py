"""The protocol's named statements, loaded from sql/queries.sql (the protocol in one place)."""

from __future__ import annotations

import re
from functools import cache
from importlib import resources

from conveyor.db import schema_identifier

_HEADER = re.compile(r"^-- ([a-z_]+) --$", re.MULTILINE)


def read_sql(filename: str) -> str:
    return resources.files("conveyor.sql").joinpath(filename).read_text(encoding="utf-8")


def for_schema(text: str, schema: str) -> str:
    return text.replace("@schema@", schema_identifier(schema))


@cache
def load(schema: str) -> dict[str, str]:
    """Named statements of queries.sql, with the schema substituted."""
    text = for_schema(read_sql("queries.sql"), schema)
    parts = _HEADER.split(text)
    statements: dict[str, str] = {}
    for name, body in zip(parts[1::2], parts[2::2], strict=True):
        if name in statements:
            raise ValueError(f"queries.sql names two statements {name!r}")
        lines = [line for line in body.splitlines() if not line.lstrip().startswith("--")]
        statements[name] = "\n".join(lines).strip().rstrip(";")
    return statements
