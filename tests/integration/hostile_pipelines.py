"""A pipeline whose handlers return, on request, outputs that cannot be a stage's JSON object.

The run's input names the output: {"bad": "<kind>"} from the async stage "emit", or
{"bad": "<kind>", "sync": true} from the sync stage "emit_sync" (run in a thread). Anything else
gets a plain object from both stages.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from conveyor import Backoff, Pipeline, Run, Stage


def _deep() -> dict[str, Any]:
    root: dict[str, Any] = {}
    node = root
    for _ in range(100_000):  # deeper than json.dumps can recurse
        node["a"] = {}
        node = node["a"]
    return root


def _cycle() -> dict[str, Any]:
    loop: dict[str, Any] = {}
    loop["self"] = loop
    return loop


BAD_OUTPUTS: dict[str, Callable[[], Any]] = {
    "list": lambda: [1, 2],
    "str": lambda: "text",
    "int": lambda: 7,
    "float": lambda: 1.5,
    "none": lambda: None,
    "object": lambda: object(),
    "nested_object": lambda: {"x": {1, 2}},
    "nan": lambda: {"x": float("nan")},
    "inf": lambda: {"x": float("inf")},
    "int_key": lambda: {1: "a"},
    "tuple_key": lambda: {(1, 2): "a"},
    "deep": _deep,
    "cycle": _cycle,
    "nul": lambda: {"x": "a\x00b"},
}


def _output(run: Run, sync: bool) -> Any:
    kind = run.input.get("bad")
    if kind and bool(run.input.get("sync")) == sync:
        return BAD_OUTPUTS[kind]()
    return {"stage": run.stage}


async def emit(run: Run) -> Any:
    return _output(run, sync=False)


def emit_sync(run: Run) -> Any:
    return _output(run, sync=True)


pipeline = Pipeline(
    "hostile",
    [
        Stage(
            "emit",
            emit,
            consumes="NEW",
            produces="EMITTED",
            max_attempts=3,
            backoff=Backoff(base=0.05, cap=0.2),
        ),
        Stage(
            "emit_sync",
            emit_sync,
            consumes="EMITTED",
            produces="DONE",
            max_attempts=3,
            backoff=Backoff(base=0.05, cap=0.2),
        ),
    ],
)
