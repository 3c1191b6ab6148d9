"""Runs one handler call: timeout, sync handlers in threads, the outcome as Success or Failure."""

from __future__ import annotations

import asyncio
import json
import time
import traceback
from typing import Any

from conveyor.pipeline import PermanentError, Run, Stage
from conveyor.protocol import Failure, Success

_MAX_ERROR_CHARS = 4000


async def run_handler(stage: Stage, run: Run) -> Success | Failure:
    started = time.time()
    t0 = time.perf_counter()
    try:
        async with asyncio.timeout(stage.timeout):
            if stage.is_async:
                output: Any = await stage.handler(run)  # type: ignore[misc]
            else:
                output = await asyncio.to_thread(stage.handler, run)
        payload = json.dumps(output)
    except TimeoutError:
        error = f"TimeoutError: stage {stage.name!r} timed out after {stage.timeout:g}s"
        return _failure(stage, run, error, started, time.perf_counter() - t0)
    except Exception as exc:  # a handler's error never kills the worker
        permanent = isinstance(exc, PermanentError)
        return _failure(stage, run, describe(exc), started, time.perf_counter() - t0, permanent)
    return Success(
        run.id,
        run.attempt,
        payload,
        started,
        time.perf_counter() - t0,
        run.llm_model,
        run.prompt_tokens,
        run.completion_tokens,
    )


def describe(exc: BaseException) -> str:
    """The error as kept on the run: type, message and the innermost frames."""
    frames = traceback.format_exception(exc, limit=-3)
    text = "".join(frames).strip()
    return text if len(text) <= _MAX_ERROR_CHARS else text[-_MAX_ERROR_CHARS:]


def _failure(
    stage: Stage, run: Run, error: str, started: float, duration: float, permanent: bool = False
) -> Failure:
    retryable = run.attempt < stage.max_attempts and not permanent
    retry_in = stage.backoff.delay(run.attempt) if retryable else None
    return Failure(run.id, run.attempt, error, retry_in, started, duration)
