"""JSON read from the server reads as json.loads reads it; bad text is refused."""

from __future__ import annotations

import json

import pytest

from conveyor.protocol import _utf8_json

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
    assert _utf8_json(text.encode()) == json.loads(text)
    assert _utf8_json(text) == json.loads(text)


@pytest.mark.parametrize("text", ['{"a": 1} extra', "", "{", "NaN-"])
def test_bad_text_is_refused(text: str) -> None:
    with pytest.raises(json.JSONDecodeError):
        _utf8_json(text.encode())
