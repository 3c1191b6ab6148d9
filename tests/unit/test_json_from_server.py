"""JSON read from the server reads as json.loads reads it; bad text is refused."""

from __future__ import annotations

import json

import pytest

from conveyor.server_json import Undecodable, json_from_server

TEXTS = [
    "{}",
    '{"a": [1, 2.5, null, true, false], "b": "x\\u00e9\\n", "c": {"d": []}}',
    ' {"a": 1} ',
    '"text"',
    "-1.5e3",
    "null",
    "[]",
]


@pytest.mark.parametrize("text", TEXTS)
def test_reads_as_json_loads(text: str) -> None:
    assert json_from_server(text.encode()) == json.loads(text)
    assert json_from_server(text) == json.loads(text)


@pytest.mark.parametrize("text", ['{"a": 1} extra', "", "{", "NaN-"])
def test_bad_text_is_refused_as_undecodable(text: str) -> None:
    """Never an exception: it would fail the whole claim, and every claim after it."""
    value = json_from_server(text.encode())
    assert isinstance(value, Undecodable) and value.reason.startswith("JSON could not be decoded")


def test_json_nested_deeper_than_python_recurses_is_undecodable() -> None:
    value = json_from_server(("[" * 5000 + "]" * 5000).encode())
    assert value == Undecodable("JSON nested too deeply to decode")


def test_text_that_is_not_utf8_is_undecodable() -> None:
    assert isinstance(json_from_server(b"\xff"), Undecodable)


def test_every_empty_object_read_is_a_new_one() -> None:
    """A handler may fill the dict it is given: the next run's must still be empty."""
    for data in (b"{}", memoryview(b"{}"), "{}"):
        first = json_from_server(data)
        first["written"] = True
        assert json_from_server(data) == {} and json_from_server(data) is not first
