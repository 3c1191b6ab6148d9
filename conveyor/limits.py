"""Declaring flow control: limits shared by every worker of every pod, and the exception a
handler raises to wait for one. No I/O (conveyor/flow_control.py keeps them in PostgreSQL).

A limit has a key (a model route such as `openai:gpt-4o`, or any name) and any of: how many runs
may be in flight under it at once, across the whole deployment; how many requests per minute it
allows; how many tokens per minute. A stage declares the keys its runs go under::

    Stage("answer", answer, "CONTEXT_READY", "DONE",
          limits=[Limit("openai:gpt-4o", max_in_flight=4, requests_per_minute=500)])

and `max_in_flight=` on the stage caps the stage itself, in the whole deployment. The
environment overrides both (docs/flow-control.md).
"""

from __future__ import annotations

import math
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

# What the limits table accepts (its bounds: sql/020_limit_bounds_checked_when_written.sql).
MAX_KEY_BYTES = 200
MAX_IN_FLIGHT = 1_000_000
# A rate's floor: below it, the intervals the buckets compute overflow.
MIN_PER_MINUTE = 0.001
MAX_REQUESTS_PER_MINUTE = 1e9
MAX_TOKENS_PER_MINUTE = 1e12
MAX_TOKENS_PER_DAY = 10**15


class LimitError(ValueError):
    """A limit that cannot be kept; the message is one line."""


@dataclass(frozen=True)
class Limit:
    """Runs of a stage that declares this go under `key`: at most `max_in_flight` of them leased
    at once, `requests_per_minute` claims (one request each) and `tokens_per_minute` tokens taken
    by their handlers (Run.acquire). None is no limit of that kind."""

    key: str
    max_in_flight: int | None = None
    requests_per_minute: float | None = None
    tokens_per_minute: float | None = None

    def __post_init__(self) -> None:
        check_key(self.key)
        if self.max_in_flight is not None and not (
            isinstance(self.max_in_flight, int) and 0 <= self.max_in_flight <= MAX_IN_FLIGHT
        ):
            raise LimitError(
                f"limit {self.key!r}: max_in_flight must be an integer from 0 to {MAX_IN_FLIGHT}"
            )
        for name, value, top in (
            ("requests_per_minute", self.requests_per_minute, MAX_REQUESTS_PER_MINUTE),
            ("tokens_per_minute", self.tokens_per_minute, MAX_TOKENS_PER_MINUTE),
        ):
            if value is not None and not (
                isinstance(value, int | float)
                and math.isfinite(value)
                and MIN_PER_MINUTE <= value <= top
            ):
                raise LimitError(
                    f"limit {self.key!r}: {name} must be from {MIN_PER_MINUTE:g} to {top:g}"
                )


def flow_control_problem(
    limits: Sequence[object],
    max_in_flight: object,
    group_by: object,
    max_in_flight_per_group: object,
    group_tokens_per_day: object,
) -> str | None:
    """What is wrong with a stage's flow-control fields, in one line; None when nothing is."""

    def whole(value: object, lowest: int, highest: int) -> bool:
        return isinstance(value, int) and not isinstance(value, bool) and lowest <= value <= highest

    if max_in_flight is not None and not whole(max_in_flight, 0, MAX_IN_FLIGHT):
        return f"max_in_flight must be an integer from 0 to {MAX_IN_FLIGHT}"
    if group_by is not None and not (isinstance(group_by, str) and 0 < len(group_by) <= 100):
        return "group_by must name an input field (1-100 characters)"
    if max_in_flight_per_group is not None and (
        group_by is None or not whole(max_in_flight_per_group, 1, MAX_IN_FLIGHT)
    ):
        return (
            f"max_in_flight_per_group must be an integer from 1 to {MAX_IN_FLIGHT}, with group_by"
        )
    if group_tokens_per_day is not None and (
        group_by is None or not whole(group_tokens_per_day, 1, MAX_TOKENS_PER_DAY)
    ):
        return (
            f"group_tokens_per_day must be an integer from 1 to {MAX_TOKENS_PER_DAY}, with group_by"
        )
    keys = [limit.key for limit in limits if isinstance(limit, Limit)]
    if len(keys) != len(limits):
        return "limits must be conveyor.Limit objects"
    if len(set(keys)) != len(keys):
        return "a limit key is declared twice"
    return None


def check_key(key: object) -> str:
    if not isinstance(key, str) or not key:
        raise LimitError(f"a limit's key must be a non-empty str, not {key!r}")
    if len(key.encode("utf-8", "replace")) > MAX_KEY_BYTES or not key.isprintable():
        raise LimitError(f"limit key {key[:40]!r}: printable, at most {MAX_KEY_BYTES} bytes")
    return key


def stage_key(pipeline: str, stage: str) -> str:
    """The key of a stage's own cap (Stage.max_in_flight)."""
    return f"stage:{pipeline}:{stage}"


def env_name(key: str) -> str:
    """The part of CONVEYOR_LIMIT_<NAME>_* that stands for `key`: upper case, every run of
    other characters one underscore (`openai:gpt-4o` -> OPENAI_GPT_4O)."""
    return re.sub(r"[^A-Z0-9]+", "_", key.upper()).strip("_")


class Throttled(Exception):
    """Raised by a handler whose run must wait for a limit: a closed key (a provider's 429), an
    empty bucket. The run goes back in line until `until` (a Unix time; None: a second), and
    the attempt is not counted against it: waiting is not failing."""

    def __init__(self, key: str, until: float | None = None, reason: str = "") -> None:
        self.key = key
        self.until = until if until is not None and math.isfinite(until) else None
        self.reason = reason
        when = "" if until is None else f" until {_clock(until)}"
        super().__init__(f"{key}{when}{': ' + reason if reason else ''}")

    def wait_seconds(self) -> float:
        if self.until is None:
            return 1.0
        return min(max(self.until - time.time(), 0.0), 86400.0)


def _clock(epoch: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(epoch))


class BudgetExceeded(Exception):
    """A call refused before it was made: it would take a run, or its group today, past its
    token budget. Raised out of a handler it fails the run at once (no retry can fit it)."""


class FlowHandle(Protocol):
    """What a Run reaches flow control through (conveyor/flow_control.py in a worker)."""

    async def acquire(self, key: str, *, tokens: int, requests: int | None) -> Reservation: ...

    async def settle(
        self, key: str, reserved: int, used: int, *, answered: bool = True
    ) -> None: ...

    async def close(self, key: str, *, retry_after: float | None, reason: str) -> Throttled: ...

    async def check_budget(
        self, run_id: Any, run_input: dict[str, Any], tokens: int, recorded: int
    ) -> None: ...


@dataclass
class Reservation:
    """Tokens taken from a key before a call (Run.acquire). `settle` with what the call really
    used gives back the difference, or takes it, and tells the key it answered."""

    key: str
    tokens: int
    _flow: FlowHandle | None = None

    async def settle(self, used_tokens: int) -> None:
        if not isinstance(used_tokens, int) or used_tokens < 0:
            raise ValueError("Reservation.settle: used_tokens must be an integer >= 0")
        if self._flow is not None:
            await self._flow.settle(self.key, self.tokens, used_tokens)

    async def release(self) -> None:
        """The call was not answered (an error, a timeout): every reserved token goes back."""
        if self._flow is not None and self.tokens:
            await self._flow.settle(self.key, self.tokens, 0, answered=False)
