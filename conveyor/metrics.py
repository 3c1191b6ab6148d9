"""The engine's metric definitions. Labels are bounded (pipeline, stage, status), never a run id or
a pid. A pipeline's handlers define their own beside them (the agents: conveyor/agents/metrics.py).

With PROMETHEUS_MULTIPROC_DIR set before Python starts, every process writes its own files and
the supervisor serves them all from one /metrics. Counters and histograms add up across
processes. Every Gauge names its multiprocess mode, which says how the values of several
processes combine into the one series a scrape shows (the default, 'all', would add a pid label):

- livesum: one value per process, summed over the processes alive (in flight, connected);
- livemin: the worst of the live processes (the listener that heard from the server longest ago);
- livemostrecent: the last value set by any live process (what the maintenance leader measured);
- livemax / max: a flag that one process sets (leadership, build info).

The 'live' modes drop a process's value when the supervisor reaps it (mark_process_dead).
"""

from __future__ import annotations

import platform
from bisect import bisect_left
from collections import Counter as Tally
from collections.abc import Iterable

from prometheus_client import Counter, Gauge, Histogram

# Counts taken on a run's path are written this long after the first of a batch
# (conveyor/worker/tally.py says why), off that path and off the run's next stages.
WRITE_DELAY = 0.1

_STAGE = ("pipeline", "stage")
_STATUS = ("pipeline", "stage", "status")
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

# -- workers: what happens to the runs they handle ----------------------------------------------

CLAIMED = Counter("conveyor_runs_claimed_total", "Runs claimed by a worker.", _STAGE)
COMPLETED = Counter("conveyor_runs_completed_total", "Stage attempts committed as done.", _STAGE)
RETRIED = Counter("conveyor_runs_retried_total", "Failed attempts scheduled for retry.", _STAGE)
FAILED = Counter(
    "conveyor_runs_failed_total", "Runs that became FAILED after their last attempt.", _STAGE
)
LEASE_LOSSES = Counter(
    "conveyor_lease_losses_total", "Results refused because the run's lease was lost.", _STAGE
)
SWEEP_PICKUPS = Counter(
    "conveyor_sweep_pickups_total",
    "Runs claimed by an idle worker woken by its sweep timer rather than by a notification.",
    _STAGE,
)
STAGE_DURATION = Histogram(
    "conveyor_stage_duration_seconds", "Handler time per attempt.", _STAGE, buckets=_STAGE_BUCKETS
)
WAKEUP_LATENCY = Histogram(
    "conveyor_wakeup_latency_seconds",
    "From a run becoming claimable (its status change or its run_after) to its claim.",
    _STAGE,
    buckets=_FAST_BUCKETS,
)
THROTTLED = Counter(
    "conveyor_throttled_total",
    "Times flow control held runs back: a claim the limits allowed nothing (what='claim'), or a "
    "run sent back in line to wait for its key (what='run': closed, or its bucket spent).",
    [*_STAGE, "key", "what"],
)
THROTTLED_SECONDS = Counter(
    "conveyor_throttled_seconds_total",
    "Time runs waited for a limit: a handler's acquire waiting for its bucket, and runs sent "
    "back in line until their key opens.",
    [*_STAGE, "key"],
)
LIMIT_USED = Counter(
    "conveyor_limit_used_total",
    "What runs took from a limit's buckets: requests (one per run claimed under the key, or "
    "per Run.acquire) and tokens (Run.acquire, settled with what the call used).",
    [*_STAGE, "key", "kind"],
)
IN_FLIGHT = Gauge(
    "conveyor_runs_in_flight", "Runs being handled right now.", _STAGE, multiprocess_mode="livesum"
)
WORKER_ERRORS = Counter(
    "conveyor_worker_errors_total",
    "Statements of a worker (or of the maintenance leader, stage 'maintenance') that PostgreSQL "
    "refused for another reason than a lost connection (a malformed row, a broken schema); "
    "they are tried again after a pause.",
    ("pipeline", "stage", "operation"),
)

# -- workers: the LISTEN connection --------------------------------------------------------------

NOTIFICATIONS = Counter(
    "conveyor_notifications_received_total",
    "Wake-up notifications received (the listener's own health pings are not counted).",
    _STAGE,
)
LISTENER_RECONNECTS = Counter(
    "conveyor_listener_reconnects_total",
    "Times a worker's LISTEN connection was lost and opened again.",
    _STAGE,
)
LISTENERS_CONNECTED = Gauge(
    "conveyor_listeners_connected",
    "Worker processes whose LISTEN connection is up.",
    _STAGE,
    multiprocess_mode="livesum",
)
LAST_NOTIFICATION = Gauge(
    "conveyor_listener_last_notification_timestamp_seconds",
    "When the stalest live listener of a stage last heard from the server (a notification, "
    "its own health ping, or its connect).",
    _STAGE,
    multiprocess_mode="livemin",
)

# -- the maintenance leader: one query for the whole queue, not one per worker -------------------

RESCUED = Counter(
    "conveyor_runs_rescued_total", "Runs taken back from a worker whose lease expired.", _STAGE
)
CANCELLED = Counter(
    "conveyor_runs_cancelled_total",
    "Runs cancelled while in this stage's statuses, counted by the maintenance leader from "
    "run_events.",
    _STAGE,
)
QUEUE_DEPTH = Gauge(
    "conveyor_queue_depth",
    "Unfinished runs due now, per status: waiting to be claimed, or leased (working status).",
    _STATUS,
    multiprocess_mode="livemostrecent",
)
QUEUE_SCHEDULED = Gauge(
    "conveyor_queue_scheduled",
    "Unfinished runs not due yet (delayed submission or retry backoff), per status.",
    _STATUS,
    multiprocess_mode="livemostrecent",
)
QUEUE_OLDEST_AGE = Gauge(
    "conveyor_queue_oldest_age_seconds",
    "How long the oldest due run of a status has been due (for a working status: waiting "
    "plus handling time).",
    _STATUS,
    multiprocess_mode="livemostrecent",
)
WORKERS_ALIVE = Gauge(
    "conveyor_workers_alive",
    "Worker processes of a stage with an unexpired heartbeat, across all hosts.",
    _STAGE,
    multiprocess_mode="livemostrecent",
)
NOTIFICATION_QUEUE_USAGE = Gauge(
    "conveyor_notification_queue_usage_ratio",
    "pg_notification_queue_usage(): the server's NOTIFY queue fill (0-1); when full, every "
    "notifying commit fails.",
    multiprocess_mode="livemostrecent",
)
MAINTENANCE_LEADER = Gauge(
    "conveyor_maintenance_leader",
    "1 while this host's maintenance process leads the pipeline's maintenance, else 0.",
    ("pipeline",),
    multiprocess_mode="livemax",
)

LIMIT_IN_FLIGHT = Gauge(
    "conveyor_limit_in_flight",
    "Runs leased under a limit's key now, across all hosts (a place each).",
    ("key",),
    multiprocess_mode="livemostrecent",
)
LIMIT_ALLOWED = Gauge(
    "conveyor_limit_allowed",
    "A limit as the limits table holds it: kind max_in_flight, requests_per_minute or "
    "tokens_per_minute (absent: no limit of that kind).",
    ("key", "kind"),
    multiprocess_mode="livemostrecent",
)
LIMIT_CLOSED_UNTIL = Gauge(
    "conveyor_limit_closed_until_timestamp_seconds",
    "When a closed key opens again (Unix time); 0 while it is open.",
    ("key",),
    multiprocess_mode="livemostrecent",
)

# -- the supervisor ------------------------------------------------------------------------------

WORKER_RESTARTS = Counter(
    "conveyor_worker_restarts_total",
    "Worker processes the supervisor restarted after they died.",
    _STAGE,
)
BUILD_INFO = Gauge(
    "conveyor_build_info",
    "Always 1; the labels say which conveyor and Python serve these metrics.",
    ("version", "python"),
    multiprocess_mode="max",
)


def publish_build_info() -> None:
    from conveyor import __version__

    BUILD_INFO.labels(__version__, platform.python_version()).set(1)


def prepare_stage(pipeline: str, stage: str) -> None:
    """Create a worker's series at zero, so that rates and alerts see 'nothing happened yet'
    rather than 'no such series'."""
    for counter in (
        CLAIMED,
        COMPLETED,
        RETRIED,
        FAILED,
        LEASE_LOSSES,
        SWEEP_PICKUPS,
        NOTIFICATIONS,
        LISTENER_RECONNECTS,
    ):
        counter.labels(pipeline, stage)
    WORKER_ERRORS.labels(pipeline, stage, "claim")  # the statement a worker runs most
    STAGE_DURATION.labels(pipeline, stage)
    WAKEUP_LATENCY.labels(pipeline, stage)
    IN_FLIGHT.labels(pipeline, stage)
    LISTENERS_CONNECTED.labels(pipeline, stage)


def observe_many(histogram: Histogram, amounts: Iterable[float]) -> None:
    """Observe a batch of amounts on one labelled histogram, as many observe() calls would:
    each bucket and the sum are written once per batch instead of once per amount (in
    multiprocess mode every write goes to a memory-mapped file, under a lock)."""
    amounts = list(amounts)
    if not amounts:
        return
    bounds = getattr(histogram, "_upper_bounds", None)
    buckets = getattr(histogram, "_buckets", None)
    total = getattr(histogram, "_sum", None)
    if (
        bounds is None
        or total is None
        or not isinstance(buckets, list)
        or len(buckets) != len(bounds)
    ):  # a prometheus_client built otherwise inside: one observe() per amount
        for amount in amounts:
            histogram.observe(amount)
        return
    total.inc(sum(amounts))
    # the first bound at or above the amount, as observe() picks it (the last bound is +Inf)
    for index, count in Tally(bisect_left(bounds, amount) for amount in amounts).items():
        buckets[index].inc(count)
