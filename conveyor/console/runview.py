"""One run as the run page shows it: outputs per stage, attempts, where the time went, and the
runs it fanned out to or was fanned out from.

Pure: built from `get_run`, `run_history` and `children_of` rows, so it is tested without a
database.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any
from uuid import UUID

from conveyor.console.decoding import MAX_JSON_DEPTH, DeepJSON
from conveyor.pipeline import Pipeline
from conveyor.runs import route_of

TIMELINE_WIDTH = 1000.0  # SVG user units; the page scales the drawing to its width


@dataclass
class Bar:
    start_seconds: float  # from the run's creation
    seconds: float
    x: float = 0.0  # position and width in TIMELINE_WIDTH units
    width: float = 0.0


@dataclass
class TimelineRow:
    """One attempt (queued, then running) or one transition without an attempt (a mark)."""

    label: str  # "analyze #1", or "FAILED → NEW" for a retry
    outcome: str  # the status it led to
    queued: Bar | None = None  # waiting to be claimed: backoff, or a busy stage
    running: Bar | None = None  # the handler
    mark: Bar | None = None


@dataclass
class StageTime:
    stage: str
    queued_seconds: float = 0.0
    running_seconds: float = 0.0
    attempts: int = 0


@dataclass
class Children:
    """A parent's children (of every fan-out it made): counted in full, listed in part."""

    total: int
    by_status: list[tuple[str, int]]
    listed: list[dict[str, Any]]  # the first ones in index order: index, id, status
    more: int  # counted but not listed
    waiting_for: int  # children the unfinished run still waits for; 0 once it has moved on


@dataclass
class RunView:
    run: dict[str, Any]
    history: list[dict[str, Any]]
    outputs: list[tuple[str, str]]  # (stage, pretty JSON), in pipeline order
    input_json: str
    timeline: list[TimelineRow]
    stage_times: list[StageTime]
    total_seconds: float
    failed_stage: str | None  # where a retry starts by default
    finished: bool
    can_retry: bool
    can_cancel: bool
    stages: list[str] = field(default_factory=list)
    route: list[str] = field(default_factory=list)  # the stages visited, in order
    children: Children | None = None  # None: the run has no children
    parent_id: UUID | None = None  # set for a child run, with its index among the parent's children
    child_index: int | None = None


def build_run_view(
    run: dict[str, Any],
    history: list[dict[str, Any]],
    pipeline: Pipeline,
    now: datetime,
    children: dict[str, Any] | None = None,
) -> RunView:
    declared = [s.name for s in pipeline.stages] if run["pipeline"] == pipeline.name else []
    timeline, times, total = _timeline(run, history, now)
    failed_stage = next((h["stage"] for h in reversed(history) if h["stage"]), None)
    finished = run["finished_at"] is not None
    return RunView(
        run=run,
        history=history,
        outputs=_outputs(run["outputs"], declared),
        input_json=pretty(run["input"]),
        timeline=timeline,
        stage_times=times,
        total_seconds=total,
        failed_stage=failed_stage,
        finished=finished,
        # Retrying needs the stage layout, which the console knows for its own pipeline only.
        can_retry=run["status"] in ("FAILED", "CANCELLED") and bool(declared),
        can_cancel=not finished,
        stages=declared,
        route=route_of(history),
        children=_children(children, run.get("children_pending"), finished),
        parent_id=run.get("parent_id"),
        child_index=run.get("child_index"),
    )


def _children(found: dict[str, Any] | None, pending: int | None, finished: bool) -> Children | None:
    """`found` is what `runs.children_of` returns."""
    if not found or not found["total"]:
        return None
    listed = list(found["first"])
    return Children(
        total=found["total"],
        by_status=list(found["by_status"].items()),
        listed=listed,
        # Counted and listed by two statements: a child added in between is not "-1 more".
        more=max(found["total"] - len(listed), 0),
        waiting_for=0 if finished else max(pending or 0, 0),
    )


def _outputs(outputs: Any, declared: list[str]) -> list[tuple[str, str]]:
    """Per stage in pipeline order; anything but an object (written by hand) shown whole."""
    if not outputs:
        return []
    if not isinstance(outputs, dict):
        return [("(all outputs)", pretty(outputs))]
    ordered = [name for name in declared if name in outputs] + sorted(
        name for name in outputs if name not in declared
    )
    return [(name, pretty(outputs[name])) for name in ordered]


def pretty(value: Any) -> str:
    if isinstance(value, DeepJSON):
        return f"(nested more than {MAX_JSON_DEPTH} levels deep: shown as stored)\n{value.text}"
    return json.dumps(value, indent=2, ensure_ascii=False, sort_keys=False, default=str)


def _timeline(
    run: dict[str, Any], history: list[dict[str, Any]], now: datetime
) -> tuple[list[TimelineRow], list[StageTime], float]:
    """Each attempt is the wait since the previous transition (queued: backoff, a busy stage)
    followed by the handler's run; transitions without an attempt (cancel, retry) are marks."""
    created: datetime = run["created_at"]
    end: datetime = run["finished_at"] or now
    total = max((end - created).total_seconds(), 1e-6)
    rows: list[TimelineRow] = []
    times: dict[str, StageTime] = {}
    previous = created
    for event in history:
        stage = event["stage"] or ""
        started: datetime | None = event["started_at"]
        duration = event["duration_seconds"]
        if started is not None and duration is not None:
            queued = max((started - previous).total_seconds(), 0.0)
            entry = times.setdefault(stage, StageTime(stage))
            entry.queued_seconds += queued
            entry.running_seconds += duration
            entry.attempts += 1
            rows.append(
                TimelineRow(
                    f"{stage} #{event['attempt']}" if event["attempt"] else stage,
                    event["to_status"],
                    queued=_bar(_offset(previous, created), queued, total),
                    running=_bar(_offset(started, created), duration, total),
                )
            )
            previous = max(previous, _after(started, duration))
        else:
            at = event["created_at"]
            rows.append(
                TimelineRow(
                    f"{event['from_status'] or ''} → {event['to_status']}",
                    event["to_status"],
                    mark=_bar(_offset(at, created), 0.0, total),
                )
            )
            previous = at
    return rows, list(times.values()), total


def _after(at: datetime, seconds: float) -> datetime:
    """`at` plus `seconds`, or `at` itself past the end of datetime ('infinity' rows)."""
    try:
        return at + timedelta(seconds=seconds)
    except (OverflowError, ValueError):
        return at


def _bar(start: float, seconds: float, total: float) -> Bar:
    x = round(min(start / total, 1.0) * TIMELINE_WIDTH, 2)
    width = min(max(seconds / total * TIMELINE_WIDTH, 1.0), max(TIMELINE_WIDTH - x, 1.0))
    return Bar(start, seconds, x, round(width, 2))


def _offset(at: datetime, created: datetime) -> float:
    return max((at - created).total_seconds(), 0.0)
