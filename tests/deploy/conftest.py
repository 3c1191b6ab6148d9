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
    parse_command,
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


@dataclass
class ConsoleDeployment:
    """A Deployment running `conveyor console`, and what conveyor makes of its environment."""

    deployment: dict[str, Any]
    container: dict[str, Any]
    env: dict[str, str]
    reading: Reading


def stage_deployments(objects: list[dict[str, Any]]) -> dict[str, StageDeployment]:
    """Every Deployment but the console's, by the one stage its CONVEYOR_STAGES runs."""
    found: dict[str, StageDeployment] = {}
    for deployment in of_kind(objects, "Deployment"):
        containers = deployment["spec"]["template"]["spec"]["containers"]
        assert len(containers) == 1, deployment["metadata"]["name"]
        if parse_command(containers[0]["args"]) == "console":
            continue
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


def console_deployments(objects: list[dict[str, Any]]) -> list[ConsoleDeployment]:
    """Every Deployment whose container runs `conveyor console`."""
    found = []
    for deployment in of_kind(objects, "Deployment"):
        [container] = deployment["spec"]["template"]["spec"]["containers"]
        if parse_command(container["args"]) != "console":
            continue
        env = container_environment(objects, container)
        reading = read_environment(env, container["args"])
        found.append(ConsoleDeployment(deployment, container, env, reading))
    return found
