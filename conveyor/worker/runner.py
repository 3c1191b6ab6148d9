"""Runs one handler call: timeout, sync handlers in threads, the outcome as Success or Failure."""

from __future__ import annotations

import asyncio
import json
import re
import time
import traceback
from typing import Any

from conveyor import metrics
from conveyor.fan_out import MAX_INPUT_BYTES, FanOut, Spawn, fan_out_problem
from conveyor.handler_run import Run
from conveyor.limits import BudgetExceeded, Throttled
from conveyor.pipeline import PermanentError, Stage
from conveyor.results import Failure, Success
from conveyor.routes import Route, undeclared
from conveyor.urls import redact
from conveyor.worker.deadlines import Deadlines, for_running_loop

_MAX_ERROR_CHARS = 4000
# NaN/Infinity are not JSON. One encoder for every output: json.dumps with an option set builds
# a new encoder per call.
_to_json = json.JSONEncoder(allow_nan=False).encode
# An unescaped \u0000 in JSON text: jsonb refuses it, and one such output must not sink a batch.
_NUL_ESCAPE = re.compile(r"(?<!\\)(?:\\\\)*\\u0000")


class OutputError(Exception):
    """A handler's output that cannot be stored as the stage's JSON object. No retry can change
    it, so the run fails at once, with this one line as its error."""


async def run_handler(
    stage: Stage,
    run: Run,
    *,
    task: asyncio.Task[Any] | None = None,
    deadlines: Deadlines | None = None,
) -> Success | Failure:
    """Run `stage`'s handler for `run` in `task` (the current one, by default), which it may
    cancel when the stage's timeout passes. A worker passes its task and its loop's deadlines:
    on Python 3.11 each look-up of the running loop is a getpid() system call."""
    started = time.time()
    t0 = time.perf_counter()
    if task is None:
        task = asyncio.current_task()
        assert task is not None, "runs in a task of its own"
    if deadlines is None:
        deadlines = for_running_loop()
    slice_ = deadlines.watch(task, stage.timeout)
    try:
        if stage.is_async:
            output: Any = await stage.handler(run)  # type: ignore[misc]
        else:
            output = await asyncio.to_thread(stage.handler, run)
        target = None
        if isinstance(output, Route):  # the handler chose where the run goes
            target, output = output.to, output.output
            if isinstance(output, FanOut):
                error = (
                    f"FanOutError: stage {stage.name!r} returned a Route whose output is a FanOut"
                )
                return _failure(
                    stage, run, error, started, time.perf_counter() - t0, permanent=True
                )
            if type(target) is not str or (target != stage.produces and target not in stage.routes):
                error = undeclared(stage.name, target, (stage.produces, *stage.routes))
                return _failure(
                    stage,
                    run,
                    error[:_MAX_ERROR_CHARS],
                    started,
                    time.perf_counter() - t0,
                    permanent=True,
                )
        spawn = None
        if isinstance(output, FanOut):  # the handler created child runs
            problem = fan_out_problem(
                output, stage=stage.name, declared=stage.fan_out, pipeline=run.pipeline
            )
            if problem is not None:
                return _failure(
                    stage, run, problem, started, time.perf_counter() - t0, permanent=True
                )
            spawn = _spawn(stage, run, output)
            target = stage.waiting if spawn.inputs else None
            output = output.output
        payload = output_json(stage.name, output)
    except asyncio.CancelledError:
        if not deadlines.timed_out(task):
            raise  # taken away or shutting down: the worker handles it
        error = f"TimeoutError: stage {stage.name!r} timed out after {stage.timeout:g}s"
        return _failure(stage, run, error, started, time.perf_counter() - t0)
    except Throttled as exc:  # waiting for a limit is not failing: the attempt is not counted
        duration = time.perf_counter() - t0
        metrics.THROTTLED_SECONDS.labels(run.pipeline, run.stage, exc.key).inc(exc.wait_seconds())
        error = redact(f"throttled: {exc}").replace("\x00", "\\x00")[:_MAX_ERROR_CHARS]
        return Failure(
            run.id, run.attempt, error, exc.wait_seconds(), started, duration, False, run.usage
        )
    except OutputError as exc:  # the handler ran fine: its traceback would say nothing
        error = f"OutputError: {exc}"
        return _failure(stage, run, error, started, time.perf_counter() - t0, permanent=True)
    except Exception as exc:  # a handler's error never kills the worker
        permanent = isinstance(exc, PermanentError | BudgetExceeded)
        return _failure(stage, run, describe(exc), started, time.perf_counter() - t0, permanent)
    finally:
        deadlines.leave(task, slice_)
    return Success(
        run.id,
        run.attempt,
        payload,
        started,
        time.perf_counter() - t0,
        run.usage,  # kept on the run's event (Run.record_usage)
        run.writes,  # executed with the output, if it is stored (StageProtocol.apply)
        target,
        spawn if spawn is not None and spawn.inputs else None,
    )


def _spawn(stage: Stage, run: Run, fan_out: FanOut) -> Spawn:
    """A checked FanOut as the engine stores it (OutputError for a child input that is not a
    JSON object)."""
    inputs = []
    size = 0
    for index, child_input in enumerate(fan_out.children):
        inputs.append(output_json(stage.name, child_input, f"returned as child {index}'s input"))
        size += len(inputs[-1])
        if size > MAX_INPUT_BYTES:
            raise OutputError(
                f"stage {stage.name!r} returned children whose inputs pass "
                f"{MAX_INPUT_BYTES // 2**20} MiB together"
            )
    return Spawn(
        fan_out.pipeline or run.pipeline,
        fan_out.status or stage.fan_out or "",
        tuple(inputs),
    )


def output_json(stage: str, output: Any, returned: str = "returned") -> str:
    """A stage's output (or what else it `returned`: a child's input) as JSON text: a JSON
    object (a dict with str keys) that jsonb can store, or OutputError saying in one line why
    it is not."""
    if type(output) is dict and not output:  # a stage that only acts: nothing to check
        return "{}"
    where = f"stage {stage!r} {returned}"
    if not isinstance(output, dict):
        raise OutputError(f"{where} {_kind(output)}, not a JSON object (a dict with str keys)")
    for key in output:
        if not isinstance(key, str):  # json would write 1 as "1", and fail on a tuple
            raise OutputError(
                f"{where} a dict with a key of type {type(key).__name__}; JSON keys are str"
            )
    try:
        payload = _to_json(output)
    except RecursionError:
        raise OutputError(f"{where} an object nested too deeply to write as JSON") from None
    except (TypeError, ValueError) as exc:  # not serialisable; NaN or infinity; a cycle
        raise OutputError(f"{where} an object that is not JSON: {exc}") from None
    if "\\u0000" in payload and _NUL_ESCAPE.search(payload):
        raise OutputError(
            f"{where} an object holding a NUL character (\\u0000): jsonb cannot store it"
        )
    return payload


def _kind(value: Any) -> str:
    return "None" if value is None else f"a value of type {type(value).__name__}"


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
    return Failure(run.id, run.attempt, error, retry_in, started, duration, usage=run.usage)
