"""The shipped Prometheus and Grafana files, checked by promtool and against Grafana's file
provisioning rules; the metric definitions, against Prometheus conventions."""

from __future__ import annotations

import json
import re
import subprocess
from typing import Any

from prometheus_client import Counter, Gauge, Histogram
from prometheus_client.metrics import MetricWrapperBase

from conveyor import metrics
from conveyor.agents import metrics as agent_metrics
from tests.observability.prom import DASHBOARD, DEPLOY

PROMETHEUS = DEPLOY / "prometheus"
GRAFANA = DEPLOY / "grafana"
# model: a configured model name, and kind: prompt or completion (the LLM metrics), are bounded
# by configuration as the others are by the pipeline's declaration.
ALLOWED_LABELS = {
    *("pipeline", "stage", "status", "outcome", "version", "python", "model", "kind"),
    "operation",  # a worker's protocol statement: a handful of fixed names
    "key",  # a flow-control limit's key: a route, a model; a handful per deployment
    "what",  # what flow control held back: a claim, a run
}


def _promtool(promtool: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [promtool, *args], cwd=PROMETHEUS, capture_output=True, text=True, timeout=60
    )


def test_promtool_checks_the_config_and_the_rules(promtool: str) -> None:
    config = _promtool(promtool, "check", "config", "prometheus.yml")
    assert config.returncode == 0, config.stdout + config.stderr
    rules = _promtool(promtool, "check", "rules", "rules.yml")
    assert rules.returncode == 0, rules.stdout + rules.stderr


def test_promtool_unit_tests_fire_and_stay_quiet_for_every_alert(promtool: str) -> None:
    result = _promtool(promtool, "test", "rules", "rules_test.yml")
    assert result.returncode == 0, result.stdout + result.stderr
    alerts = set(re.findall(r"^\s+- alert: (\w+)", (PROMETHEUS / "rules.yml").read_text(), re.M))
    tests = (PROMETHEUS / "rules_test.yml").read_text()
    assert len(alerts) >= 10
    for alert in alerts:
        cases = re.findall(rf"alertname: {alert}\n\s+exp_alerts:(.*)", tests)
        assert any(c.strip() == "[]" for c in cases), f"{alert} has no quiet case"
        assert any(c.strip() != "[]" for c in cases), f"{alert} has no firing case"


def _dashboard() -> dict[str, Any]:
    return json.loads(DASHBOARD.read_text())


def test_dashboard_is_ready_for_file_provisioning() -> None:
    text = DASHBOARD.read_text()
    dashboard = _dashboard()
    assert "id" not in dashboard or dashboard["id"] is None
    assert isinstance(dashboard["uid"], str) and 0 < len(dashboard["uid"]) <= 40
    assert isinstance(dashboard["schemaVersion"], int)
    assert "__inputs" not in dashboard and "${DS_" not in text
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    assert {"pipeline", "stage"} <= set(variables)
    panels = [p for p in dashboard["panels"] if p["type"] != "row"]
    for panel in panels:
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, panel["title"]
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            assert target["datasource"]["uid"] == "${datasource}", panel["title"]
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    # The datasource the variable selects by default is the provisioned one.
    provisioned = (GRAFANA / "provisioning" / "datasources" / "prometheus.yaml").read_text()
    uid = re.search(r"^\s+uid: (\S+)", provisioned, re.M)
    assert uid and variables["datasource"]["current"]["value"] == uid.group(1)
    assert re.search(r"^\s+type: prometheus$", provisioned, re.M)


def test_dashboard_provider_loads_files_from_a_path() -> None:
    provider = (GRAFANA / "provisioning" / "dashboards" / "conveyor.yaml").read_text()
    assert re.search(r"^providers:", provider, re.M)
    assert re.search(r"^\s+type: file$", provider, re.M)
    assert re.search(r"^\s+options:\n\s+path: /\S+", provider, re.M)


def test_dashboard_covers_what_operators_watch() -> None:
    exprs = " ".join(
        t["expr"] for p in _dashboard()["panels"] if p["type"] != "row" for t in p["targets"]
    )
    for name in (
        "conveyor_runs_completed_total",
        "conveyor_stage_duration_seconds_bucket",
        "conveyor_wakeup_latency_seconds_bucket",
        "conveyor_queue_depth",
        "conveyor_queue_oldest_age_seconds",
        "conveyor_runs_failed_total",
        "conveyor_runs_retried_total",
        "conveyor_runs_in_flight",
        "conveyor_listener_reconnects_total",
        "conveyor_worker_restarts_total",
        "conveyor_sweep_pickups_total",
        "conveyor_llm_tokens_total",
        "conveyor_llm_latency_seconds_bucket",
    ):
        assert name in exprs, name
    for quantile in ("0.5", "0.95", "0.99"):
        assert (
            f"histogram_quantile({quantile}, sum by (le, pipeline, stage) (rate(conveyor_stage"
            in exprs
        )


def _defined() -> list[MetricWrapperBase]:
    return [
        m
        for module in (metrics, agent_metrics)
        for m in vars(module).values()
        if isinstance(m, MetricWrapperBase)
    ]


def test_metric_definitions_follow_prometheus_conventions() -> None:
    defined = _defined()
    assert len(defined) >= 20
    for metric in defined:
        name = metric._name
        assert name.startswith("conveyor_"), name
        labels = set(metric._labelnames)
        assert labels <= ALLOWED_LABELS, (name, labels)  # never a run id or a pid
        if isinstance(metric, Histogram):
            assert name.endswith("_seconds"), name
        if isinstance(metric, Gauge):
            # 'all' (the default) would add a pid label per process: every gauge chooses.
            assert metric._multiprocess_mode != "all", name
        assert not re.search(r"_(ms|milliseconds|minutes|hours|percent)$", name), name
        assert re.fullmatch(r"[a-z][a-z0-9_]*", name), name


def test_docs_list_every_metric() -> None:
    docs = (DEPLOY.parent / "docs" / "metrics.md").read_text()
    for metric in _defined():
        exposed = metric._name + ("_total" if isinstance(metric, Counter) else "")
        assert f"`{exposed}`" in docs, exposed
