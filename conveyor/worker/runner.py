"""Runs one handler call: timeout, sync handlers in threads, the outcome as Success or Failure."""

from __future__ import annotations

import asyncio
import json
import re
import time
import traceback
from typing import Any

from conveyor.db import redact
from conveyor.pipeline import PermanentError, Run, Stage
from conveyor.protocol import Failure, Success
from conveyor.worker.deadlines import for_running_loop

_MAX_ERROR_CHARS = 4000
# NaN/Infinity are not JSON. One encoder for every output: json.dumps with an option set builds
# a new encoder per call.
_to_json = json.JSONEncoder(allow_nan=False).encode
# An unescaped \u0000 in JSON text: jsonb refuses it, and one such output must not sink a batch.
_NUL_ESCAPE = re.compile(r"(?<!\\)(?:\\\\)*\\u0000")


async def run_handler(stage: Stage, run: Run) -> Success | Failure:
    started = time.time()
    t0 = time.perf_counter()
    task = asyncio.current_task()
    assert task is not None, "runs in a task of its own"
    deadlines = for_running_loop()
    slice_ = deadlines.watch(task, stage.timeout)
    try:
        if stage.is_async:
            output: Any = await stage.handler(run)  # type: ignore[misc]
        else:
            output = await asyncio.to_thread(stage.handler, run)
        payload = _to_json(output)
        if "\\u0000" in payload and _NUL_ESCAPE.search(payload):
            raise ValueError("output contains a NUL character (\\u0000): jsonb cannot store it")
    except asyncio.CancelledError:
        if not deadlines.timed_out(task):
            raise  # taken away or shutting down: the worker handles it
        error = f"TimeoutError: stage {stage.name!r} timed out after {stage.timeout:g}s"
        return _failure(stage, run, error, started, time.perf_counter() - t0)
    except Exception as exc:  # a handler's error never kills the worker
        permanent = isinstance(exc, PermanentError)
        return _failure(stage, run, describe(exc), started, time.perf_counter() - t0, permanent)
    finally:
        deadlines.leave(task, slice_)
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
    """The error as kept on the run: type, message and the innermost frames. Passwords are
    masked as in the logs (before the cut, which could leave half a URL unrecognised): the
    error is shown by `conveyor show`, the console, and to anyone who can read the table."""
    frames = traceback.format_exception(exc, limit=-3)
    text = redact("".join(frames).strip()).replace("\x00", "\\x00")  # text columns refuse NUL
    return text if len(text) <= _MAX_ERROR_CHARS else text[-_MAX_ERROR_CHARS:]


def _failure(
    stage: Stage, run: Run, error: str, started: float, duration: float, permanent: bool = False
) -> Failure:
    retryable = run.attempt < stage.max_attempts and not permanent
    retry_in = stage.backoff.delay(run.attempt) if retryable else None
    return Failure(run.id, run.attempt, error, retry_in, started, duration)
