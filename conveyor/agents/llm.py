"""The LLM router: OpenAI-compatible chat completions and embeddings over HTTP, no provider SDK.

Works against anything that speaks the protocol (OpenAI, vLLM, Ollama, llama.cpp's server, a
LiteLLM proxy): one base URL and key per route, a model per stage, and a fallback route. How a
call goes to a route (retries, backoff, flow control per `<route>:<model>` key, 429s closing the
key for every worker) is conveyor/agents/route_calls.py. A route that gives up, or answers with
another 4xx, sends the call to the fallback route; with no route left the run waits in line for
a closed key (Throttled: its attempt is not counted), and when every route failed otherwise the
call raises LLMUnavailable, which fails the stage's attempt, so the engine retries the run later:
a run is never lost to a model outage. Tokens, latency and outcomes go to the metrics, and the
model and token counts to the run's event (Run.record_usage).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from conveyor import Limit, Run
from conveyor.agents.config import EmbeddingsConfig, LLMConfig, Route
from conveyor.agents.metrics import LLM_TOKENS
from conveyor.agents.route_calls import (
    Caller,
    Labels,
    LLMUnavailable,
    limit_key,
    reply_usage,
)


@dataclass(frozen=True)
class Completion:
    text: str
    model: str
    route: str
    prompt_tokens: int
    completion_tokens: int


__all__ = [
    "Completion",
    "Embedder",
    "LLMUnavailable",
    "Labels",
    "Router",
    "limit_key",
]


class Router:
    """Chat completions for the stages, with a model per stage and a fallback route."""

    def __init__(self, config: LLMConfig) -> None:
        self.config = config
        self._caller = Caller(config)

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
        prompt_tokens, completion_tokens = reply_usage(reply)
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
        self._caller = Caller(llm, config.route)

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
        prompt_tokens, _ = reply_usage(reply)
        if run is not None:
            run.record_usage(model, prompt_tokens)
        _count_tokens(labels, model, prompt_tokens, 0)
        return vectors

    async def aclose(self) -> None:
        await self._caller.http.aclose()


def _message_text(reply: dict[str, Any]) -> str | None:
    choices = reply.get("choices")
    if not isinstance(choices, list) or not choices or not isinstance(choices[0], dict):
        return None
    message = choices[0].get("message")
    if not isinstance(message, dict):
        return None
    content = message.get("content")
    return content if isinstance(content, str) else None


def _count_tokens(labels: Labels, model: str, prompt: int, completion: int) -> None:
    tokens = LLM_TOKENS
    tokens.labels(labels.pipeline, labels.stage, model, "prompt").inc(prompt)
    tokens.labels(labels.pipeline, labels.stage, model, "completion").inc(completion)
