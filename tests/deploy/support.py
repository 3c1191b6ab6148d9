"""What the deployment tests share: the tools the test extras install, rendered manifests, and
the product's own view of a command line and an environment (click commands, Settings)."""

from __future__ import annotations

import re
import subprocess
import sys
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import click
import yaml

from conveyor import queries
from conveyor.cli import cli
from conveyor.commands.context import App
from conveyor.console.settings import ConsoleSettings
from conveyor.pipeline import Pipeline, Stage, load_pipeline
from conveyor.settings import Settings

ROOT = Path(__file__).resolve().parents[2]

# Environment variables the image or the manifests set that conveyor itself does not read.
# PROMETHEUS_MULTIPROC_DIR is read by prometheus-client when conveyor.metrics is imported.
OTHER_PROGRAMS_VARIABLES = {
    "PROMETHEUS_MULTIPROC_DIR",
    "PATH",
    "PYTHONUNBUFFERED",
    "PYTHONDONTWRITEBYTECODE",
}

# What a secretKeyRef stands for when the tests read a manifest's environment: a URL for a
# *_URL variable, a plain word (as a user name or a password would be) for anything else.
SECRET_PLACEHOLDER_URL = "postgresql://conveyor:from-secret@postgres.example:5432/conveyor"
SECRET_PLACEHOLDER_WORD = "from-secret"


def tool(name: str) -> Path:
    """A command installed into this virtualenv by the test extras (never the machine's own)."""
    path = Path(sys.executable).parent / name
    assert path.exists(), f"{name} is missing: `pip install -e '.[test]'` installs it ({path})"
    return path


def run_tool(name: str, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(
        [str(tool(name)), *args], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    if check:
        assert result.returncode == 0, f"{name} {' '.join(args)}:\n{result.stdout}{result.stderr}"
    return result


def kustomize(directory: str) -> list[dict[str, Any]]:
    """`kubectl kustomize DIR`, parsed."""
    output = run_tool("kubectl", "kustomize", directory).stdout
    return [doc for doc in yaml.safe_load_all(output) if doc]


def of_kind(objects: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [o for o in objects if o["kind"] == kind]


def named(objects: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    found = [o for o in of_kind(objects, kind) if o["metadata"]["name"] == name]
    assert len(found) == 1, f"expected one {kind} {name}, found {len(found)}"
    return found[0]


def container_environment(
    objects: list[dict[str, Any]], container: dict[str, Any]
) -> dict[str, str]:
    """The environment a container starts with: envFrom ConfigMaps, then env (which wins).
    A secretKeyRef becomes a placeholder (a URL for a *_URL variable), or nothing when it is
    optional (as when the key is absent from the Secret)."""
    env: dict[str, str] = {}
    for source in container.get("envFrom", []):
        config_map = named(objects, "ConfigMap", source["configMapRef"]["name"])
        env.update(config_map["data"])
    for item in container.get("env", []):
        if "value" in item:
            env[item["name"]] = item["value"]
            continue
        secret = item["valueFrom"]["secretKeyRef"]
        if not secret.get("optional"):
            url = item["name"].endswith("_URL")
            env[item["name"]] = SECRET_PLACEHOLDER_URL if url else SECRET_PLACEHOLDER_WORD
    return env


# -- the CLI ------------------------------------------------------------------------------


def parse_command(args: list[str]) -> str:
    """Parse a container's arguments with the click commands of conveyor/cli.py, without
    running them; return the command's name. A wrong command or option raises UsageError."""
    assert args, "no command: the image's CMD would be used"
    root = click.Context(cli, info_name="conveyor")
    command = cli.get_command(root, args[0])
    if command is None:
        raise click.UsageError(f"no such command {args[0]!r}")
    command.make_context(args[0], list(args[1:]), parent=root)
    return args[0]


def command_options(args: list[str]) -> dict[str, Any]:
    """The options click parses from a container's arguments, by parameter name."""
    root = click.Context(cli, info_name="conveyor")
    command = cli.get_command(root, parse_command(args))
    assert command is not None
    return dict(command.make_context(args[0], list(args[1:]), parent=root).params)


# -- Settings -----------------------------------------------------------------------------


class _RecordingEnvironment(Mapping[str, str]):
    """An environment that notes which names Settings.from_env asks for."""

    def __init__(self, env: Mapping[str, str]) -> None:
        self._env = dict(env)
        self.asked: set[str] = set()

    def __getitem__(self, key: str) -> str:
        self.asked.add(key)
        return self._env[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._env)

    def __len__(self) -> int:
        return len(self._env)


@dataclass
class Reading:
    """What conveyor makes of an environment."""

    settings: Settings
    pipeline: Pipeline
    plan: dict[str, int]  # processes per stage, as `conveyor run` would start them
    ignored: list[str] = field(default_factory=list)  # CONVEYOR_* names conveyor does not use
    console: ConsoleSettings | None = None  # for `conveyor console`, its own settings


def read_environment(env: Mapping[str, str], args: list[str] | None = None) -> Reading:
    """Settings.from_env, the pipeline with its per-stage overrides, and the stage plan, exactly
    as the CLI builds them; raises ConfigError/PipelineError where `conveyor` would exit 2.
    Given the container's arguments of a `conveyor console`, also ConsoleSettings.from_env with
    that command's options, which reads the CONVEYOR_CONSOLE_* variables (for any other command
    they are ignored, and reported so).
    A CONVEYOR_* variable counts as used when Settings asks for it by name or when removing it
    changes the Settings (the per-stage CONVEYOR_<STAGE>_* family)."""
    recording = _RecordingEnvironment(env)
    settings = Settings.from_env(recording)
    app = App(settings)
    plan = app.check_stages()
    console = None
    if args is not None and parse_command(args) == "console":
        options = command_options(args)
        console = ConsoleSettings.from_env(
            recording,
            bind=options["bind"],
            allow_actions=options["allow_actions"],
            no_auth=options["no_auth"],
        )
    ignored = []
    for name in env:
        if name in recording.asked or name in OTHER_PROGRAMS_VARIABLES:
            continue
        without = {k: v for k, v in env.items() if k != name}
        if not name.startswith("CONVEYOR_") or Settings.from_env(without) == settings:
            ignored.append(name)
    return Reading(settings, app.pipeline, plan, ignored, console)


# -- the KEDA query -----------------------------------------------------------------------


def sql_literal(value: str) -> str:
    return "'" + value.replace("'", "''") + "'"


def stage_load_query(schema: str, pipeline: Pipeline, stage: Stage) -> str:
    """sql/queries.sql's `stage_load` with literals in place of its parameters."""
    statement = queries.load(schema)["stage_load"]
    values = {"pipeline": pipeline.name, "consumes": stage.consumes, "working": stage.working}
    for name, value in values.items():
        statement = statement.replace(f"%({name})s", sql_literal(value))
    assert "%(" not in statement, f"stage_load has a parameter the tests do not know: {statement}"
    return statement


def normalized_sql(text: str) -> str:
    return re.sub(r"\s+", " ", text).strip().rstrip(";").strip()


def default_pipeline() -> Pipeline:
    return load_pipeline(Settings().pipeline)


# -- env files and the Dockerfile ---------------------------------------------------------


def read_env_file(path: Path) -> dict[str, str]:
    """KEY=VALUE lines as docker compose reads them (no quoting is used in ours)."""
    values = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        key, sep, value = line.partition("=")
        assert sep, f"{path}: not KEY=VALUE: {line!r}"
        values[key.strip()] = value.strip()
    return values


@dataclass
class Instruction:
    keyword: str
    arguments: str


def dockerfile_stages(path: Path) -> list[list[Instruction]]:
    """Instructions grouped by build stage (a new stage at every FROM)."""
    text = re.sub(r"\\\n", " ", path.read_text())
    stages: list[list[Instruction]] = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        keyword, _, arguments = line.partition(" ")
        instruction = Instruction(keyword.upper(), arguments.strip())
        if instruction.keyword == "FROM":
            stages.append([])
        if stages:
            stages[-1].append(instruction)
    return stages


def dockerfile_environment(path: Path) -> dict[str, str]:
    """ENV of the final stage (KEY=VALUE form)."""
    env: dict[str, str] = {}
    for instruction in dockerfile_stages(path)[-1]:
        if instruction.keyword == "ENV":
            for pair in instruction.arguments.split():
                key, _, value = pair.partition("=")
                env[key] = value
    return env
