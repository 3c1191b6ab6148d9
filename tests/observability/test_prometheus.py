"""A real Prometheus scraping two running `conveyor run`s with real traffic, the shipped rules
loaded: the test pipeline `chain` (retries, failures, a cancel, killed workers) and the reference
pipeline `agents`, whose stages call models through the LLM router on an OpenAI-compatible server
on loopback. The counters of several worker processes add up, every dashboard panel's query and
every rule runs through Prometheus's query API and returns data, and an alert really fires."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from collections.abc import Callable
from typing import Any

import psycopg
import pytest

from tests.helpers import ROOT, ConveyorProcess, conveyor_env, scalar, wait_until
from tests.llm_server import USAGE, FakeLLM, Reply
from tests.observability.prom import (
    DASHBOARD,
    RULES,
    Prometheus,
    http_get,
    metrics_port,
    require_binary,
    scrape,
)

CHAIN = {"CONVEYOR_PIPELINE": "tests.pipelines:chain"}
STAGES = {"one": 2, "two": 2, "three": 1}
# The reference pipeline with a model for each stage that calls one (analyze, answer).
AGENT_STAGES = ("analyze", "assemble", "answer")
MODELS = {"analyze": "analyzer-small", "answer": "answer-large"}
QUESTIONS = 8
_METRIC_NAME = re.compile(r"\b((?:[a-z_]+:)?conveyor_[a-z0-9_]+(?::[a-z0-9_]+)?)\b")
_HISTOGRAM_SUFFIX = re.compile(r"_(bucket|sum|count)$")
# A series selector of a rule: a conveyor metric (or a recorded one, or `up`) with its matchers.
_SELECTOR = re.compile(
    r"(?<![\w:])((?:[a-z_]+:)?conveyor_[a-z0-9_]+(?::[a-z0-9_]+)?|up)(?![\w:(])(\{[^}]*\})?"
)


def _insert(
    url: str, inputs: list[dict[str, Any]], delay: str | None = None, pipeline: str = "chain"
) -> list[Any]:
    with psycopg.connect(url, autocommit=True) as conn:
        return [
            conn.execute(
                "INSERT INTO conveyor.pipeline_runs (pipeline, input, run_after)"
                " VALUES (%s, %s, now() + %s::interval) RETURNING id",
                (pipeline, json.dumps(item), delay or "0 seconds"),
            ).fetchone()[0]  # type: ignore[index]
            for item in inputs
        ]


def _finished(url: str, pipeline: str = "chain", status: str | None = None) -> int:
    return int(
        scalar(
            url,
            "SELECT count(*) FROM conveyor.pipeline_runs WHERE finished_at IS NOT NULL"
            " AND pipeline = %s AND status = coalesce(%s, status)",
            (pipeline, status),
        )
    )


def _started_pids(process: ConveyorProcess, stage: str) -> list[int]:
    pids = []
    for line in process.log().splitlines():
        if '"worker process started"' in line:
            record = json.loads(line)
            if record["stage"] == stage:
                pids.append(int(record["pid"]))
    return pids


def _wait_scraped(prometheus: Prometheus, expected: dict[str, float | None], what: str) -> None:
    """Wait until Prometheus answers every expression with its value; else say which not."""
    try:
        wait_until(
            lambda: all(prometheus.value(expr) == value for expr, value in expected.items()),
            30,
            what,
        )
    except AssertionError as exc:
        wrong = {
            expr: (prometheus.value(expr), value)
            for expr, value in expected.items()
            if prometheus.value(expr) != value
        }
        raise AssertionError(f"{exc}; (scraped, expected): {wrong}") from None


def _kill_and_await_restart(process: ConveyorProcess, stage: str) -> None:
    before = _started_pids(process, stage)
    os.kill(before[-1], signal.SIGKILL)
    wait_until(lambda: len(_started_pids(process, stage)) > len(before), 30, f"{stage} restarted")


def _substitute(expr: str, pipeline: str, stage: str) -> str:
    """What Grafana sends for a panel: its variables and interval macros filled in."""
    return (
        expr.replace("$__rate_interval", "15s")
        .replace("$__interval", "5s")
        .replace("$pipeline", pipeline)
        .replace("$stage", stage)
    )


def _names(expr: str) -> set[str]:
    return {_HISTOGRAM_SUFFIX.sub("", name) for name in _METRIC_NAME.findall(expr)}


def _selectors(expr: str) -> set[str]:
    return {name + (matchers or "") for name, matchers in _SELECTOR.findall(expr)}


def _series_names(names: set[str]) -> str:
    """A regex for the series of these metrics, a histogram's included."""
    return "|".join(f"{name}(_bucket|_count|_sum)?" for name in sorted(names))


@pytest.mark.timeout(300)
def test_prometheus_scrapes_conveyor_and_runs_every_panel_and_rule(
    database_url: str,
    start_conveyor: Callable[..., ConveyorProcess],
    start_prometheus: Callable[..., Prometheus],
    fake_llm: FakeLLM,
) -> None:
    promtool = require_binary("promtool")
    supervisor = start_conveyor(
        "run",
        CONVEYOR_STAGES=",".join(f"{k}={v}" for k, v in STAGES.items()),
        CONVEYOR_SWEEP_INTERVAL="0.5",
        CONVEYOR_LISTENER_CHECK_INTERVAL="1",
        **CHAIN,
    )
    agents = start_conveyor(
        "run",
        CONVEYOR_LLM_BASE_URL=fake_llm.url,
        CONVEYOR_LLM_API_KEY="sk-observability-test",
        CONVEYOR_LLM_BACKOFF_SECONDS="0.05",
        CONVEYOR_LISTENER_CHECK_INTERVAL="1",
        **{f"CONVEYOR_{stage.upper()}_MODEL": model for stage, model in MODELS.items()},
    )
    port, agents_port = metrics_port(supervisor), metrics_port(agents)
    for p in (port, agents_port):
        wait_until(lambda p=p: http_get(f"http://127.0.0.1:{p}/readyz")[0] == 200, 30, "readiness")
    prometheus = start_prometheus([f"127.0.0.1:{port}", f"127.0.0.1:{agents_port}"], [RULES])
    wait_until(lambda: prometheus.value('count(up{job="conveyor"} == 1)') == 2, 30, "first scrapes")

    # Model traffic: every question is analyzed and answered by a model; one answer is refused
    # once with a 429 and retried by the router.
    fake_llm.push(MODELS["answer"], Reply(status=429, headers={"Retry-After": "0"}))
    _insert(
        database_url,
        [{"question": f"How long does lease {n} last?"} for n in range(QUESTIONS)],
        pipeline="agents",
    )

    # Traffic: plain runs, flaky ones (retried once), poison ones (FAILED after 3 attempts), and
    # one delayed run that is cancelled before it is due.
    _insert(database_url, [{"n": n} for n in range(100)])
    _insert(database_url, [{"n": n, "fail_times": 1} for n in range(10)])
    _insert(database_url, [{"n": n, "always_fail": True} for n in range(5)])
    (delayed,) = _insert(database_url, [{"n": -1}], delay="1 hour")
    wait_until(lambda: _finished(database_url) == 115, 60, "115 runs finished")
    wait_until(
        lambda: _finished(database_url, "agents", "DONE") == QUESTIONS, 60, "the questions answered"
    )
    assert _finished(database_url, "agents") == QUESTIONS  # none FAILED

    # A worker of stage one dies: its counters stay in the sum, its replacement adds to them.
    # A worker writes its counts a tenth of a second after making them, and a SIGKILL loses
    # what is not written yet: the kill comes once the first runs' counts are scraped.
    _wait_scraped(
        prometheus,
        {
            'sum(conveyor_runs_completed_total{stage="one"})': 100 + 10,
            'sum(conveyor_runs_claimed_total{stage="one"})': 100 + 10 * 2 + 5 * 3,
            'sum(conveyor_runs_failed_total{stage="one"})': 5,
        },
        "stage one's counts scraped before the kill",
    )
    _kill_and_await_restart(supervisor, "one")
    _insert(database_url, [{"n": n} for n in range(100, 150)])
    wait_until(lambda: _finished(database_url) == 165, 60, "165 runs finished")
    cancel = subprocess.run(
        [sys.executable, "-m", "conveyor", "cancel", str(delayed)],
        env=conveyor_env(database_url, **CHAIN),
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert cancel.returncode == 0, cancel.stderr

    # Several processes did the work of stages one and two...
    for stage in ("one", "two"):
        workers = scalar(
            database_url,
            "SELECT count(DISTINCT worker) FROM conveyor.run_events WHERE stage = %s",
            (stage,),
        )
        assert workers >= 2, (stage, workers)

    # ... and one scrape adds their counters up exactly.
    def total(expr: str) -> float | None:
        return prometheus.value(expr)

    wait_until(
        lambda: total('sum(conveyor_runs_cancelled_total{stage="one"})') == 1,
        30,
        "the cancel counted by the leader and scraped",
    )
    done = 150
    expected: dict[str, float | None] = {
        'sum(conveyor_runs_completed_total{stage="one"})': done + 10,
        'sum(conveyor_runs_completed_total{stage="two"})': done + 10,
        'sum(conveyor_runs_completed_total{stage="three"})': done + 10,
        'sum(conveyor_runs_retried_total{stage="one"})': 10 + 5 * 2,
        'sum(conveyor_runs_failed_total{stage="one"})': 5,
        'sum(conveyor_runs_claimed_total{stage="one"})': done + 10 * 2 + 5 * 3,
        'sum(conveyor_stage_duration_seconds_count{stage="one"})': done + 10 * 2 + 5 * 3,
        'sum(conveyor_runs_failed_total{stage=~"two|three"})': 0,
        'sum(conveyor_lease_losses_total{pipeline="chain"})': 0,
        'sum(conveyor_worker_restarts_total{stage="one"})': 1,
    }
    # The agents' model calls: two per question, one more for the 429; tokens from the usage.
    calls = QUESTIONS * len(MODELS)
    assert len(fake_llm.requests) == calls + 1
    for stage, model in MODELS.items():
        llm = f'pipeline="agents", stage="{stage}", model="{model}"'
        expected[f'sum(conveyor_llm_requests_total{{{llm}, outcome="ok"}})'] = QUESTIONS
        expected[f"sum(conveyor_llm_latency_seconds_count{{{llm}}})"] = QUESTIONS + (
            1 if stage == "answer" else 0
        )
        for kind in ("prompt", "completion"):
            expected[f'sum(conveyor_llm_tokens_total{{{llm}, kind="{kind}"}})'] = (
                QUESTIONS * USAGE[f"{kind}_tokens"]
            )
    expected['sum(conveyor_llm_requests_total{outcome="rate_limited"})'] = 1
    expected['sum(conveyor_llm_requests_total{pipeline="chain"})'] = None  # it calls no model
    _wait_scraped(prometheus, expected, "every counter scraped at its final value")
    in_db = scalar(
        database_url,
        "SELECT count(*) FROM conveyor.run_events WHERE stage = 'one' AND to_status = 'ONE_DONE'",
    )
    assert in_db == expected['sum(conveyor_runs_completed_total{stage="one"})']

    # The leader's gauges describe the database, and live workers their listeners.
    wait_until(
        lambda: all(
            total(f'max(conveyor_workers_alive{{stage="{stage}"}})') == n
            for stage, n in STAGES.items()
        ),
        30,
        "workers alive per stage",
    )
    # The leader refreshes its gauges every few seconds; a scrape may still hold the one before.
    wait_until(
        lambda: total('max(conveyor_queue_scheduled{status="NEW"})') == 0,  # cancelled
        20,
        "no scheduled run once the delayed one is cancelled",
    )
    wait_until(lambda: total('max(conveyor_queue_depth{stage="one"})') == 0, 20, "an empty queue")
    assert total('max(conveyor_maintenance_leader{pipeline="chain"})') == 1
    assert total("max(conveyor_notification_queue_usage_ratio)") is not None
    for stage, n in STAGES.items():
        wait_until(
            lambda s=stage, n=n: total(f'sum(conveyor_listeners_connected{{stage="{s}"}})') == n,
            30,
            f"{stage}'s listeners connected",
        )
    assert total("count(conveyor_build_info == 1)") == 2  # one per supervisor scraped

    # Every panel of the dashboard, as Grafana would send it, returns data: for all pipelines and
    # stages, and for a stage of the agents pipeline alone (it does all the panels show: claims,
    # retries, queue, listeners, model calls). The chain pipeline's stage alone too, except where
    # the panel's metrics have no series of that stage (chain calls no model).
    dashboard = json.loads(DASHBOARD.read_text())
    panels = [p for p in dashboard["panels"] if p["type"] != "row"]
    assert panels
    for panel in panels:
        for target in panel["targets"]:
            names = _names(target["expr"])
            assert names, target["expr"]
            for pipeline, stage in ((".*", ".*"), ("agents", "answer"), ("chain", "one")):
                expr = _substitute(target["expr"], pipeline, stage)
                selected = f'pipeline="{pipeline}", stage="{stage}"'
                series = f'{{__name__=~"{_series_names(names)}", {selected}}}'

                def answered(
                    expr: str = expr, series: str = series, pipeline: str = pipeline
                ) -> bool:
                    if prometheus.query(expr):  # raises unless Prometheus accepts it
                        return True
                    return pipeline == "chain" and not prometheus.query(series)

                # A rate() needs two samples of a series inside its window: on a loaded machine
                # the scrapes can fall behind, and a series seen in only one of them has none yet.
                # Waiting (bounded) for them is not waiting for data that never comes: a panel
                # without data still fails here, after the timeout.
                wait_until(answered, 20, f"panel {panel['title']!r} to return data: {expr}")

    # The dashboard's variables: the label values Grafana would offer.
    pipelines = prometheus.api(
        "label/pipeline/values", **{"match[]": "conveyor_runs_claimed_total"}
    )
    assert pipelines == ["agents", "chain"]
    for pipeline, expected_stages in (("chain", sorted(STAGES)), ("agents", AGENT_STAGES)):
        stages = prometheus.api(
            "label/stage/values",
            **{"match[]": f'conveyor_runs_claimed_total{{pipeline=~"{pipeline}"}}'},
        )
        assert sorted(stages) == sorted(expected_stages)

    # Every rule was evaluated without error, and every series selector in it returns data (an
    # alert's own result is empty while all is well: it holds only what crosses its threshold).
    groups = prometheus.api("rules")["groups"]
    rules = [rule for group in groups for rule in group["rules"]]
    assert len(rules) >= 10
    for rule in rules:
        assert rule["health"] == "ok", rule
        prometheus.query(rule["query"])
        selectors = _selectors(rule["query"])
        assert selectors, rule["query"]
        for selector in selectors:
            assert prometheus.query(f"count({selector})"), (rule["name"], selector)
    recorded = prometheus.query("pipeline_stage:conveyor_queue_depth:sum")
    assert {r["metric"]["stage"] for r in recorded} == set(STAGES) | set(AGENT_STAGES)

    # An alert fires for real: stage three's process dies four times in a row.
    for _ in range(4):
        _kill_and_await_restart(supervisor, "three")

    def firing() -> set[tuple[str, str]]:
        alerts = prometheus.api("alerts")["alerts"]
        return {
            (a["labels"]["alertname"], a["labels"].get("stage", ""))
            for a in alerts
            if a["state"] == "firing"
        }

    wait_until(lambda: ("ConveyorWorkersRestarting", "three") in firing(), 30, "the restart alert")
    assert ("ConveyorWorkersRestarting", "one") not in firing()  # one restart is no alarm
    assert not {alert for alert, _ in firing()} & {
        "ConveyorNoWorkerAlive",
        "ConveyorNoMaintenanceLeader",
        "ConveyorMetricsDown",
        "ConveyorListenerSilent",
    }

    # promtool's lint of real scrapes; the model calls as /metrics shows them (pytest -s).
    for p in (port, agents_port):
        text = scrape(p)
        checked = subprocess.run(
            [promtool, "check", "metrics"], input=text, capture_output=True, text=True, timeout=30
        )
        assert checked.returncode == 0 and not checked.stdout.strip(), (
            checked.stdout + checked.stderr
        )
    llm_lines = [line for line in text.splitlines() if line.startswith("conveyor_llm_")]
    assert llm_lines
    print("\n".join(line for line in llm_lines if "_bucket" not in line))

    for process in (supervisor, agents):
        process.signal(signal.SIGTERM)
        assert process.wait(60) == 0
