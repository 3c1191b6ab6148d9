"""A run routed back to its own stage can be claimed again by the same worker before the batch
that applied its result has returned to the completer. The completer must not then let go of
the new attempt: a run missing from `held` while its handler runs would be released as a
lease the worker never heard of (HandOffs.release_unheard) and run twice."""

from __future__ import annotations

import asyncio
import time
import uuid
from typing import Any, cast

from conveyor import metrics
from conveyor.protocol import Applied, Failure, Success
from conveyor.worker.completer import Completer
from conveyor.worker.tally import StageTally


class _Protocol:
    async def apply(self, successes: list[Success], failures: list[Failure]) -> Applied:
        return Applied(len(successes), 0, 0, 0)


class _Log:
    def __getattr__(self, name: str) -> Any:
        return lambda *args, **kwargs: None


def _completer(held: set[uuid.UUID], running: dict[uuid.UUID, Any]) -> Completer:
    labels = (f"held-{uuid.uuid4().hex[:8]}", "s")
    metrics.prepare_stage(*labels)
    return Completer(
        cast(Any, _Protocol()),
        tally=StageTally(labels, lambda: 0),
        held=held,
        running=running,
        slot_freed=asyncio.Event(),
        errors=cast(Any, None),
        log=cast(Any, _Log()),
    )


def _success(run_id: uuid.UUID) -> Success:
    return Success(run_id, 1, "{}", time.time(), 0.001)


def test_an_applied_result_lets_its_run_go() -> None:
    ended, other = uuid.uuid4(), uuid.uuid4()
    held = {ended, other}
    completer = _completer(held, {})
    completer.successes.append(_success(ended))
    asyncio.run(completer.flush())
    assert held == {other}


def test_a_run_claimed_again_while_its_result_was_applied_stays_held() -> None:
    looped = uuid.uuid4()
    held = {looped}
    running: dict[uuid.UUID, Any] = {looped: object()}  # its next attempt's handler
    completer = _completer(held, running)
    completer.successes.append(_success(looped))
    asyncio.run(completer.flush())
    assert held == {looped}
