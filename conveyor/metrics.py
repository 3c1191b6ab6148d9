"""Metric definitions. Labels are bounded (pipeline, stage, status, outcome), never a run id.

With PROMETHEUS_MULTIPROC_DIR set before Python starts, every process writes its own files and
the supervisor serves them all from one /metrics.
"""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

_STAGE = ("pipeline", "stage")
_FAST_BUCKETS = (
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1,
    2.5,
    5,
    10,
    30,
    60,
)
_STAGE_BUCKETS = (0.001, 0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)

CLAIMED = Counter("conveyor_runs_claimed_total", "Runs claimed by a worker.", _STAGE)
COMPLETED = Counter("conveyor_runs_completed_total", "Stage attempts committed as done.", _STAGE)
RETRIED = Counter("conveyor_runs_retried_total", "Failed attempts scheduled for retry.", _STAGE)
FAILED = Counter(
    "conveyor_runs_failed_total", "Runs that became FAILED after their last attempt.", _STAGE
)
RESCUED = Counter(
    "conveyor_runs_rescued_total", "Runs taken back from a worker whose lease expired.", _STAGE
)
LEASE_LOSSES = Counter(
    "conveyor_lease_losses_total", "Results refused because the run's lease was lost.", _STAGE
)
SWEEP_PICKUPS = Counter(
    "conveyor_sweep_pickups_total",
    "Runs claimed by the timer sweep rather than by a notification.",
    _STAGE,
)
STAGE_DURATION = Histogram(
    "conveyor_stage_duration_seconds", "Handler time per attempt.", _STAGE, buckets=_STAGE_BUCKETS
)
WAKEUP_LATENCY = Histogram(
    "conveyor_wakeup_latency_seconds",
    "From a run becoming claimable to its claim.",
    _STAGE,
    buckets=_FAST_BUCKETS,
)
IN_FLIGHT = Gauge(
    "conveyor_runs_in_flight", "Runs being handled right now.", _STAGE, multiprocess_mode="livesum"
)
WORKER_RESTARTS = Counter(
    "conveyor_worker_restarts_total",
    "Worker processes the supervisor restarted after they died.",
    ("stage",),
)

# The agents' LLM router. `model` is a configured model name (bounded by configuration); outcome is
# ok, rate_limited, server_error, client_error, timeout, connection_error or bad_response.
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
