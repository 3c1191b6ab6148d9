"""The LLM router's metrics: requests, tokens and latency per model.

Labels are bounded: pipeline and stage by the pipeline's declaration, `model` by configuration
(a configured model name), `kind` is prompt or completion, and `outcome` one of ok,
rate_limited, server_error, client_error, timeout, connection_error or bad_response. In a worker
started by the supervisor (PROMETHEUS_MULTIPROC_DIR set) they are served from its one /metrics
with the engine's.
"""

from __future__ import annotations

from prometheus_client import Counter, Histogram

_LLM = ("pipeline", "stage", "model")
LLM_REQUESTS = Counter(
    "conveyor_llm_requests_total",
    "HTTP requests to a model (chat completions and embeddings), by outcome.",
    (*_LLM, "outcome"),
)
LLM_TOKENS = Counter(
    "conveyor_llm_tokens_total",
    "Tokens reported by the model's usage, by kind (prompt or completion).",
    (*_LLM, "kind"),
)
LLM_LATENCY = Histogram(
    "conveyor_llm_latency_seconds",
    "Time of one HTTP request to a model, whatever its outcome.",
    _LLM,
    buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 20, 30, 60, 120),
)
