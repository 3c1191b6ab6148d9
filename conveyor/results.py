"""What a run's attempt came to (Success, Failure), as the worker hands it to the protocol, and
what applying a batch of them did (Applied)."""

from __future__ import annotations

from dataclasses import dataclass
from uuid import UUID

from conveyor.fan_out import Spawn
from conveyor.handler_run import Usage, Write


@dataclass(slots=True)
class Success:
    run_id: UUID
    attempt: int
    output_json: str
    started_epoch: float
    duration: float
    # What the handler recorded with Run.record_usage, kept on the run's event.
    usage: Usage | None = None
    # Handed over with Run.write: executed with this output, and only if it is stored.
    writes: tuple[Write, ...] = ()
    # Where the handler sent the run (Route); None: the stage's `produces`.
    target: str | None = None
    # The child runs it creates (FanOut), stored with its output; the run then waits for them.
    spawn: Spawn | None = None


@dataclass(slots=True)
class Failure:
    run_id: UUID
    attempt: int
    error: str
    # None: out of attempts, the run becomes FAILED.
    retry_in: float | None
    started_epoch: float
    duration: float
    # False for a run sent back to wait for a limit (Throttled): its attempt is not counted.
    counted: bool = True
    # What the handler recorded with Run.record_usage before it failed: kept on the event, so
    # that budgets count what failed attempts spent.
    usage: Usage | None = None


@dataclass(frozen=True)
class Applied:
    completed: int
    retried: int
    failed: int
    refused: int  # lease lost or attempt stale: the result was discarded
