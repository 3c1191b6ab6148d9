"""docker-compose.yml: valid against the Compose specification's schema, and every conveyor
service's command and environment mean what they say to the CLI, to Settings and (for the
console) to ConsoleSettings."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml

from conveyor.console.server import SHUTDOWN_GRACE_SECONDS
from tests.deploy.support import (
    ROOT,
    default_pipeline,
    dockerfile_environment,
    parse_command,
    read_env_file,
    read_environment,
    run_tool,
)

COMPOSE = ROOT / "docker-compose.yml"
# The supervisor kills children still running this long after the drain timeout.
SUPERVISOR_ESCALATION_SECONDS = 5
SECRET_WORDS = ("PASSWORD", "SECRET", "TOKEN", "_KEY", "DATABASE_URL")
# The conveyor services that run no stage, and so are neither workers nor scraped.
NOT_WORKERS = {
    "migrate": "exits once the schema is current",
    "console": "serves the operators' page, and no /metrics",
}


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    loaded: dict[str, Any] = yaml.safe_load(COMPOSE.read_text())
    return loaded


def conveyor_services(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {
        name: service
        for name, service in compose["services"].items()
        if service.get("image", "").startswith("conveyor:")
    }


def worker_services(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {
        name: service
        for name, service in conveyor_services(compose).items()
        if name not in NOT_WORKERS
    }


def service_environment(service: dict[str, Any]) -> dict[str, str]:
    """What the container starts with: the image's ENV, the env files that exist in a fresh
    clone, then `environment` (docker compose's order of precedence)."""
    env = dockerfile_environment(ROOT / "deploy" / "Dockerfile")
    for entry in service.get("env_file", []):
        path = ROOT / (entry["path"] if isinstance(entry, dict) else entry)
        if path.exists():
            env.update(read_env_file(path))
    env.update({k: str(v) for k, v in service.get("environment", {}).items()})
    return env


def seconds(duration: str) -> float:
    units = {"ms": 0.001, "s": 1, "m": 60, "h": 3600}
    for unit in sorted(units, key=len, reverse=True):
        if duration.endswith(unit):
            return float(duration[: -len(unit)]) * units[unit]
    return float(duration)


def test_compose_file_validates_against_the_compose_specification() -> None:
    result = run_tool("check-jsonschema", "--builtin-schema", "vendor.compose-spec", str(COMPOSE))
    assert "ok" in result.stdout


def test_the_specification_check_rejects_a_wrong_condition(tmp_path: Path) -> None:
    broken = tmp_path / "docker-compose.yml"
    text = COMPOSE.read_text().replace("service_completed_successfully", "service_completed", 1)
    broken.write_text(text.replace("stop_grace_period:", "stop_grace_periode:", 1))
    result = run_tool(
        "check-jsonschema", "--builtin-schema", "vendor.compose-spec", str(broken), check=False
    )
    assert result.returncode != 0
    assert "stop_grace_periode" in result.stdout


def test_postgres_is_healthy_only_when_pg_isready_says_so(compose: dict[str, Any]) -> None:
    postgres = compose["services"]["postgres"]
    assert "pg_isready" in " ".join(postgres["healthcheck"]["test"])
    migrate = compose["services"]["migrate"]
    assert parse_command(migrate["command"]) == "migrate"
    assert migrate["depends_on"] == {"postgres": {"condition": "service_healthy"}}
    assert migrate["restart"] == "no"


def test_one_worker_service_per_stage_waits_for_the_migration(compose: dict[str, Any]) -> None:
    stages = {}
    for name, service in worker_services(compose).items():
        assert parse_command(service["command"]) == "run", name
        reading = read_environment(service_environment(service))
        running = {stage: n for stage, n in reading.plan.items() if n > 0}
        assert len(running) == 1, f"{name}: CONVEYOR_STAGES must name one stage: {running}"
        [stage] = running
        stages[stage] = name
        assert service["depends_on"] == {
            "postgres": {"condition": "service_healthy"},
            "migrate": {"condition": "service_completed_successfully"},
        }, name
        assert isinstance(service["deploy"]["replicas"], int), f"{name}: replicas"
        assert service["deploy"]["replicas"] >= 1, name
        # docker stop waits 10 s by default, then SIGKILLs: shorter than the drain
        grace = seconds(service["stop_grace_period"])
        drain = reading.settings.drain_timeout
        assert grace > drain + SUPERVISOR_ESCALATION_SECONDS, name
        # the healthcheck asks the supervisor's liveness endpoint on the port it serves
        probe = " ".join(service["healthcheck"]["test"])
        assert service["healthcheck"]["test"][0] == "CMD", f"{name}: exec form, no shell"
        assert f"127.0.0.1:{reading.settings.metrics_port}/healthz" in probe, name
        assert service["expose"] == [str(reading.settings.metrics_port)], name
    assert sorted(stages) == sorted(stage.name for stage in default_pipeline().stages)


def test_conveyor_services_agree_with_the_cli_and_the_settings(compose: dict[str, Any]) -> None:
    services = conveyor_services(compose)
    assert NOT_WORKERS.keys() <= services.keys()
    for name, service in services.items():
        # exec form, and the image's ENTRYPOINT kept: `conveyor` is PID 1, never `sh -c`
        assert isinstance(service["command"], list) and "entrypoint" not in service, name
        parse_command(service["command"])
        env = service_environment(service)
        reading = read_environment(env, service["command"])
        assert reading.ignored == [], f"{name}: variables conveyor does not read"
        assert reading.settings.database_url, f"{name}: no database URL"
        # a read-only root: PROMETHEUS_MULTIPROC_DIR and /tmp are tmpfs mounts
        assert service["read_only"] is True, name
        assert {"/tmp", env["PROMETHEUS_MULTIPROC_DIR"]} <= set(service["tmpfs"]), name


def test_secrets_come_from_env_files(compose: dict[str, Any]) -> None:
    for name, service in compose["services"].items():
        for key in service.get("environment", {}):
            assert not any(word in key for word in SECRET_WORDS), f"{name}: {key} inline"
        for entry in service.get("env_file", []):
            assert isinstance(entry, dict), f"{name}: env_file entries name required or not"
            path = ROOT / entry["path"]
            if entry.get("required", True):
                assert path.exists(), f"{name}: {path} missing"
            else:
                assert entry["path"].startswith("deploy/compose/local/"), name
    assert "deploy/compose/local/" in (ROOT / ".gitignore").read_text().splitlines()


def test_the_example_database_url_matches_the_example_postgres(compose: dict[str, Any]) -> None:
    postgres = read_env_file(ROOT / "deploy/compose/example/postgres.env")
    conveyor = read_env_file(ROOT / "deploy/compose/example/conveyor.env")
    url = urlsplit(conveyor["CONVEYOR_DATABASE_URL"])
    assert (url.username, url.password) == (
        postgres["POSTGRES_USER"],
        postgres["POSTGRES_PASSWORD"],
    )
    assert url.path == "/" + postgres["POSTGRES_DB"]
    assert url.hostname in compose["services"] and url.port == 5432


def test_prometheus_and_grafana_get_the_shipped_configuration(compose: dict[str, Any]) -> None:
    prometheus = compose["services"]["prometheus"]
    mounts = {m.split(":")[1]: m.split(":")[0] for m in prometheus["volumes"]}
    assert mounts["/etc/prometheus/prometheus.yml"] == "./deploy/prometheus/prometheus.yml"
    assert mounts["/etc/prometheus/rules.yml"] == "./deploy/prometheus/rules.yml"
    config = yaml.safe_load((ROOT / "deploy/prometheus/prometheus.yml").read_text())
    # rule_files are relative to the configuration file, mounted in /etc/prometheus
    rule_files = {str(Path("/etc/prometheus") / f) for f in config["rule_files"]}
    assert "/etc/prometheus/rules.yml" in rule_files
    scraped = scrape_targets(config)
    for name, service in worker_services(compose).items():
        assert f"{name}:{service['expose'][0]}" in scraped, f"Prometheus misses {name}"
    for name in NOT_WORKERS:
        assert not any(target.startswith(f"{name}:") for target in scraped), name

    grafana = compose["services"]["grafana"]
    mounts = {m.split(":")[1]: m.split(":")[0] for m in grafana["volumes"]}
    assert mounts["/etc/grafana/provisioning"] == "./deploy/grafana/provisioning"
    providers = ROOT / "deploy/grafana/provisioning/dashboards"
    for file in sorted(providers.glob("*.y*ml")):
        for provider in yaml.safe_load(file.read_text())["providers"]:
            path = provider["options"]["path"]
            assert any(path.startswith(target) for target in mounts), f"{file}: {path}"
    for service in compose["services"].values():
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("./"):
                assert (ROOT / source).exists(), source


def test_web_interfaces_listen_on_localhost_only(compose: dict[str, Any]) -> None:
    for name, service in compose["services"].items():
        for port in service.get("ports", []):
            assert str(port).startswith("127.0.0.1:"), f"{name}: {port}"


def test_the_console_requires_credentials_and_answers_its_healthcheck(
    compose: dict[str, Any],
) -> None:
    console = compose["services"]["console"]
    assert parse_command(console["command"]) == "console"
    reading = read_environment(service_environment(console), console["command"])
    settings = reading.console
    assert settings is not None
    # every interface inside the container, so credentials; read-only unless changed locally
    assert settings.host == "0.0.0.0" and settings.auth_required
    assert settings.password and not settings.allow_actions
    assert console["depends_on"] == {
        "postgres": {"condition": "service_healthy"},
        "migrate": {"condition": "service_completed_successfully"},
    }
    assert console["restart"] == "unless-stopped"
    healthcheck = console["healthcheck"]["test"]
    assert healthcheck[0] == "CMD", "exec form, no shell"
    assert f"'http://127.0.0.1:{settings.port}/healthz'" in " ".join(healthcheck)
    # uvicorn cuts the open event streams after SHUTDOWN_GRACE_SECONDS, then exits
    assert seconds(console["stop_grace_period"]) > SHUTDOWN_GRACE_SECONDS
    # the example files required, the local overrides optional and read last (they win)
    files = [entry["path"] for entry in console["env_file"]]
    assert files == [
        "deploy/compose/example/conveyor.env",
        "deploy/compose/local/conveyor.env",
        "deploy/compose/example/console.env",
        "deploy/compose/local/console.env",
    ]


@pytest.mark.parametrize("host_port", [None, "18474"])
def test_the_console_port_is_published_on_localhost_only(
    compose: dict[str, Any], host_port: str | None
) -> None:
    console = compose["services"]["console"]
    settings = read_environment(service_environment(console), console["command"]).console
    assert settings is not None
    variables = {} if host_port is None else {"CONVEYOR_CONSOLE_PORT": host_port}
    published = [published_port(str(port), variables) for port in console["ports"]]
    assert published == [("127.0.0.1", host_port or str(settings.port), str(settings.port))]
    assert "expose" not in console and "network_mode" not in console


def published_port(spec: str, variables: dict[str, str]) -> tuple[str, str, str]:
    """A short-syntax `ports` entry, interpolated as docker compose does with ${VAR:-default}:
    (host address, host port, container port). An entry without an address publishes on every
    interface of the host, so it has to name one."""
    text = re.sub(r"\$\{(\w+):-([^}]*)\}", lambda m: variables.get(m.group(1)) or m.group(2), spec)
    assert "$" not in text, f"uninterpolated: {spec}"
    parts = text.split(":")
    assert len(parts) == 3, f"{spec}: no host address, so every interface"
    address, host, container = parts
    return address, host, container


def scrape_targets(config: dict[str, Any]) -> set[str]:
    targets = set()
    for job in config["scrape_configs"]:
        for static in job.get("static_configs", []):
            targets.update(static["targets"])
        for dns in job.get("dns_sd_configs", []):
            targets.update(f"{name}:{dns['port']}" for name in dns["names"])
    return targets
