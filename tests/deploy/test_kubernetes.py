"""k8s/: the base and the overlay render, every built-in object validates against the Kubernetes
schemas offline, and each stage's Deployment is one an operator can run: probes, resources, the
restricted security profile, a grace period longer than the drain, a PodDisruptionBudget. The
overlay's console Deployment gets the same resources and security, its own probes and Service."""

from __future__ import annotations

import copy
from typing import Any

import kubernetes_validate
import pytest

from conveyor.console.server import SHUTDOWN_GRACE_SECONDS
from tests.deploy.conftest import console_deployments, stage_deployments
from tests.deploy.support import (
    container_environment,
    default_pipeline,
    named,
    of_kind,
    parse_command,
    read_environment,
)

# The oldest Kubernetes the manifests are meant for, and the newest the schemas know.
KUBERNETES_VERSIONS = ("1.30.0", kubernetes_validate.latest_version())
# The supervisor kills children still running this long after the drain timeout (contract of
# `conveyor run`: escalation after drain + 5 s).
SUPERVISOR_ESCALATION_SECONDS = 5


def builtin(objects: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [o for o in objects if not o["apiVersion"].startswith("keda.sh/")]


def test_kustomize_renders_every_object(renderings: dict[str, list[dict[str, Any]]]) -> None:
    kinds: dict[str, dict[str, int]] = {}
    for rendering, objects in renderings.items():
        kinds[rendering] = {}
        for item in objects:
            kinds[rendering][item["kind"]] = kinds[rendering].get(item["kind"], 0) + 1
    stages = len(default_pipeline().stages)
    # no Secret anywhere: conveyor-database, conveyor-keda-scaler, conveyor-console are referenced
    assert kinds["base"] == {
        "ServiceAccount": 1,
        "ConfigMap": 1,
        "Job": 1,
        "TriggerAuthentication": 1,
        "Deployment": stages,
        "PodDisruptionBudget": stages,
        "ScaledObject": stages,
    }
    # the overlay adds the console: one Deployment and its Service
    assert kinds["overlay"] == {**kinds["base"], "Deployment": stages + 1, "Service": 1}


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
def test_builtin_objects_validate_against_the_kubernetes_schema(
    rendered: list[dict[str, Any]], version: str
) -> None:
    for item in builtin(rendered):
        # strict: an unknown (misspelt) field is an error, as with `kubectl apply --validate=strict`
        kubernetes_validate.validate(item, version, strict=True)


def test_the_schema_check_rejects_a_misspelt_field_and_a_wrong_type(
    renderings: dict[str, list[dict[str, Any]]],
) -> None:
    deployment = of_kind(renderings["base"], "Deployment")[0]
    misspelt = copy.deepcopy(deployment)
    container = misspelt["spec"]["template"]["spec"]["containers"][0]
    container["livenesProbe"] = container.pop("livenessProbe")
    wrong_type = copy.deepcopy(deployment)
    wrong_type["spec"]["replicas"] = "two"
    for broken in (misspelt, wrong_type):
        with pytest.raises(kubernetes_validate.ValidationError):
            kubernetes_validate.validate(broken, KUBERNETES_VERSIONS[-1], strict=True)


def test_each_stage_of_the_pipeline_has_a_deployment_a_pdb_and_a_scaledobject(
    rendered: list[dict[str, Any]],
) -> None:
    deployments = stage_deployments(rendered)
    assert sorted(deployments) == sorted(stage.name for stage in default_pipeline().stages)
    budgets = of_kind(rendered, "PodDisruptionBudget")
    scaled = {o["spec"]["scaleTargetRef"]["name"] for o in of_kind(rendered, "ScaledObject")}
    for name, found in deployments.items():
        labels = found.deployment["spec"]["template"]["metadata"]["labels"]
        selector = found.deployment["spec"]["selector"]["matchLabels"]
        assert selector.items() <= labels.items()
        # exactly one budget selects this stage's pods, and it selects no other stage's
        covering = [
            b for b in budgets if b["spec"]["selector"]["matchLabels"].items() <= labels.items()
        ]
        assert len(covering) == 1, f"{name}: {len(covering)} PodDisruptionBudgets"
        assert covering[0]["spec"] == {
            "maxUnavailable": 1,
            "unhealthyPodEvictionPolicy": "AlwaysAllow",
            "selector": {"matchLabels": selector},
        }
        assert found.deployment["metadata"]["name"] in scaled, f"{name}: no ScaledObject"


def test_every_deployment_has_resources_and_the_restricted_security_profile(
    rendered: list[dict[str, Any]],
) -> None:
    deployments = of_kind(rendered, "Deployment")
    assert len(deployments) == len(stage_deployments(rendered)) + len(console_deployments(rendered))
    for deployment in deployments:
        name = deployment["metadata"]["name"]
        pod = deployment["spec"]["template"]["spec"]
        [container] = pod["containers"]
        resources = container["resources"]
        assert {"cpu", "memory"} <= resources["requests"].keys(), name
        assert "memory" in resources["limits"], name
        assert_restricted(pod, container, name)
        mounts = emptydir_mounts(pod, container)
        assert "/tmp" in mounts, name
        # importing conveyor (any command) writes to the multiprocess directory
        env = container_environment(rendered, container)
        assert env["PROMETHEUS_MULTIPROC_DIR"] in mounts, name


def test_every_stage_deployment_has_probes_on_its_metrics_port(
    rendered: list[dict[str, Any]],
) -> None:
    for name, found in stage_deployments(rendered).items():
        pod = found.deployment["spec"]["template"]
        container = found.container
        port = found.reading.settings.metrics_port
        ports = {p["name"]: p["containerPort"] for p in container["ports"]}
        assert ports == {"metrics": port}, name
        for probe_name, path in (
            ("startupProbe", "/healthz"),
            ("livenessProbe", "/healthz"),
            ("readinessProbe", "/readyz"),
        ):
            assert container[probe_name]["httpGet"] == {"path": path, "port": "metrics"}, name
        assert pod["metadata"]["annotations"] == {
            "prometheus.io/scrape": "true",
            "prometheus.io/port": str(port),
            "prometheus.io/path": "/metrics",
        }


def test_the_overlays_console_listens_with_credentials_behind_a_clusterip_service(
    renderings: dict[str, list[dict[str, Any]]],
) -> None:
    assert console_deployments(renderings["base"]) == []
    objects = renderings["overlay"]
    [console] = console_deployments(objects)
    pod = console.deployment["spec"]["template"]
    container = console.container
    settings = console.reading.console
    assert settings is not None
    assert console.deployment["spec"]["replicas"] == 1
    # every interface of the pod, so credentials, from the Secret `conveyor-console`
    assert settings.host == "0.0.0.0" and settings.auth_required
    assert not settings.allow_actions
    secrets = {
        item["name"]: item["valueFrom"]["secretKeyRef"]
        for item in container["env"]
        if "valueFrom" in item
    }
    for variable, key in (("USER", "user"), ("PASSWORD", "password")):
        reference = secrets[f"CONVEYOR_CONSOLE_{variable}"]
        assert reference == {"name": "conveyor-console", "key": key}, variable
    # probes on the console's own port; /healthz answers without credentials
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"http": settings.port}
    for probe_name in ("readinessProbe", "livenessProbe"):
        assert container[probe_name]["httpGet"] == {"path": "/healthz", "port": "http"}
    # no /metrics to scrape
    assert "prometheus.io/scrape" not in pod["metadata"].get("annotations", {})
    # uvicorn cuts the open event streams after SHUTDOWN_GRACE_SECONDS, then exits
    grace = pod["spec"]["terminationGracePeriodSeconds"]
    assert grace > SHUTDOWN_GRACE_SECONDS and "lifecycle" not in container

    service = named(objects, "Service", "conveyor-console")
    assert service["spec"]["type"] == "ClusterIP"
    selector = service["spec"]["selector"]
    assert selector == console.deployment["spec"]["selector"]["matchLabels"]
    assert selector.items() <= pod["metadata"]["labels"].items()
    for other in of_kind(objects, "Deployment"):
        if other is not console.deployment:
            labels = other["spec"]["template"]["metadata"]["labels"]
            assert not selector.items() <= labels.items(), other["metadata"]["name"]
    assert service["spec"]["ports"] == [
        {"name": "http", "port": settings.port, "targetPort": "http", "protocol": "TCP"}
    ]


def test_the_migrate_job_runs_migrate_with_the_same_security(
    rendered: list[dict[str, Any]],
) -> None:
    [job] = of_kind(rendered, "Job")
    pod = job["spec"]["template"]["spec"]
    [container] = pod["containers"]
    assert "command" not in container
    assert parse_command(container["args"]) == "migrate"
    reading = read_environment(container_environment(rendered, container))
    assert reading.ignored == []
    assert reading.settings.database_url is not None, "migrate needs the Secret's URL"
    assert pod["restartPolicy"] in ("OnFailure", "Never")
    assert {"cpu", "memory"} <= container["resources"]["requests"].keys()
    assert_restricted(pod, container, "migrate")
    assert "/tmp" in emptydir_mounts(pod, container)


def test_the_grace_period_outlasts_the_drain_and_the_supervisors_escalation(
    rendered: list[dict[str, Any]],
) -> None:
    for name, found in stage_deployments(rendered).items():
        pod = found.deployment["spec"]["template"]["spec"]
        drain = found.reading.settings.drain_timeout
        grace = pod["terminationGracePeriodSeconds"]
        assert "lifecycle" not in found.container, f"{name}: a preStop hook eats into the grace"
        assert grace > drain + SUPERVISOR_ESCALATION_SECONDS, (
            f"{name}: terminationGracePeriodSeconds={grace} leaves no time after a "
            f"{drain:g}s drain and the supervisor's {SUPERVISOR_ESCALATION_SECONDS}s escalation"
        )


def test_containers_agree_with_the_cli_and_the_settings(rendered: list[dict[str, Any]]) -> None:
    for name, found in stage_deployments(rendered).items():
        # args only: the image's exec-form ENTRYPOINT stays, so `conveyor` is PID 1
        assert "command" not in found.container, f"{name}: overrides the entrypoint"
        assert parse_command(found.container["args"]) == "run", name
        assert found.reading.ignored == [], f"{name}: variables conveyor ignores"
        assert found.reading.settings.database_url is not None, f"{name}: no database URL"
        assert found.container["image"].split("/")[-1].startswith("conveyor:"), name
    for console in console_deployments(rendered):
        name = console.deployment["metadata"]["name"]
        assert "command" not in console.container, f"{name}: overrides the entrypoint"
        assert console.reading.console is not None, name
        assert console.reading.ignored == [], f"{name}: variables conveyor ignores"
        assert console.reading.settings.database_url is not None, f"{name}: no database URL"
        assert console.container["image"].split("/")[-1].startswith("conveyor:"), name


def assert_restricted(pod: dict[str, Any], container: dict[str, Any], name: str) -> None:
    """Pod Security Standards, restricted profile, plus a read-only root filesystem."""
    pod_security = pod["securityContext"]
    assert pod_security["runAsNonRoot"] is True, name
    assert isinstance(pod_security["runAsUser"], int) and pod_security["runAsUser"] > 0, name
    assert pod_security["seccompProfile"] == {"type": "RuntimeDefault"}, name
    assert pod["automountServiceAccountToken"] is False, name
    security = container["securityContext"]
    assert security["allowPrivilegeEscalation"] is False, name
    assert security["readOnlyRootFilesystem"] is True, name
    assert security["capabilities"] == {"drop": ["ALL"]}, name
    assert not security.get("privileged", False), name
    assert "hostNetwork" not in pod and "hostPID" not in pod, name


def emptydir_mounts(pod: dict[str, Any], container: dict[str, Any]) -> set[str]:
    empty = {v["name"] for v in pod.get("volumes", []) if "emptyDir" in v}
    return {m["mountPath"] for m in container.get("volumeMounts", []) if m["name"] in empty}


def test_the_overlay_changes_one_stages_replicas_and_concurrency(
    renderings: dict[str, list[dict[str, Any]]],
) -> None:
    base = {identity(o): comparable(o) for o in renderings["base"]}
    overlay = {identity(o): comparable(o) for o in renderings["overlay"]}
    added = {("Deployment", "conveyor-console"), ("Service", "conveyor-console")}
    assert overlay.keys() == base.keys() | added
    changed = sorted(key for key in base if base[key] != overlay[key])
    assert changed == [("Deployment", "conveyor-analyze"), ("ScaledObject", "conveyor-analyze")]

    before = stage_deployments(renderings["base"])["analyze"]
    after = stage_deployments(renderings["overlay"])["analyze"]
    assert (before.deployment["spec"]["replicas"], after.deployment["spec"]["replicas"]) == (2, 3)
    assert (before.stage.concurrency, after.stage.concurrency) == (10, 25)
    # nothing else: put the two values back and the Deployment is the base's again
    restored = copy.deepcopy(overlay[("Deployment", "conveyor-analyze")])
    restored["spec"]["replicas"] = before.deployment["spec"]["replicas"]
    for item in restored["spec"]["template"]["spec"]["containers"][0]["env"]:
        if item["name"] == "CONVEYOR_ANALYZE_CONCURRENCY":
            item["value"] = str(before.stage.concurrency)
    assert restored == base[("Deployment", "conveyor-analyze")]


def identity(item: dict[str, Any]) -> tuple[str, str]:
    return item["kind"], item["metadata"]["name"]


def comparable(item: dict[str, Any]) -> dict[str, Any]:
    """An object without what any overlay sets for every object (namespace, image registry),
    with env lists in name order (a strategic merge may reorder them)."""
    item = copy.deepcopy(item)
    item["metadata"].pop("namespace", None)
    pod = item.get("spec", {}).get("template", {}).get("spec", {})
    for container in pod.get("containers", []):
        container["image"] = container["image"].split("/")[-1]
        container["env"] = sorted(container.get("env", []), key=lambda e: e["name"])
    return item
