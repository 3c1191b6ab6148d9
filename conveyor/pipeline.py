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
from typing import Any
from uuid import UUID

from conveyor.settings import Settings

TERMINAL_STATUSES = frozenset({"DONE", "FAILED", "CANCELLED"})
_NAME = re.compile(r"^[a-z][a-z0-9_]{0,30}$")
_STATUS = re.compile(r"^[A-Z][A-Z0-9_]{0,30}$")


class PipelineError(Exception):
    """A pipeline declaration that cannot run; the message is one line."""


class PermanentError(Exception):
    """Raised by a handler for a failure no retry can fix (bad input): the run becomes FAILED at
    once, with this error, instead of being retried."""


@dataclass(slots=True)
class Run:
    """What a handler receives: one run, as its stage sees it."""

    id: UUID
    pipeline: str
    stage: str
    input: dict[str, Any]
    outputs: dict[str, Any]
    attempt: int
    # Set by handlers that call a model, recorded on the run's event and in the metrics.
    llm_model: str | None = None
    prompt_tokens: int | None = None
    completion_tokens: int | None = None

    def record_llm_usage(self, model: str, prompt_tokens: int, completion_tokens: int) -> None:
        self.llm_model = model
        self.prompt_tokens = (self.prompt_tokens or 0) + prompt_tokens
        self.completion_tokens = (self.completion_tokens or 0) + completion_tokens


Handler = Callable[[Run], Any] | Callable[[Run], Awaitable[Any]]


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

    def __post_init__(self) -> None:
        if not self.working:
            object.__setattr__(self, "working", f"{self.name.upper()}_RUNNING")
        if not self.batch:
            object.__setattr__(self, "batch", min(self.concurrency, 50))

    @functools.cached_property  # asked once per run
    def is_async(self) -> bool:
        return inspect.iscoroutinefunction(self.handler) or inspect.iscoroutinefunction(
            getattr(self.handler, "__call__", None)  # noqa: B004
        )


@dataclass(frozen=True)
class Pipeline:
    name: str
    stages: Sequence[Stage]

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
        return Pipeline(self.name, stages)


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
        if not callable(stage.handler):
            raise PipelineError(f"{where}: handler is not callable")
        if stage.concurrency < 1 or stage.batch < 1 or stage.max_attempts < 1:
            raise PipelineError(f"{where}: concurrency, batch and max_attempts must be >= 1")
        if stage.timeout <= 0:
            raise PipelineError(f"{where}: timeout must be > 0")
    for status in consumed:
        if status in statuses:
            raise PipelineError(
                f"pipeline {pipeline.name!r}: {status} is both consumed and a working status"
            )


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
