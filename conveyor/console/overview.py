"""The overview: one shared statement's result, shaped per pipeline and stage, and its cache.

The statement (`console_overview` in sql/queries.sql) is bounded by design: exact counts for the
queue (unfinished runs), and for history only what an index reaches within a recent window and a
row cap. See the README, "The console", for why finished totals are windowed, not counted.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from conveyor.pipeline import TERMINAL_STATUSES, Pipeline

FINISHED_WINDOW_SECONDS = 3600.0
EVENTS_WINDOW_SECONDS = 300.0
SAMPLE_ROWS = 10_000
FAILED_CAP = 10_000
LATEST_RUNS = 10
EXACT_COUNT_CAP = 10_000  # the store counts up to one more than this when the estimate is small
OVERVIEW_PARAMETERS: dict[str, Any] = {
    "finished_window": FINISHED_WINDOW_SECONDS,
    "events_window": EVENTS_WINDOW_SECONDS,
    "sample": SAMPLE_ROWS,
    "failed_cap": FAILED_CAP + 1,  # one more than shown: "10,000+" when it is reached
    "latest": LATEST_RUNS,
}


@dataclass
class Worker:
    worker_id: str
    stage: str
    hostname: str
    pid: int
    started_at: str
    heartbeat_at: str
    beat_age_seconds: float
    waiting: bool  # idle, waiting for work (False: busy)


@dataclass
class StageView:
    name: str
    consumes: str
    working: str
    produces: str
    waiting: int = 0  # runs at the stage's input status
    due: int = 0  # of those, the ones whose run_after has come
    oldest_due_seconds: float | None = None
    in_flight: int = 0  # runs at the working status
    orphaned: int = 0  # claimed by a worker that is gone (lease expired or not in the registry)
    completed: int = 0  # in the events window
    retried: int = 0  # attempts sent back to the input status (failed, rescued), events window
    failed: int = 0  # runs that went FAILED in this stage, in the events window
    per_minute: float = 0.0  # completions per minute over the span the events cover
    workers: list[Worker] = field(default_factory=list)


@dataclass
class PipelineView:
    name: str
    declared: bool  # the console's own pipeline: its stages are known
    stages: list[StageView] = field(default_factory=list)
    other_statuses: dict[str, int] = field(default_factory=dict)  # unfinished, not a stage's
    failed_total: int = 0
    failed_capped: bool = False
    finished_recent: dict[str, int] = field(default_factory=dict)
    workers: list[Worker] = field(default_factory=list)  # of stages the console does not know


@dataclass
class LimitView:
    """A flow-control key as the limits table holds it (docs/flow-control.md)."""

    key: str
    in_flight: int  # runs leased under it now
    max_in_flight: int | None
    requests_per_minute: float | None
    tokens_per_minute: float | None
    closed_until: float | None  # Unix time while closed; None while open


@dataclass
class Overview:
    generated_at: str
    pipelines: list[PipelineView]
    finished_span_seconds: float  # the span "finished recently" covers
    finished_sample_full: bool  # True: more finished in the window than the sample holds
    events_span_seconds: float
    events_sample_full: bool
    latest: list[dict[str, Any]]
    runs_estimate: int  # the planner's; 0 before the first ANALYZE
    live_workers: int
    runs_total: int = 0  # what the page says: counted when the estimate is small
    runs_exact: bool = False
    runs_capped: bool = False  # counted up to the cap and reached it: "10,000+"
    limits: list[LimitView] = field(default_factory=list)


def build_overview(row: dict[str, Any], pipeline: Pipeline) -> Overview:
    """Shape the statement's single row; pure, so it is tested without a database."""
    views: dict[str, PipelineView] = {pipeline.name: _declared_view(pipeline)}

    def view(name: str) -> PipelineView:
        return views.setdefault(name, PipelineView(name, declared=False))

    stage_by_status: dict[tuple[str, str], tuple[StageView, str]] = {}
    for stage in views[pipeline.name].stages:
        stage_by_status[(pipeline.name, stage.consumes)] = (stage, "waiting")
        stage_by_status[(pipeline.name, stage.working)] = (stage, "working")

    for item in row["unfinished"]:
        found = stage_by_status.get((item["pipeline"], item["status"]))
        if found is None:
            view(item["pipeline"]).other_statuses[item["status"]] = item["runs"]
            continue
        stage, role = found
        if role == "waiting":
            stage.waiting, stage.due = item["runs"], item["due"]
            stage.oldest_due_seconds = seconds(item["oldest_due_seconds"])
        else:
            stage.in_flight, stage.orphaned = item["runs"], item["orphaned"]

    for item in row["finished"]:
        view(item["pipeline"]).finished_recent[item["status"]] = item["runs"]
    # The cap is on all pipelines' FAILED runs together: once reached, every count is a floor.
    capped = sum(item["runs"] for item in row["failed"]) > FAILED_CAP
    for item in row["failed"]:
        failed = view(item["pipeline"])
        failed.failed_total = min(item["runs"], FAILED_CAP)
        failed.failed_capped = capped

    events_full = row["events_sampled"] >= SAMPLE_ROWS
    events_span = (
        (seconds(row["events_span_seconds"]) or 0.0) if events_full else EVENTS_WINDOW_SECONDS
    )
    stages = {(pipeline.name, s.name): s for s in views[pipeline.name].stages}
    for item in row["events"]:
        moved = stages.get((item["pipeline"], item["stage"] or ""))
        if moved is None:
            continue
        if item["to_status"] == "FAILED":
            moved.failed += item["events"]
        elif item["from_status"] == moved.consumes:  # completed, wherever it was routed
            moved.completed += item["events"]
        elif item["from_status"] == moved.working and item["to_status"] == moved.consumes:
            moved.retried += item["events"]
    for stage in stages.values():
        stage.per_minute = stage.completed * 60.0 / events_span if events_span > 0 else 0.0

    for item in row["workers"]:
        worker = Worker(
            worker_id=item["worker_id"],
            stage=item["stage"],
            hostname=item["hostname"],
            pid=item["pid"],
            started_at=item["started_at"],
            heartbeat_at=item["heartbeat_at"],
            beat_age_seconds=seconds(item["beat_age_seconds"]) or 0.0,
            waiting=item["waiting"],
        )
        home = stages.get((item["pipeline"], item["stage"]))
        (home.workers if home else view(item["pipeline"]).workers).append(worker)

    finished_full = row["finished_sampled"] >= SAMPLE_ROWS
    generated: datetime = row["generated_at"]
    estimate = int(row["runs_estimate"] or 0)
    total, exact, capped = _runs_stored(estimate, row.get("runs_counted"))
    return Overview(
        generated_at=generated.isoformat(),
        pipelines=[
            views[pipeline.name],
            *sorted(
                (v for name, v in views.items() if name != pipeline.name), key=lambda v: v.name
            ),
        ],
        finished_span_seconds=(seconds(row["finished_span_seconds"]) or 0.0)
        if finished_full
        else FINISHED_WINDOW_SECONDS,
        finished_sample_full=finished_full,
        events_span_seconds=events_span,
        events_sample_full=events_full,
        latest=row["latest"],
        runs_estimate=estimate,
        live_workers=len(row["workers"]),
        runs_total=total,
        runs_exact=exact,
        runs_capped=capped,
        limits=[
            LimitView(key, held, cap, rpm, tpm, closed or None)
            for key, cap, rpm, tpm, closed, held in row.get("limits", [])
        ],
    )


def _runs_stored(estimate: int, counted: int | None) -> tuple[int, bool, bool]:
    """(runs, exact, capped) as the page says them: a count when there is one."""
    if counted is None:
        return estimate, False, False
    if counted <= EXACT_COUNT_CAP:
        return counted, True, False
    return EXACT_COUNT_CAP, False, True


def seconds(value: Any) -> float | None:
    """An age from the statement, or None when there is none to show: an infinite timestamp
    makes it infinite (in JSON, the string "Infinity")."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


def _declared_view(pipeline: Pipeline) -> PipelineView:
    return PipelineView(
        pipeline.name,
        declared=True,
        stages=[StageView(s.name, s.consumes, s.working, s.produces) for s in pipeline.stages],
    )


def finished_statuses(view: PipelineView) -> list[tuple[str, int]]:
    """Terminal statuses in a stable order, zeros included, for the page."""
    order = ["DONE", *sorted(TERMINAL_STATUSES - {"DONE"})]
    extra = sorted(set(view.finished_recent) - set(order))
    return [(status, view.finished_recent.get(status, 0)) for status in [*order, *extra]]


class OverviewCache:
    """At most one overview statement in flight, and none while the last result is fresh.

    However many browsers ask, they share the result of the last refresh; a refresh that is
    already running is awaited, not repeated.
    """

    def __init__(self, load: Callable[[], Awaitable[Overview]], max_age: float) -> None:
        self._load = load
        self.max_age = max_age
        self._value: Overview | None = None
        self._loaded_at = float("-inf")
        self._lock = asyncio.Lock()
        self.refreshes = 0

    @property
    def age(self) -> float:
        return time.monotonic() - self._loaded_at

    async def get(self) -> Overview:
        if self._value is not None and self.age < self.max_age:
            return self._value
        return await self.refresh(older_than=self.max_age)

    async def refresh(self, older_than: float = 0.0) -> Overview:
        """Reload unless a result younger than `older_than` seconds exists (checked under the
        lock, so callers queued behind one refresh all take its result)."""
        async with self._lock:
            if self._value is None or self.age >= older_than:
                self._value = await self._load()
                self._loaded_at = time.monotonic()
                self.refreshes += 1
            return self._value
