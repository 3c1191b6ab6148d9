"""The agents' settings from the environment: LLM routes, a model per stage, embeddings, budgets.

Nothing set means the offline defaults: the built-in analyzer, full-text retrieval and the
extractive answerer. A bad value raises ConfigError naming the variable (the CLI exits 2); an
API key is never part of a message.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from urllib.parse import urlsplit

import httpx

from conveyor import ConfigError, EnvReader

# A stage's model is CONVEYOR_<STAGE>_MODEL; this word instead keeps that stage offline.
BUILTIN = "builtin"
DAY = 86400.0  # the upper bound of a timeout: a larger value is a typo
_STAGE_MODEL = re.compile(r"^CONVEYOR_([A-Z][A-Z0-9_]*?)_(FALLBACK_)?MODEL$")
# Variables that look like CONVEYOR_<STAGE>_MODEL but are not per stage.
_NOT_STAGES = frozenset({"LLM", "EMBEDDINGS"})
_HIDDEN = "***"
_BASE_URL = (
    "expected an http:// or https:// base URL of an OpenAI-compatible API, "
    "e.g. http://localhost:11434/v1"
)


@dataclass(frozen=True)
class Route:
    """One OpenAI-compatible endpoint: a base URL (up to /v1) and its key."""

    name: str  # "primary" or "fallback": what logs, errors and metrics call it
    base_url: str
    api_key: str | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        # httpx would send user:password@ as Basic auth in place of the key, and put it in errors.
        if _has_userinfo(self.base_url):
            raise ValueError(f"{self.name} route: a base URL holds no user:password@")

    def endpoint(self, path: str) -> str:
        return f"{self.base_url}/{path.lstrip('/')}"


@dataclass(frozen=True)
class LLMConfig:
    primary: Route | None = None
    fallback: Route | None = None
    # stage -> model on each route; a stage missing here does not call a model.
    models: Mapping[str, str] = field(default_factory=dict)
    fallback_models: Mapping[str, str] = field(default_factory=dict)
    timeout_seconds: float = 60.0
    max_retries: int = 2  # per route, on 429, 5xx, timeouts and connection errors
    backoff_seconds: float = 0.5
    max_retry_after_seconds: float = 30.0

    def model_for(self, stage: str) -> str | None:
        return self.models.get(stage) if self.primary else None

    def fallback_model_for(self, stage: str) -> str | None:
        if self.fallback is None:
            return None
        return self.fallback_models.get(stage) or self.models.get(stage)


@dataclass(frozen=True)
class EmbeddingsConfig:
    route: Route
    model: str


@dataclass(frozen=True)
class AgentConfig:
    llm: LLMConfig = field(default_factory=LLMConfig)
    embeddings: EmbeddingsConfig | None = None
    documents_namespace: str = "default"
    context_tokens: int = 1000
    max_question_chars: int = 2000
    history_turns: int = 3

    @classmethod
    def from_env(
        cls, env: Mapping[str, str] | None = None, *, model_stages: tuple[str, ...] | None = None
    ) -> AgentConfig:
        """model_stages: the stages that may call a chat model; a model set for another stage
        is an error (it would silently do nothing)."""
        reader = _Reader(os.environ if env is None else env)
        llm = reader.llm(model_stages)
        return cls(
            llm=llm,
            embeddings=reader.embeddings(llm.primary),
            documents_namespace=reader.namespace("CONVEYOR_MEMORY_NAMESPACE", "default"),
            context_tokens=reader.integer(
                "CONVEYOR_CONTEXT_TOKENS", 1000, minimum=50, maximum=1_000_000
            ),
            max_question_chars=reader.integer(
                "CONVEYOR_MAX_QUESTION_CHARS", 2000, minimum=1, maximum=1_000_000
            ),
            history_turns=reader.integer("CONVEYOR_HISTORY_TURNS", 3, minimum=0, maximum=1000),
        )

    def describe(self) -> str:
        """One line for operators: what runs offline and what calls which model."""
        parts = []
        for stage in sorted(self.llm.models):
            parts.append(f"{stage}={self.llm.models[stage]}")
        models = ", ".join(parts) if parts else "none (built-in analyzer, extractive answers)"
        vectors = self.embeddings.model if self.embeddings else "off (full-text retrieval)"
        return f"models: {models}; embeddings: {vectors}"


class _Reader(EnvReader):
    def url(self, name: str) -> str | None:
        raw = self.raw(name)
        if raw is None:
            return None
        shown = _without_userinfo(raw)
        if _has_userinfo(raw):
            key = name.replace("BASE_URL", "API_KEY")
            raise ConfigError(
                name, shown, f"expected a base URL without user:password@ (the key goes in {key})"
            )
        try:
            parts = urlsplit(raw)
            _ = parts.port  # raises ValueError for a port out of range or not a number
            httpx.URL(raw)  # what the client will make of it
        except (ValueError, httpx.InvalidURL):
            raise ConfigError(name, shown, _BASE_URL) from None
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ConfigError(name, shown, _BASE_URL)
        if parts.query or parts.fragment:
            raise ConfigError(name, shown, "expected a base URL without ?query")
        return raw.rstrip("/")

    def key(self, name: str, base_variable: str, base_url: str | None) -> str | None:
        key = self.raw(name)
        if key is not None and base_url is None:
            raise ConfigError(name, _HIDDEN, f"a key needs {base_variable} as well")
        # A header value: printable ASCII, or httpx fails every request.
        if key is not None and not all("!" <= ch <= "~" for ch in key):
            raise ConfigError(
                name,
                _HIDDEN,
                "expected a key of printable ASCII without spaces or control characters",
            )
        return key

    def namespace(self, name: str, default: str) -> str:
        raw = self.raw(name)
        if raw is None:
            return default
        if len(raw) > 200:
            raise ConfigError(name, raw[:40] + "...", "expected at most 200 characters")
        return raw

    def llm(self, model_stages: tuple[str, ...] | None) -> LLMConfig:
        base = self.url("CONVEYOR_LLM_BASE_URL")
        fallback_base = self.url("CONVEYOR_LLM_FALLBACK_BASE_URL")
        key = self.key("CONVEYOR_LLM_API_KEY", "CONVEYOR_LLM_BASE_URL", base)
        primary = Route("primary", base, key) if base else None
        fallback_key = self.key(
            "CONVEYOR_LLM_FALLBACK_API_KEY", "CONVEYOR_LLM_FALLBACK_BASE_URL", fallback_base
        )
        if fallback_base and not base:
            raise ConfigError(
                "CONVEYOR_LLM_FALLBACK_BASE_URL",
                _without_userinfo(fallback_base),
                "a fallback route needs the primary route CONVEYOR_LLM_BASE_URL as well",
            )
        fallback = Route("fallback", fallback_base, fallback_key) if fallback_base else None

        default_model = self.raw("CONVEYOR_LLM_MODEL")
        default_fallback_model = self.raw("CONVEYOR_LLM_FALLBACK_MODEL")
        models: dict[str, str] = {}
        fallback_models: dict[str, str] = {}
        for variable in sorted(self.env):
            match = _STAGE_MODEL.match(variable)
            value = self.raw(variable)
            if not match or value is None or match.group(1) in _NOT_STAGES:
                continue
            stage = match.group(1).lower()
            if model_stages is not None and stage not in model_stages:
                accepted = ", ".join(f"CONVEYOR_{s.upper()}_MODEL" for s in model_stages)
                raise ConfigError(
                    variable,
                    value,
                    f"stage {stage!r} does not call a chat model (models are set with "
                    f"{accepted or 'no variable'}; retrieval uses CONVEYOR_EMBEDDINGS_MODEL)",
                )
            (fallback_models if match.group(2) else models)[stage] = value

        stages = model_stages if model_stages is not None else tuple(models)
        resolved: dict[str, str] = {}
        for stage in stages:
            model = models.get(stage) or default_model
            if model and model.lower() != BUILTIN:
                resolved[stage] = model
        named = [(f"CONVEYOR_{s.upper()}_MODEL", m) for s, m in models.items()]
        if default_model:
            named.insert(0, ("CONVEYOR_LLM_MODEL", default_model))
        if named and not base:
            raise ConfigError(
                *named[0],
                "a model needs a route: set CONVEYOR_LLM_BASE_URL (and CONVEYOR_LLM_API_KEY if "
                "the server wants one)",
            )
        if base and not named:
            raise ConfigError(
                "CONVEYOR_LLM_BASE_URL",
                _without_userinfo(base),
                "a route needs a model: set CONVEYOR_LLM_MODEL or CONVEYOR_<STAGE>_MODEL",
            )
        named_fallbacks = [
            (f"CONVEYOR_{s.upper()}_FALLBACK_MODEL", m) for s, m in fallback_models.items()
        ]
        if default_fallback_model:
            named_fallbacks.insert(0, ("CONVEYOR_LLM_FALLBACK_MODEL", default_fallback_model))
        if named_fallbacks and not fallback_base:
            raise ConfigError(
                *named_fallbacks[0], "a fallback model needs CONVEYOR_LLM_FALLBACK_BASE_URL as well"
            )
        resolved_fallback = {
            stage: fallback_models.get(stage) or default_fallback_model or resolved[stage]
            for stage in resolved
        }
        return LLMConfig(
            primary=primary,
            fallback=fallback,
            models=resolved,
            fallback_models=resolved_fallback,
            timeout_seconds=self.number(
                "CONVEYOR_LLM_TIMEOUT_SECONDS", 60.0, minimum=0.01, maximum=DAY
            ),
            max_retries=self.integer("CONVEYOR_LLM_MAX_RETRIES", 2, minimum=0, maximum=100),
            backoff_seconds=self.number(
                "CONVEYOR_LLM_BACKOFF_SECONDS", 0.5, minimum=0.0, maximum=3600
            ),
            max_retry_after_seconds=self.number(
                "CONVEYOR_LLM_MAX_RETRY_AFTER_SECONDS", 30.0, minimum=0.0, maximum=DAY
            ),
        )

    def embeddings(self, primary: Route | None) -> EmbeddingsConfig | None:
        model = self.raw("CONVEYOR_EMBEDDINGS_MODEL")
        base = self.url("CONVEYOR_EMBEDDINGS_BASE_URL")
        key = self.key("CONVEYOR_EMBEDDINGS_API_KEY", "CONVEYOR_EMBEDDINGS_BASE_URL", base)
        if model is None:
            if base:
                raise ConfigError(
                    "CONVEYOR_EMBEDDINGS_BASE_URL",
                    _without_userinfo(base),
                    "embeddings need a model: set CONVEYOR_EMBEDDINGS_MODEL",
                )
            return None
        if base is None:
            if primary is None:
                raise ConfigError(
                    "CONVEYOR_EMBEDDINGS_MODEL",
                    model,
                    "embeddings need a route: set CONVEYOR_EMBEDDINGS_BASE_URL "
                    "(or CONVEYOR_LLM_BASE_URL, which it defaults to)",
                )
            return EmbeddingsConfig(Route("embeddings", primary.base_url, primary.api_key), model)
        return EmbeddingsConfig(Route("embeddings", base, key), model)


def _without_userinfo(url: str) -> str:
    """A URL as it may appear in a message: everything up to its last "@" is hidden (an
    unencoded "@", "/" or space in a password would otherwise end the mask early)."""
    return re.sub(r"(://).*@", r"\1***@", url, flags=re.DOTALL)


def _has_userinfo(url: str) -> bool:
    _, sep, rest = url.partition("://")
    return bool(sep) and "@" in re.split(r"[/?#]", rest, maxsplit=1)[0]
