"""Runs as the server sends them: a claimed row, and JSON (jsonb columns, hand-off payloads)
read fast and never raising."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any
from uuid import UUID

# id, input, outputs, attempt, seconds it waited to be claimed, whether it was rescued
ClaimedRow = tuple[UUID, dict[str, Any], dict[str, Any], int, float, bool]

_decoder = json.JSONDecoder()
_json_decode = _decoder.decode
# set by JSONDecoder.__init__ (the C scanner when there is one); typeshed does not declare it
_scan_once: Callable[[str, int], tuple[Any, int]] = _decoder.scan_once  # type: ignore[attr-defined]


@dataclass(frozen=True, slots=True)
class Undecodable:
    """A claimed value Python cannot decode (jsonb nested deeper than its recursion limit):
    the worker fails the run with `reason` instead of running its handler."""

    reason: str


def json_from_server(data: str | bytes) -> Any:
    """JSON from the server, which sends it as UTF-8: json.loads would first work out the
    encoding of the bytes, for every value. jsonb's text has no surrounding whitespace, so the
    value is read by the decoder's C scanner directly (decode() would first match whitespace on
    both sides with a regular expression); anything else goes through decode(), which judges it.
    A value that cannot be decoded comes back as Undecodable: an exception here would fail the
    whole claim, and the same run would fail every claim after it."""
    if data == b"{}":  # the outputs of every run a first stage claims
        return {}
    try:
        text = data if isinstance(data, str) else str(data, "utf-8")
        try:
            value, end = _scan_once(text, 0)
        except StopIteration:
            return _json_decode(text)
        return value if end == len(text) else _json_decode(text)
    except RecursionError:
        return Undecodable("JSON nested too deeply to decode")
    except ValueError as exc:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        return Undecodable(f"JSON could not be decoded: {exc}")
