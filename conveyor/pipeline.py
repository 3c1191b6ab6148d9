"""Declaring a pipeline: ordered stages, each moving runs from one status to the next. No I/O."""

from __future__ import annotations

import dataclasses
import functools
import importlib
import inspect
import random
import re
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from conveyor.fan_out import CHILD_FAILURE_POLICIES
from conveyor.handler_run import Run
from conveyor.limits import Limit, flow_control_problem
from conveyor.routes import Destination, stages_on_loops
from conveyor.settings import Settings

TERMINAL_STATUSES = frozenset({"DONE", "FAILED", "CANCELLED"})
_NAME = re.compile(r"^[a-z][a-z0-9_]{0,30}$")
_STATUS = re.compile(r"^[A-Z][A-Z0-9_]{0,30}$")


class PipelineError(Exception):
    """A pipeline declaration that cannot run; the message is one line."""


class PermanentError(Exception):
    """Raised by a handler for a failure no retry can fix (bad input): the run becomes FAILED at
    once, with this error, instead of being retried."""


Handler = Callable[[Run], Any] | Callable[[Run], Awaitable[Any]]


class TextInput(Protocol):
    """Turns a line of text (and an optional session) into a run's input: what `conveyor submit
    TEXT [--session S]` inserts. A pipeline declares its own with `Pipeline(text_input=...)`."""

    def __call__(self, text: str, session: str | None = None) -> dict[str, Any]: ...


def plain_text_input(text: str, session: str | None = None) -> dict[str, Any]:
    """The default TextInput: `{"text": TEXT}`, with `"session_id"` when a session is given."""
    return {"text": text} if session is None else {"text": text, "session_id": session}


@dataclass(frozen=True)
class Backoff:
    """Exponential backoff with full jitter: attempt n waits up to base * 2**(n-1), capped."""

    base: float = 1.0
    cap: float = 300.0

    def delay(self, attempt: int) -> float:
        ceiling = min(self.cap, self.base * 2 ** max(attempt - 1, 0))
        return random.uniform(ceiling / 2, ceiling)


@dataclass(frozen=True)
class Stage:
    name: str
    handler: Handler
    consumes: str
    produces: str
    working: str = ""  # defaults to <NAME>_RUNNING
    concurrency: int = 10
    batch: int = 0  # 0: as many as there are free slots
    timeout: float = 300.0
    max_attempts: int = 3
    backoff: Backoff = field(default_factory=Backoff)
    # Flow control (conveyor/limits.py): the keys its runs go under, and a cap on the runs of
    # this stage leased at once in the whole deployment (None: no cap).
    limits: Sequence[Limit] = ()
    max_in_flight: int | None = None
    # Fair shares: the input field that names a run's group (a tenant, a customer); claims
    # interleave the groups, with at most max_in_flight_per_group leased per group at once.
    group_by: str | None = None
    max_in_flight_per_group: int | None = None
    group_tokens_per_day: int | None = None  # a group's token budget, midnight to midnight UTC
    # Routing (conveyor/routes.py): the other statuses a handler may send a run to by returning
    # Route(status, output); and, when the stage is on a loop, how many times one run may run it.
    routes: Sequence[str] = ()
    max_visits: int = 10
    # Fan-out (conveyor/fan_out.py): the status child runs start in when the handler returns
    # FanOut. The run waits in `waiting` (default <NAME>_WAITING) until they have all finished,
    # then goes on to `produces`. A child that fails or is cancelled fails the run at once
    # (on_child_failure="fail"), or is joined like the others ("join").
    fan_out: str | None = None
    waiting: str = ""
    on_child_failure: str = "fail"

    def __post_init__(self) -> None:
        object.__setattr__(self, "limits", tuple(self.limits))
        if not isinstance(self.routes, str):  # a lone status is refused by validate()
            object.__setattr__(self, "routes", tuple(self.routes))
        if not self.working:
            object.__setattr__(self, "working", f"{self.name.upper()}_RUNNING")
        if self.fan_out is not None and not self.waiting:
            object.__setattr__(self, "waiting", f"{self.name.upper()}_WAITING")
        if not self.batch:
            object.__setattr__(self, "batch", min(self.concurrency, 50))

    @functools.cached_property  # asked once per run
    def is_async(self) -> bool:
        return inspect.iscoroutinefunction(self.handler) or inspect.iscoroutinefunction(
            getattr(self.handler, "__call__", None)  # noqa: B004
        )


@dataclass(frozen=True)
class Pipeline:
    """A named, ordered chain of stages. `text_input` builds a run's input from a line of text
    (`conveyor submit TEXT`); the default is `{"text": TEXT}` (plain_text_input)."""

    name: str
    stages: Sequence[Stage]
    text_input: TextInput = plain_text_input

    def __post_init__(self) -> None:
        object.__setattr__(self, "stages", tuple(self.stages))
        validate(self)

    def stage(self, name: str) -> Stage:
        for stage in self.stages:
            if stage.name == name:
                return stage
        known = ", ".join(s.name for s in self.stages)
        raise PipelineError(f"pipeline {self.name!r} has no stage {name!r} (stages: {known})")

    @property
    def final_status(self) -> str:
        return self.stages[-1].produces

    def is_terminal(self, status: str) -> bool:
        return status in TERMINAL_STATUSES or status == self.final_status

    def succeeded(self, status: str) -> bool:
        """Whether a run at `status` has ended well: DONE, or the final status (a route may
        end a run at either)."""
        return status == "DONE" or status == self.final_status

    @functools.cached_property
    def loop_stages(self) -> frozenset[str]:
        """The stages a run can come back to through the stages' routes."""
        consumer = {stage.consumes: stage.name for stage in self.stages}
        edges = {
            stage.name: [consumer[s] for s in (stage.produces, *stage.routes) if s in consumer]
            for stage in self.stages
        }
        return frozenset(stages_on_loops(edges))

    def joins(self, stage: Stage) -> bool:
        """Whether `stage` consumes what a stage that fans out produces: its runs come with
        their children (Run.children)."""
        return any(s.fan_out is not None and s.produces == stage.consumes for s in self.stages)

    @functools.cached_property
    def fans_out(self) -> bool:
        """Whether a stage of this pipeline creates child runs (so its runs may be children)."""
        return any(stage.fan_out is not None for stage in self.stages)

    def destinations(self, stage: Stage) -> dict[str, Destination]:
        """Where `stage` may send a run (its `produces` and its `routes`, and its `waiting`
        when it fans out), as the engine applies each."""
        consumers = {s.consumes: s for s in self.stages}
        found = {}
        if stage.fan_out is not None:
            found[stage.waiting] = Destination(stage.waiting, False)
        for status in (stage.produces, *stage.routes):
            entered = consumers.get(status)
            on_loop = entered is not None and entered.name in self.loop_stages
            found[status] = Destination(
                status,
                self.is_terminal(status),
                entered.name if on_loop and entered else None,
                entered.max_visits if on_loop and entered else None,
            )
        return found

    def with_settings(self, settings: Settings) -> Pipeline:
        """The same pipeline with the per-stage CONVEYOR_<STAGE>_* overrides applied."""
        known = {stage.name for stage in self.stages}
        for name in settings.stage_overrides:
            if name not in known:
                raise PipelineError(
                    f"CONVEYOR_{name.upper()}_* is set but pipeline {self.name!r} has no stage "
                    f"{name!r} (stages: {', '.join(sorted(known))})"
                )
        stages = []
        for stage in self.stages:
            found = settings.overrides_for(stage.name)
            changes = {k: v for k, v in dataclasses.asdict(found).items() if v is not None}
            if "concurrency" in changes and "batch" not in changes:
                changes["batch"] = min(changes["concurrency"], 50)
            stages.append(dataclasses.replace(stage, **changes))
        return dataclasses.replace(self, stages=stages)


def validate(pipeline: Pipeline) -> None:
    if not _NAME.match(pipeline.name):
        raise PipelineError(f"pipeline name {pipeline.name!r} must match {_NAME.pattern}")
    if not pipeline.stages:
        raise PipelineError(f"pipeline {pipeline.name!r} has no stages")
    seen_names: set[str] = set()
    consumed: dict[str, str] = {}
    statuses: dict[str, str] = {}
    for stage in pipeline.stages:
        where = f"pipeline {pipeline.name!r}, stage {stage.name!r}"
        if not _NAME.match(stage.name):
            raise PipelineError(f"{where}: stage name must match {_NAME.pattern}")
        if stage.name in seen_names:
            raise PipelineError(f"{where}: two stages have this name")
        seen_names.add(stage.name)
        for status in (stage.consumes, stage.working, stage.produces):
            if not _STATUS.match(status):
                raise PipelineError(f"{where}: status {status!r} must match {_STATUS.pattern}")
        if stage.consumes in TERMINAL_STATUSES or stage.consumes == pipeline.stages[-1].produces:
            raise PipelineError(f"{where}: consumes {stage.consumes}, a terminal status")
        if stage.consumes in consumed:
            raise PipelineError(
                f"{where}: status {stage.consumes} is already consumed by stage "
                f"{consumed[stage.consumes]!r}"
            )
        consumed[stage.consumes] = stage.name
        if stage.working in statuses:
            raise PipelineError(f"{where}: working status {stage.working} is used twice")
        statuses[stage.working] = stage.name
        if stage.produces in ("FAILED", "CANCELLED"):
            raise PipelineError(f"{where}: produces {stage.produces}, which is reserved")
        if isinstance(stage.routes, str) or len(set(stage.routes)) != len(stage.routes):
            raise PipelineError(f"{where}: routes must be a list of distinct statuses")
        for status in stage.routes:
            if not isinstance(status, str) or not _STATUS.match(status):
                raise PipelineError(f"{where}: route {status!r} must match {_STATUS.pattern}")
            if status in ("FAILED", "CANCELLED"):
                raise PipelineError(
                    f"{where}: routes to {status}, which is reserved (raise PermanentError to "
                    "fail a run)"
                )
        if (
            not isinstance(stage.max_visits, int)
            or isinstance(stage.max_visits, bool)
            or stage.max_visits < 1
        ):
            raise PipelineError(f"{where}: max_visits must be a whole number >= 1")
        if stage.on_child_failure not in CHILD_FAILURE_POLICIES:
            raise PipelineError(f"{where}: on_child_failure must be 'fail' or 'join'")
        for status in () if stage.fan_out is None else (stage.fan_out, stage.waiting):
            if not isinstance(status, str) or not _STATUS.match(status):
                raise PipelineError(f"{where}: status {status!r} must match {_STATUS.pattern}")
        if not callable(stage.handler):
            raise PipelineError(f"{where}: handler is not callable")
        if stage.concurrency < 1 or stage.batch < 1 or stage.max_attempts < 1:
            raise PipelineError(f"{where}: concurrency, batch and max_attempts must be >= 1")
        if not stage.timeout > 0:  # NaN too
            raise PipelineError(f"{where}: timeout must be > 0")
        problem = flow_control_problem(
            stage.limits,
            stage.max_in_flight,
            stage.group_by,
            stage.max_in_flight_per_group,
            stage.group_tokens_per_day,
        )
        if problem is not None:
            raise PipelineError(f"{where}: {problem}")
    if not callable(pipeline.text_input):
        raise PipelineError(f"pipeline {pipeline.name!r}: text_input is not callable")
    for status in consumed:
        if status in statuses:
            raise PipelineError(
                f"pipeline {pipeline.name!r}: {status} is both consumed and a working status"
            )
    _validate_fan_outs(pipeline, consumed, statuses)
    for stage in pipeline.stages:
        for status in (stage.produces, *stage.routes):
            if status in statuses:
                raise PipelineError(
                    f"pipeline {pipeline.name!r}, stage {stage.name!r}: sends runs to {status}, "
                    f"the working status of stage {statuses[status]!r}"
                )
            if status not in consumed and not pipeline.is_terminal(status):
                raise PipelineError(
                    f"pipeline {pipeline.name!r}, stage {stage.name!r}: sends runs to {status}, "
                    f"which no stage consumes and which does not end a run (DONE or "
                    f"{pipeline.final_status})"
                )


def _validate_fan_outs(
    pipeline: Pipeline, consumed: dict[str, str], working: dict[str, str]
) -> None:
    """Children start where a stage of this pipeline takes them; a parent waits in a status
    of its own, which no stage consumes, produces or works in."""
    sent = {s for stage in pipeline.stages for s in (stage.produces, *stage.routes)}
    waiting: set[str] = set()
    for stage in pipeline.stages:
        where = f"pipeline {pipeline.name!r}, stage {stage.name!r}"
        if stage.fan_out is None:
            if stage.waiting:
                raise PipelineError(f"{where}: a waiting status is for a stage with fan_out")
            continue
        if stage.produces not in consumed:
            raise PipelineError(
                f"{where}: fans out, but no stage consumes {stage.produces} to join its children"
            )
        if stage.fan_out not in consumed:
            raise PipelineError(
                f"{where}: fan_out {stage.fan_out}: no stage consumes it, so no child would start"
            )
        if (
            stage.waiting in consumed
            or stage.waiting in working
            or stage.waiting in sent
            or stage.waiting in waiting
            or pipeline.is_terminal(stage.waiting)
        ):
            raise PipelineError(
                f"{where}: waiting status {stage.waiting} is used elsewhere; a parent waits in a "
                "status of its own"
            )
        waiting.add(stage.waiting)


def load_pipeline(import_path: str) -> Pipeline:
    """Import 'package.module:attribute' and check that it is a Pipeline."""
    module_name, _, attribute = import_path.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise PipelineError(
            f"CONVEYOR_PIPELINE={import_path!r}: cannot import {module_name!r}: {exc}"
        ) from None
    try:
        found = getattr(module, attribute)
    except AttributeError:
        raise PipelineError(
            f"CONVEYOR_PIPELINE={import_path!r}: module {module_name!r} has no {attribute!r}"
        ) from None
    if not isinstance(found, Pipeline):
        raise PipelineError(
            f"CONVEYOR_PIPELINE={import_path!r}: {attribute!r} is a {type(found).__name__}, "
            "not a conveyor.Pipeline"
        )
    return found
