"""The LLM router: OpenAI-compatible chat completions and embeddings over HTTP, no provider SDK.

Works against anything that speaks the protocol (OpenAI, vLLM, Ollama, llama.cpp's server, a
LiteLLM proxy): one base URL and key per route. Each route and model is a flow-control key,
`<route>:<model>` (docs/flow-control.md): a call takes its tokens from it first (an estimate,
settled with the usage the reply reports), and a 429 closes it for every worker of every pod,
until its Retry-After or for the shared backoff. A request that meets 429, a 5xx, a timeout or a
dropped connection is retried on its route with backoff; a key closed for longer than
max_retry_after sends the call to the fallback route, and with no route left the run waits in
line for the key (Throttled: its attempt is not counted). A route that gives up, or answers with
another 4xx, also sends the call to the fallback route. When every route fails the
call raises LLMUnavailable, which fails the stage's attempt, so the engine retries the run later:
a run is never lost to a model outage. Tokens, latency and outcomes go to the metrics, and the
model and token counts to the run's event (Run.record_usage). The API key appears in no log line
and no error.
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

from conveyor import Limit, Run, Throttled
from conveyor.agents.config import EmbeddingsConfig, LLMConfig, Route
from conveyor.agents.metrics import LLM_LATENCY, LLM_REQUESTS, LLM_TOKENS

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
class Completion:
    text: str
    model: str
    route: str
    prompt_tokens: int
    completion_tokens: int


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


class _Caller:
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
                    prompt_tokens, completion_tokens = _usage(reply)
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


class Router:
    """Chat completions for the stages, with a model per stage and a fallback route."""

    def __init__(self, config: LLMConfig) -> None:
        self.config = config
        self._caller = _Caller(config)

    def model_for(self, stage: str) -> str | None:
        return self.config.model_for(stage)

    def limits_for(self, stage: str) -> list[Limit]:
        """The key a stage's runs go under, declared on the stage so that its claims respect
        it: its one route's. A stage with a fallback route declares none (a claim held back by
        a closed primary would never reach the fallback): its calls take from each route's
        key as they go."""
        routes = self.routes_for(stage)
        return [Limit(limit_key(*routes[0]))] if len(routes) == 1 else []

    def routes_for(self, stage: str) -> list[tuple[Route, str]]:
        found: list[tuple[Route, str]] = []
        model = self.config.model_for(stage)
        if self.config.primary is not None and model:
            found.append((self.config.primary, model))
            fallback_model = self.config.fallback_model_for(stage)
            if self.config.fallback is not None and fallback_model:
                found.append((self.config.fallback, fallback_model))
        return found

    async def chat(
        self,
        run: Run,
        messages: list[dict[str, str]],
        *,
        json_mode: bool = False,
    ) -> Completion:
        """One completion for the run's stage; its tokens are recorded on the run."""
        labels = Labels.of(run)
        body: dict[str, Any] = {"messages": messages, "temperature": 0}
        if json_mode:
            body["response_format"] = {"type": "json_object"}
        reply, route, model = await self._caller.call(
            self.routes_for(run.stage), "chat/completions", body, labels, run
        )
        text = _message_text(reply)
        prompt_tokens, completion_tokens = _usage(reply)
        run.record_usage(model, prompt_tokens, completion_tokens)
        _count_tokens(labels, model, prompt_tokens, completion_tokens)
        if text is None:
            # A 200 without a message: the stage sees it as a model failure, like a 5xx.
            raise LLMUnavailable(f"{route.name} route ({model}): reply without choices[0].message")
        return Completion(text, model, route.name, prompt_tokens, completion_tokens)

    async def aclose(self) -> None:
        await self._caller.http.aclose()


class Embedder:
    """OpenAI-compatible /embeddings, through the same retries as the router."""

    def __init__(self, config: EmbeddingsConfig, llm: LLMConfig) -> None:
        self.config = config
        self.model = config.model
        self._caller = _Caller(llm, config.route)

    async def embed(
        self, texts: Sequence[str], *, run: Run | None = None, labels: Labels | None = None
    ) -> list[list[float]]:
        if not texts:
            return []
        labels = labels or Labels.of(run)
        reply, route, model = await self._caller.call(
            [(self.config.route, self.model)], "embeddings", {"input": list(texts)}, labels, run
        )
        data = reply.get("data")
        vectors: list[list[float]] = []
        if isinstance(data, list):
            ordered = sorted(
                (d for d in data if isinstance(d, dict)), key=lambda d: d.get("index", 0)
            )
            for item in ordered:
                vector = item.get("embedding")
                if (
                    isinstance(vector, list)
                    and vector
                    and all(isinstance(x, int | float) for x in vector)
                ):
                    vectors.append([float(x) for x in vector])
        if len(vectors) != len(texts):
            raise LLMUnavailable(
                f"{route.name} route ({model}): {len(vectors)} embeddings for {len(texts)} inputs"
            )
        prompt_tokens, _ = _usage(reply)
        if run is not None:
            run.record_usage(model, prompt_tokens)
        _count_tokens(labels, model, prompt_tokens, 0)
        return vectors

    async def aclose(self) -> None:
        await self._caller.http.aclose()


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


def _message_text(reply: dict[str, Any]) -> str | None:
    choices = reply.get("choices")
    if not isinstance(choices, list) or not choices or not isinstance(choices[0], dict):
        return None
    message = choices[0].get("message")
    if not isinstance(message, dict):
        return None
    content = message.get("content")
    return content if isinstance(content, str) else None


def _usage(reply: dict[str, Any]) -> tuple[int, int]:
    usage = reply.get("usage")
    if not isinstance(usage, dict):
        return 0, 0

    def count(name: str) -> int:
        value = usage.get(name)
        return min(value, _MAX_TOKENS) if isinstance(value, int) and value >= 0 else 0

    return count("prompt_tokens"), count("completion_tokens")


def _count_tokens(labels: Labels, model: str, prompt: int, completion: int) -> None:
    tokens = LLM_TOKENS
    tokens.labels(labels.pipeline, labels.stage, model, "prompt").inc(prompt)
    tokens.labels(labels.pipeline, labels.stage, model, "completion").inc(completion)
