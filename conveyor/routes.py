"""Routing: a handler that chooses where its run goes next (Route), and what a pipeline's routes
make of each status a stage may send a run to: whether it ends the run, and whether it enters a
stage the run can come back to (a loop, bounded by that stage's max_visits). No I/O."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True, slots=True)
class Route:
    """What a handler returns to send its run to status `to` rather than its stage's `produces`:
    one of the statuses the stage declares (`Stage.routes`). `output` is the stage's output, as
    a handler's plain return value would be::

        def triage(run: Run) -> Route:
            if run.input.get("follow_up"):
                return Route("ASSEMBLED", {"skipped": "retrieval"})
            return Route("ANALYZED", {"query": run.input["text"]})
    """

    to: str
    output: Any = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Destination:
    """A status a stage may send a run to, as the engine applies it: whether the run ends there,
    and, when it enters a stage on a loop, that stage and how many times a run may run it."""

    status: str
    ends: bool
    loop_stage: str | None = None
    max_visits: int | None = None


def stages_on_loops(edges: Mapping[str, Iterable[str]]) -> set[str]:
    """The stages a run can come back to: those reachable from themselves through `edges`
    (a stage -> the stages that consume what it may produce)."""
    on_loops: set[str] = set()
    for start in edges:
        seen: set[str] = set()
        todo = list(edges[start])
        while todo:
            name = todo.pop()
            if name == start:
                on_loops.add(start)
                break
            if name not in seen:
                seen.add(name)
                todo.extend(edges.get(name, ()))
    return on_loops


def undeclared(stage: str, to: Any, allowed: Iterable[str]) -> str:
    """The error of a run whose handler chose a status its stage does not declare."""
    return (
        f"RouteError: stage {stage!r} returned Route({to!r}), which it does not declare "
        f"(it may send runs to: {', '.join(sorted(allowed))})"
    )
