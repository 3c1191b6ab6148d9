"""What a handler receives: Run, one run as its stage sees it, with the statements it hands over
(Write) and what its outside calls used (Usage). No I/O of its own: flow control is reached
through the FlowHandle the worker sets."""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, LiteralString, NamedTuple
from uuid import UUID

from psycopg import sql
from psycopg.abc import Params

from conveyor.fan_out import Child
from conveyor.limits import BudgetExceeded, FlowHandle, Reservation, Throttled

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
    # A run of a stage that joins a fan-out: its children, in order (conveyor/fan_out.py).
    children: tuple[Child, ...] = ()
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
