"""The KEDA objects: valid against schemas generated from KEDA's CRDs, scaling parameters chosen
(not left at defaults), no credentials in trigger metadata, the query identical to the product's
`stage_load`, the target equal to what one pod holds in flight, and the connections of every
stage at its maximum inside PostgreSQL's max_connections."""

from __future__ import annotations

import copy
from typing import Any

import cloudcoil.models.keda.v1alpha1 as keda
import jsonschema
import pytest

from tests.deploy.conftest import stage_deployments
from tests.deploy.support import named, normalized_sql, of_kind, stage_load_query


def strict(schema: Any) -> Any:
    """Reject unknown fields, as the API server's strict field validation does for a CRD."""
    if isinstance(schema, dict):
        schema = {key: strict(value) for key, value in schema.items()}
        if "properties" in schema and "additionalProperties" not in schema:
            schema["additionalProperties"] = False
    elif isinstance(schema, list):
        schema = [strict(item) for item in schema]
    return schema


CRD_VALIDATORS = {
    kind: jsonschema.Draft202012Validator(
        strict(model.model_json_schema(by_alias=True, mode="validation"))
    )
    for kind, model in (
        ("ScaledObject", keda.ScaledObject),
        ("TriggerAuthentication", keda.TriggerAuthentication),
    )
}

# What a pod holds open (conveyor/worker/loop.py, maintenance.py): each worker process a pool of
# 2 and its LISTEN connection; each pod one maintenance process with one connection.
CONNECTIONS_PER_PROCESS = 3
CONNECTIONS_PER_POD = 1
# PostgreSQL's defaults: max_connections 100, of which superuser_reserved_connections 3.
MAX_CONNECTIONS = 100 - 3
# Outside the Deployments: the migrate Job (1), and KEDA's scaler, whose pool opens at most one
# connection per ScaledObject polling at the same moment.


def crd_errors(item: dict[str, Any]) -> list[str]:
    assert item["apiVersion"] == "keda.sh/v1alpha1"
    validator = CRD_VALIDATORS[item["kind"]]
    return [
        f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(item)
    ]


def test_keda_objects_validate_against_the_crd_schema(rendered: list[dict[str, Any]]) -> None:
    keda_objects = [o for o in rendered if o["apiVersion"].startswith("keda.sh/")]
    assert {o["kind"] for o in keda_objects} == {"ScaledObject", "TriggerAuthentication"}
    for item in keda_objects:
        assert crd_errors(item) == [], item["metadata"]["name"]


def test_the_crd_schema_rejects_a_misspelt_field_and_a_missing_trigger(
    renderings: dict[str, list[dict[str, Any]]],
) -> None:
    scaled = of_kind(renderings["base"], "ScaledObject")[0]
    misspelt = copy.deepcopy(scaled)
    misspelt["spec"]["pollingIntervall"] = misspelt["spec"].pop("pollingInterval")
    assert any("pollingIntervall" in error for error in crd_errors(misspelt))
    missing = copy.deepcopy(scaled)
    del missing["spec"]["triggers"]
    assert any("triggers" in error for error in crd_errors(missing))


def test_each_stage_scales_on_its_own_chosen_terms(rendered: list[dict[str, Any]]) -> None:
    deployments = stage_deployments(rendered)
    for name, found in deployments.items():
        scaled = named(rendered, "ScaledObject", found.deployment["metadata"]["name"])
        spec = scaled["spec"]
        assert spec["scaleTargetRef"] == {"name": found.deployment["metadata"]["name"]}
        # chosen, not KEDA's defaults left implicit
        for field in ("pollingInterval", "cooldownPeriod", "minReplicaCount", "maxReplicaCount"):
            assert isinstance(spec.get(field), int), f"{name}: {field} not set"
        assert 1 <= spec["minReplicaCount"] <= found.deployment["spec"]["replicas"]
        assert found.deployment["spec"]["replicas"] <= spec["maxReplicaCount"]
        scale_down = spec["advanced"]["horizontalPodAutoscalerConfig"]["behavior"]["scaleDown"]
        assert scale_down["stabilizationWindowSeconds"] > 0 and scale_down["policies"], name
        [trigger] = spec["triggers"]
        assert trigger["type"] == "postgresql"
        # credentials only through the TriggerAuthentication, never in metadata
        assert set(trigger["metadata"]) == {
            "query",
            "targetQueryValue",
            "activationTargetQueryValue",
        }
        auth = named(rendered, "TriggerAuthentication", trigger["authenticationRef"]["name"])
        assert [ref["parameter"] for ref in auth["spec"]["secretTargetRef"]] == ["connection"]
        assert float(trigger["metadata"]["activationTargetQueryValue"]) >= 0
        # one pod's worth of runs: processes x concurrency in flight
        capacity = found.processes * found.stage.concurrency
        assert float(trigger["metadata"]["targetQueryValue"]) == capacity, (
            f"{name}: targetQueryValue should be {found.processes} x {found.stage.concurrency}"
        )


def test_the_keda_query_is_the_products_stage_load(rendered: list[dict[str, Any]]) -> None:
    for name, found in stage_deployments(rendered).items():
        scaled = named(rendered, "ScaledObject", found.deployment["metadata"]["name"])
        query = scaled["spec"]["triggers"][0]["metadata"]["query"]
        expected = stage_load_query(
            found.reading.settings.schema, found.reading.pipeline, found.stage
        )
        assert normalized_sql(query) == normalized_sql(expected), name


def test_every_stage_at_its_maximum_fits_in_max_connections(
    rendered: list[dict[str, Any]],
) -> None:
    total = 1 + len(of_kind(rendered, "ScaledObject"))  # migrate Job, KEDA's scaler
    for found in stage_deployments(rendered).values():
        scaled = named(rendered, "ScaledObject", found.deployment["metadata"]["name"])
        # a rolling update adds maxSurge pods on top of the maximum
        surge = found.deployment["spec"]["strategy"]["rollingUpdate"]["maxSurge"]
        pods = scaled["spec"]["maxReplicaCount"] + surge
        total += pods * (found.processes * CONNECTIONS_PER_PROCESS + CONNECTIONS_PER_POD)
    assert total <= MAX_CONNECTIONS, f"{total} connections at maxReplicaCount"


@pytest.mark.parametrize("kind", ["ScaledObject", "TriggerAuthentication"])
def test_keda_objects_hold_no_credentials(rendered: list[dict[str, Any]], kind: str) -> None:
    text = repr(of_kind(rendered, kind)).lower()
    for word in ("password", "postgresql://", "postgres://", "sslpassword"):
        assert word not in text
