"""Calls to one OpenAI-compatible route: POSTs with retries and backoff, under flow control.

Each route and model is a flow-control key, `<route>:<model>` (docs/flow-control.md): a call
checks the run's budget, takes its tokens from the key first (an estimate, settled with the
usage the reply reports, given back when it fails), and a 429 closes the key for every worker
of every pod, until its Retry-After or for the shared backoff. The API key appears in no log
line and no error.
"""

from __future__ import annotations

import asyncio
import email.utils
import json
import os
import random
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import httpx
import structlog

from conveyor import Run, Throttled
from conveyor.agents.config import LLMConfig, Route
from conveyor.agents.metrics import LLM_LATENCY, LLM_REQUESTS

log = structlog.get_logger("conveyor.agents.llm")

MAX_BACKOFF_SECONDS = 10.0
_ERROR_BODY_CHARS = 200
# Usage as a model reports it, bounded: the run's event keeps it in int columns.
_MAX_TOKENS = 2**31 - 1
# A URL's password runs from "://user:" to the LAST "@" of its word (an unencoded "@" in it must
# not end the mask early): an error quoting a URL with a password shows it masked.
_URL_PASSWORD = re.compile(r"(://[^:/@\s]*:)\S*@")


class LLMUnavailable(Exception):
    """Every route failed for this call. Raised out of a handler it is a retryable failure."""


@dataclass(frozen=True)
class Labels:
    """Where a call comes from, for the metrics: bounded values, never a run id."""

    pipeline: str
    stage: str

    @classmethod
    def of(cls, run: Run | None, stage: str = "", pipeline: str = "") -> Labels:
        if run is not None:
            return cls(run.pipeline, run.stage)
        return cls(pipeline, stage)


def limit_key(route: Route, model: str) -> str:
    """The flow-control key of a route and model (CONVEYOR_LIMIT_<ROUTE>_<MODEL>_* in the
    environment)."""
    return f"{route.name}:{model}"[:200]


def _estimated_tokens(body: dict[str, Any]) -> int:
    """What a call may use, before it is made: about four characters a token, and room for
    the answer; settled with the usage the reply reports."""
    return len(json.dumps(body)) // 4 + 256


class _RouteFailed(Exception):
    """One route gave up; the message says why (scrubbed of every key)."""


class _Http:
    """An httpx client per process and event loop, made on first use (workers are forked)."""

    def __init__(self, timeout: float) -> None:
        self.timeout = timeout
        self._client: httpx.AsyncClient | None = None
        self._key: tuple[int, int] | None = None

    def client(self) -> httpx.AsyncClient:
        key = (os.getpid(), id(asyncio.get_running_loop()))
        if self._client is None or self._key != key:
            self._client = httpx.AsyncClient(
                timeout=httpx.Timeout(self.timeout),
                headers={"User-Agent": "conveyor-agents"},
                follow_redirects=False,
            )
            self._key = key
        return self._client

    async def aclose(self) -> None:
        if self._client is not None and self._key == (
            os.getpid(),
            id(asyncio.get_running_loop()),
        ):
            await self._client.aclose()
        self._client = None


class Caller:
    """POSTs JSON to a route with retries; shared by chat completions and embeddings."""

    def __init__(self, config: LLMConfig, *routes: Route) -> None:
        self.config = config
        self.http = _Http(config.timeout_seconds)
        # Every key this process knows: a server may echo any of them (a proxy in front of
        # several routes), and none may reach a log line or a run's error.
        known = (config.primary, config.fallback, *routes)
        self._keys = sorted({r.api_key for r in known if r and r.api_key}, key=len, reverse=True)

    def scrub(self, text: str) -> str:
        for key in self._keys:
            text = text.replace(key, "***")
        return _URL_PASSWORD.sub(r"\1***@", text)

    async def post(
        self, route: Route, path: str, body: dict[str, Any], labels: Labels, run: Run | None
    ) -> dict[str, Any]:
        model = str(body.get("model", ""))
        key = limit_key(route, model)
        config = self.config
        last = ""
        estimate = _estimated_tokens(body)
        if run is not None:  # a call past the run's (or its group's) budget is never made
            await run.check_budget(estimate)
        for attempt in range(config.max_retries + 1):
            reservation = await run.acquire(key, tokens=estimate) if run else None
            outcome, wait, reply, last = await self._once(route, path, body, labels, model)
            if reply is not None:
                if reservation is not None:
                    prompt_tokens, completion_tokens = reply_usage(reply)
                    await reservation.settle(prompt_tokens + completion_tokens)
                return reply
            if reservation is not None:  # not answered: what was reserved goes back
                await reservation.release()
            if outcome == "rate_limited" and run is not None:
                # Closed for every worker: none calls the key until it opens.
                closed = await run.close_limit(
                    key, retry_after=wait or None, reason=f"HTTP 429 from the {route.name} route"
                )
                wait = closed.wait_seconds()
                if wait > config.max_retry_after_seconds or attempt == config.max_retries:
                    raise closed
            if wait is None:  # not worth retrying on this route
                break
            if attempt == config.max_retries:
                break
            if wait > config.max_retry_after_seconds:
                limit = config.max_retry_after_seconds
                last += f" (Retry-After {wait:.0f}s is beyond the {limit:g}s limit)"
                break
            delay = wait or _backoff(config.backoff_seconds, attempt)
            log.warning(
                "llm request failed; retrying",
                route=route.name,
                model=model,
                stage=labels.stage,
                outcome=outcome,
                error=last,
                retry_in=round(delay, 3),
                try_number=attempt + 1,
            )
            await asyncio.sleep(delay)
        raise _RouteFailed(self.scrub(f"{route.name} route ({model}): {last}"))

    async def _once(
        self, route: Route, path: str, body: dict[str, Any], labels: Labels, model: str
    ) -> tuple[str, float | None, dict[str, Any] | None, str]:
        """(outcome, wait before a retry or None for no retry, reply, error text)."""
        headers = {"Content-Type": "application/json"}
        if route.api_key:
            headers["Authorization"] = f"Bearer {route.api_key}"
        started = time.perf_counter()
        wait: float | None = 0.0
        reply: dict[str, Any] | None = None
        try:
            response = await self.http.client().post(
                route.endpoint(path), content=json.dumps(body), headers=headers
            )
        except httpx.TimeoutException:
            outcome = "timeout"
            error = f"timed out after {self.config.timeout_seconds:g}s"
        except httpx.HTTPError as exc:
            outcome = "connection_error"
            error = f"{type(exc).__name__}: {self.scrub(str(exc)) or 'connection failed'}"
        except Exception as exc:  # an invalid URL, a port out of range: it can never be sent
            outcome, wait = "client_error", None
            cause = _innermost(exc)
            error = f"request not sent: {type(cause).__name__}: {self.scrub(str(cause))}"
        else:
            status = response.status_code
            if status == 200:
                try:
                    parsed = response.json()
                except ValueError:
                    parsed = None
                if isinstance(parsed, dict):
                    outcome, reply, error = "ok", parsed, ""
                else:
                    outcome = "bad_response"
                    body_text = self._excerpt(response)
                    error = f"HTTP 200 with a body that is not a JSON object: {body_text}"
            else:
                error = f"HTTP {status}: {self._excerpt(response)}"
                if status == 429:
                    outcome = "rate_limited"
                elif status >= 500:
                    outcome = "server_error"
                else:
                    outcome, wait = "client_error", None
                if wait is not None:
                    wait = retry_after_seconds(response.headers.get("Retry-After")) or 0.0
        finally:
            elapsed = time.perf_counter() - started
        LLM_LATENCY.labels(labels.pipeline, labels.stage, model).observe(elapsed)
        LLM_REQUESTS.labels(labels.pipeline, labels.stage, model, outcome).inc()
        return outcome, wait, reply, error

    def _excerpt(self, response: httpx.Response) -> str:
        # Scrubbed before it is cut, so that a key is never half-shown at the cut.
        text = self.scrub(" ".join(response.text.split()))[:_ERROR_BODY_CHARS]
        return text or "(empty body)"

    async def call(
        self,
        routes: Sequence[tuple[Route, str]],
        path: str,
        body: dict[str, Any],
        labels: Labels,
        run: Run | None = None,
    ) -> tuple[dict[str, Any], Route, str]:
        """Try each (route, model) in turn; the first reply wins. With none, a closed key makes
        the run wait for the first to open (Throttled); else the call failed (LLMUnavailable)."""
        failures = []
        closed: list[Throttled] = []
        for route, model in routes:
            try:
                reply = await self.post(route, path, {**body, "model": model}, labels, run)
            except _RouteFailed as exc:
                failures.append(str(exc))
                continue
            except Throttled as exc:
                closed.append(exc)
                continue
            if failures:
                log.warning(
                    "llm fallback route answered", route=route.name, model=model, after=failures
                )
            return reply, route, model
        if closed:
            raise min(closed, key=lambda throttled: throttled.wait_seconds())
        raise LLMUnavailable("; ".join(failures) or "no route is configured")


def retry_after_seconds(value: str | None) -> float | None:
    """Retry-After as seconds: either a number of seconds or an HTTP date."""
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    return max(0.0, float(when.timestamp()) - time.time())


def _innermost(exc: Exception) -> Exception:
    """The first leaf of an exception group (anyio's connect raises one): the actual cause."""
    while isinstance(exc, ExceptionGroup) and exc.exceptions:
        exc = exc.exceptions[0]
    return exc


def _backoff(base: float, attempt: int) -> float:
    ceiling: float = min(MAX_BACKOFF_SECONDS, base * 2.0**attempt)
    return ceiling * random.uniform(0.5, 1.0)


def reply_usage(reply: dict[str, Any]) -> tuple[int, int]:
    usage = reply.get("usage")
    if not isinstance(usage, dict):
        return 0, 0

    def count(name: str) -> int:
        value = usage.get(name)
        return min(value, _MAX_TOKENS) if isinstance(value, int) and value >= 0 else 0

    return count("prompt_tokens"), count("completion_tokens")
