"""Fan-out and join: a handler that creates child runs (FanOut), what the stage that joins them
sees of each (Child), and the checks a fan-out passes before the engine stores it. No I/O."""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any
from uuid import UUID

# One fan-out is one transaction; past these, split the work in stages.
MAX_CHILDREN = 100_000
MAX_INPUT_BYTES = 64 * 1024 * 1024  # the children's inputs together, as JSON
CHILD_FAILURE_POLICIES = ("fail", "join")
_NAME = re.compile(r"^[a-z][a-z0-9_]{0,30}$")
_STATUS = re.compile(r"^[A-Z][A-Z0-9_]{0,30}$")


@dataclass(frozen=True, slots=True)
class FanOut:
    """What a handler returns to create child runs, one per input in `children`, in the
    transaction that stores its own `output`. The run then waits (in its stage's `waiting`
    status) until every child has finished, and moves on to its stage's `produces`, where the
    stage that joins them sees them as `run.children`, in order::

        def split(run: Run) -> FanOut:
            pages = run.input["pages"]
            return FanOut([{"page": p} for p in pages], {"pages": len(pages)})

    Children start in the stage's `fan_out` status of the same pipeline, or in `status` of
    `pipeline` when both are given. An empty list moves the run on at once."""

    children: Sequence[dict[str, Any]]
    output: Any = field(default_factory=dict)
    status: str | None = None
    pipeline: str | None = None


@dataclass(frozen=True, slots=True)
class Child:
    """One child run, as the stage that joins a fan-out sees it (`Run.children`)."""

    index: int
    id: UUID
    status: str  # where it ended: its pipeline's final status, DONE, FAILED or CANCELLED
    outputs: dict[str, Any]
    error: str | None

    @property
    def succeeded(self) -> bool:
        return self.status not in ("FAILED", "CANCELLED")


@dataclass(frozen=True, slots=True)
class Spawn:
    """A checked fan-out, as the engine stores it: the children's inputs as JSON text."""

    pipeline: str
    status: str
    inputs: tuple[str, ...]


def fan_out_problem(
    fan_out: FanOut, *, stage: str, declared: str | None, pipeline: str
) -> str | None:
    """Why a handler's FanOut cannot be stored, in one line, or None. The children's inputs
    are checked one by one after this (child_input_json)."""
    where = f"FanOutError: stage {stage!r}"
    if declared is None:
        return f"{where} returned FanOut, but declares no fan_out status for children"
    if isinstance(fan_out.children, str | bytes | dict) or not isinstance(
        fan_out.children, Sequence
    ):
        return f"{where} returned FanOut whose children are not a list of inputs"
    if len(fan_out.children) > MAX_CHILDREN:
        return f"{where} returned {len(fan_out.children)} children; at most {MAX_CHILDREN}"
    target_pipeline = pipeline if fan_out.pipeline is None else fan_out.pipeline
    if type(target_pipeline) is not str or not _NAME.match(target_pipeline):
        return f"{where} returned FanOut(pipeline={fan_out.pipeline!r}), not a pipeline name"
    if target_pipeline == pipeline:
        if fan_out.status not in (None, declared):
            return (
                f"{where} returned FanOut(status={fan_out.status!r}); its children start in "
                f"{declared}"
            )
    elif type(fan_out.status) is not str or not _STATUS.match(fan_out.status):
        return (
            f"{where} returned FanOut(pipeline={target_pipeline!r}) without the status its "
            f"children start in (status={fan_out.status!r})"
        )
    return None
