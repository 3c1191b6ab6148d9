"""Declaring a pipeline: ordered stages, each moving runs from one status to the next. No I/O."""

from __future__ import annotations

import dataclasses
import functools
import importlib
import inspect
import random
import re
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, LiteralString, NamedTuple, Protocol
from uuid import UUID

from psycopg import sql
from psycopg.abc import Params

from conveyor.limits import (
    BudgetExceeded,
    FlowHandle,
    Limit,
    Reservation,
    Throttled,
    flow_control_problem,
)
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


# run_events keeps usage in int columns: a larger count would refuse the whole batch's completion.
_MAX_UNITS = 2**31 - 1

# What psycopg's execute() takes: a literal string, or psycopg.sql to name a schema or table.
Query = LiteralString | bytes | sql.SQL | sql.Composed


class Write(NamedTuple):
    """A statement handed to the engine with `Run.write`."""

    query: Query
    params: Params | None = None


@dataclass(frozen=True, slots=True)
class Usage:
    """What one attempt used of an outside service, as a handler recorded it with
    `Run.record_usage`: `service` is what was called (a model, an API and its tier),
    `input_units` and `output_units` what it counted (tokens, characters, pages) sent and received.
    It is kept on the attempt's `run_events` row, in the columns `model`, `prompt_tokens` and
    `completion_tokens` (their names are the table's contract)."""

    service: str
    input_units: int = 0
    output_units: int = 0


@dataclass(slots=True)
class Run:
    """What a handler receives: one run, as its stage sees it.

    A handler's database writes go through `write`: the engine executes them in the transaction
    that stores the stage's output, and only when that output is stored. A result the database
    refuses (the lease was lost to a rescue or a cancel, the attempt is stale) and a handler that
    raises leave nothing behind; a run's writes commit once, together with its output::

        async def reply(run: Run) -> dict[str, Any]:
            text = await model.reply(run.input["text"])
            run.write("INSERT INTO app.replies (run_id, text) VALUES (%s, %s)", (run.id, text))
            return {"text": text}

    A handler that pays for an outside call says what it used with `record_usage`; the engine
    keeps it on the attempt's event (`conveyor show`, the `run_events` table)::

        reply = await client.translate(run.input["text"])
        run.record_usage("deepl-pro", input_units=reply.billed_characters)

    A query is what psycopg executes: a literal string, or a psycopg.sql composition to name a
    schema or table (sql.SQL("INSERT INTO {}.replies ...").format(sql.Identifier(schema))),
    with `%s` or `%(name)s` placeholders for its params; one statement per call. The writes run
    in order, after the run's transition. One that fails (PostgreSQL refuses it, or psycopg its
    params) undoes the run's other writes and fails the run with "result could not be stored:
    <error>" (terminal, like any result that cannot be stored); the other runs of the batch are
    stored. Reads need none of this: a handler reads over its own connection.
    """

    id: UUID
    pipeline: str
    stage: str
    input: dict[str, Any]
    outputs: dict[str, Any]
    attempt: int
    # Set on the first record_usage / write: most handlers do neither, and a run is built per claim.
    _usage: Usage | None = field(default=None, init=False, repr=False, compare=False)
    _writes: list[Write] | None = field(default=None, init=False, repr=False, compare=False)
    # Flow control, set by the worker that runs it (conveyor/flow_control.py).
    _flow: FlowHandle | None = field(default=None, init=False, repr=False, compare=False)

    async def acquire(
        self, key: str, *, tokens: int = 0, requests: int | None = None
    ) -> Reservation:
        """Take `tokens` tokens and `requests` requests from the limit `key` before a call whose
        cost is known only here (by default one request, or none when the stage declares the
        key: its claim took it). Waits a moment for a bucket to fill; longer, it raises
        Throttled and the run waits in line, its attempt not counted. Settle the reservation
        with what the call used. Outside a worker there is nothing to wait for."""
        if self._flow is None:
            return Reservation(key, tokens)
        return await self._flow.acquire(key, tokens=tokens, requests=requests)

    async def check_budget(self, tokens: int) -> None:
        """Refuse a call of about `tokens` tokens that would take this run past its budget (its
        input's `token_budget`), or its group past the stage's daily budget per group
        (Stage.group_tokens_per_day), counting what the run's events and this attempt
        recorded: raises BudgetExceeded, which fails the run at once. Outside a worker, only
        this attempt's own usage counts."""
        recorded = 0 if self._usage is None else self._usage.input_units + self._usage.output_units
        if self._flow is not None:
            await self._flow.check_budget(self.id, self.input, tokens, recorded)
            return
        budget = self.input.get("token_budget")
        if isinstance(budget, int) and recorded + tokens > budget:
            raise BudgetExceeded(f"run token budget {budget}: this call would pass it")

    async def close_limit(
        self, key: str, *, retry_after: float | None = None, reason: str = ""
    ) -> Throttled:
        """Close `key` for every worker of every pod: for `retry_after` seconds (a provider's
        Retry-After), or with None for the shared backoff (1 s, doubling to 60 s while closures
        follow one another). Returns the Throttled to raise: the run waits until the key opens,
        its attempt not counted."""
        if self._flow is None:
            until = None if retry_after is None else time.time() + retry_after
            return Throttled(key, until, reason)
        return await self._flow.close(key, retry_after=retry_after, reason=reason)

    def record_usage(self, service: str, input_units: int = 0, output_units: int = 0) -> None:
        """Record that this attempt used `service` (what was called: a model, an API), counting
        `input_units` sent and `output_units` received (tokens, characters, requests: the
        service's own unit). Calls add up: the units are summed, the last service named is kept.
        Stored on the attempt's event, whether it succeeds or fails (a token budget counts what
        failed attempts spent too)."""
        if not isinstance(service, str) or not service or "\x00" in service:
            raise ValueError("Run.record_usage: service must be a non-empty str without NUL")
        for units in (input_units, output_units):
            if not isinstance(units, int) or not 0 <= units <= _MAX_UNITS:
                raise ValueError(
                    f"Run.record_usage: units must be integers from 0 to {_MAX_UNITS}, "
                    f"not {units!r}"
                )
        if self._usage is not None:
            input_units += self._usage.input_units
            output_units += self._usage.output_units
            if max(input_units, output_units) > _MAX_UNITS:
                raise ValueError(f"Run.record_usage: units add up to more than {_MAX_UNITS}")
        self._usage = Usage(service, input_units, output_units)

    @property
    def usage(self) -> Usage | None:
        """What record_usage recorded so far; None when nothing was."""
        return self._usage

    def write(self, query: Query, params: Params | None = None) -> None:
        """Execute `query` with `params` in the transaction that stores this attempt's output,
        if it is stored. The params are copied (shallowly) now."""
        if not isinstance(query, str | bytes | sql.SQL | sql.Composed):
            raise TypeError(
                "Run.write: the query must be a str, bytes or psycopg.sql object, "
                f"not {type(query).__name__}"
            )
        # Checked here, in the handler: a bad statement fails its run, never the worker.
        if isinstance(params, Mapping):
            params = dict(params)
        elif isinstance(params, Sequence) and not isinstance(params, str | bytes):
            params = tuple(params)
        elif params is not None:
            raise TypeError(
                f"Run.write: params must be a sequence or a mapping, not {type(params).__name__}"
            )
        if self._writes is None:
            self._writes = []
        self._writes.append(Write(query, params))

    @property
    def writes(self) -> tuple[Write, ...]:
        """The statements handed over so far, in order."""
        return tuple(self._writes) if self._writes else ()


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

    def __post_init__(self) -> None:
        object.__setattr__(self, "limits", tuple(self.limits))
        if not isinstance(self.routes, str):  # a lone status is refused by validate()
            object.__setattr__(self, "routes", tuple(self.routes))
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

    @functools.cached_property
    def loop_stages(self) -> frozenset[str]:
        """The stages a run can come back to through the stages' routes."""
        consumer = {stage.consumes: stage.name for stage in self.stages}
        edges = {
            stage.name: [consumer[s] for s in (stage.produces, *stage.routes) if s in consumer]
            for stage in self.stages
        }
        return frozenset(stages_on_loops(edges))

    def destinations(self, stage: Stage) -> dict[str, Destination]:
        """Where `stage` may send a run (its `produces` and its `routes`), as the engine
        applies each."""
        consumers = {s.consumes: s for s in self.stages}
        found = {}
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
