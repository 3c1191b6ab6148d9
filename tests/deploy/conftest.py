from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import pytest

from conveyor.pipeline import Stage
from tests.deploy.support import (
    Reading,
    container_environment,
    kustomize,
    of_kind,
    read_environment,
)

RENDERINGS = {"base": "k8s/base", "overlay": "k8s/overlays/example"}


@pytest.fixture(scope="session")
def renderings() -> dict[str, list[dict[str, Any]]]:
    return {name: kustomize(directory) for name, directory in RENDERINGS.items()}


@pytest.fixture(params=list(RENDERINGS))
def rendered(
    request: pytest.FixtureRequest, renderings: dict[str, list[dict[str, Any]]]
) -> list[dict[str, Any]]:
    return renderings[request.param]


@dataclass
class StageDeployment:
    """A Deployment, its one container, and what conveyor makes of that container's environment."""

    deployment: dict[str, Any]
    container: dict[str, Any]
    env: dict[str, str]
    reading: Reading
    stage: Stage
    processes: int


def stage_deployments(objects: list[dict[str, Any]]) -> dict[str, StageDeployment]:
    """Every Deployment by the one stage its CONVEYOR_STAGES runs."""
    found: dict[str, StageDeployment] = {}
    for deployment in of_kind(objects, "Deployment"):
        containers = deployment["spec"]["template"]["spec"]["containers"]
        assert len(containers) == 1, deployment["metadata"]["name"]
        env = container_environment(objects, containers[0])
        reading = read_environment(env)
        running = {stage: n for stage, n in reading.plan.items() if n > 0}
        assert len(running) == 1, (
            f"{deployment['metadata']['name']}: CONVEYOR_STAGES must name one stage, got {running}"
        )
        [(name, processes)] = running.items()
        assert name not in found, f"two Deployments run stage {name}"
        found[name] = StageDeployment(
            deployment, containers[0], env, reading, reading.pipeline.stage(name), processes
        )
    return found
