"""deploy/Dockerfile: hadolint passes, the rules the manifests rely on hold (exec-form
`conveyor` entrypoint, numeric non-root user, no compiler in the final image), and the build
context .dockerignore lets through is enough to build the package with its SQL."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path
from typing import Any

from tests.deploy.support import (
    ROOT,
    Instruction,
    dockerfile_environment,
    dockerfile_stages,
    of_kind,
    run_tool,
)

DOCKERFILE = ROOT / "deploy" / "Dockerfile"
COMPILERS = re.compile(r"\b(gcc|g\+\+|clang|build-essential|make|cc|[a-z0-9.+-]+-dev)\b")
PRUNED = {".git", ".venv", "node_modules", ".mypy_cache", ".ruff_cache", ".pytest_cache"}


def test_hadolint_passes() -> None:
    result = run_tool("hadolint", "--no-color", str(DOCKERFILE), check=False)
    assert result.returncode == 0 and result.stdout == "", result.stdout + result.stderr


def test_hadolint_finds_what_it_should(tmp_path: Path) -> None:
    bad = tmp_path / "Dockerfile"
    bad.write_text(
        "FROM python:latest\nRUN apt-get update && apt-get install -y gcc\n"
        "RUN pip install requests\nENTRYPOINT conveyor run\n"
    )
    result = run_tool("hadolint", "--no-color", str(bad), check=False)
    assert result.returncode != 0
    for rule in ("DL3007", "DL3008", "DL3013", "DL3025"):
        assert rule in result.stdout, rule


def test_the_image_is_built_in_stages_and_runs_conveyor_as_pid_1_and_non_root() -> None:
    stages = dockerfile_stages(DOCKERFILE)
    assert len(stages) >= 2, "multi-stage: the build stage's tools stay out of the image"
    final = stages[-1]
    base = instruction(final, "FROM")[-1].arguments
    assert "AS" not in base.upper().split()[1:], "the final stage is the last FROM"
    # the base is an ARG defaulting to a slim Python image
    default_base = re.search(r"ARG PYTHON_IMAGE=(\S+)", DOCKERFILE.read_text())
    assert base == "${PYTHON_IMAGE}" and default_base is not None
    assert re.fullmatch(r"python:3\.1[1-9]-slim(-\w+)?", default_base.group(1))
    [user] = instruction(final, "USER")
    uid, _, gid = user.arguments.partition(":")
    assert uid.isdigit() and int(uid) > 0 and gid.isdigit() and int(gid) > 0
    [entrypoint] = instruction(final, "ENTRYPOINT")
    assert json.loads(entrypoint.arguments) == ["conveyor"], "exec form: SIGTERM reaches it"
    [cmd] = instruction(final, "CMD")
    assert json.loads(cmd.arguments) == ["run"]
    keywords = [i.keyword for i in final]
    assert keywords.index("USER") < keywords.index("ENTRYPOINT")
    for run in instruction(final, "RUN"):
        assert not COMPILERS.search(run.arguments), f"a compiler in the final image: {run}"
        assert "apt-get install" not in run.arguments


def test_the_image_environment_matches_the_manifests(
    renderings: dict[str, list[dict[str, Any]]],
) -> None:
    env = dockerfile_environment(DOCKERFILE)
    [config_map] = of_kind(renderings["base"], "ConfigMap")
    for name in ("PROMETHEUS_MULTIPROC_DIR", "CONVEYOR_METRICS_PORT"):
        assert env[name] == config_map["data"][name], name
    text = DOCKERFILE.read_text()
    assert f"EXPOSE {env['CONVEYOR_METRICS_PORT']}" in text
    # the directory exists in the image for a plain `docker run` (the manifests mount over it)
    assert f"mkdir -p {env['PROMETHEUS_MULTIPROC_DIR']}" in text


def test_the_build_context_builds_the_package_with_its_sql(tmp_path: Path) -> None:
    context = tmp_path / "context"
    rules = dockerignore_rules(ROOT / ".dockerignore")
    for path in repository_files():
        relative = path.relative_to(ROOT).as_posix()
        if not ignored(relative, rules):
            (context / relative).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(path, context / relative)
    sent = {p.relative_to(context).as_posix() for p in context.rglob("*") if p.is_file()}
    assert not [p for p in sent if p.startswith(("tests/", ".venv/", ".git/", "deploy/"))]
    assert not [p for p in sent if "__pycache__" in p]
    for copy in instruction(dockerfile_stages(DOCKERFILE)[0], "COPY"):
        for source in copy.arguments.split()[:-1]:
            assert (context / source).exists(), f"COPY {source}: not in the build context"
    # The build stage's `pip install .`, offline: the same setuptools build, no dependencies.
    wheels = tmp_path / "wheels"
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation",
         "--wheel-dir", str(wheels), str(context)],
        check=True, capture_output=True, timeout=240,
    )  # fmt: skip
    [wheel] = wheels.glob("conveyor-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    for sql in (ROOT / "sql").glob("*.sql"):
        assert f"conveyor/sql/{sql.name}" in names
    entry_points = next(n for n in names if n.endswith("entry_points.txt"))
    assert "conveyor = conveyor.cli:main" in zipfile.ZipFile(wheel).read(entry_points).decode()


def instruction(stage: list[Instruction], keyword: str) -> list[Instruction]:
    return [i for i in stage if i.keyword == keyword]


def repository_files() -> list[Path]:
    found = []
    for path in ROOT.iterdir():
        if path.name in PRUNED:
            continue
        if path.is_file():
            found.append(path)
        else:
            found.extend(p for p in path.rglob("*") if p.is_file() and PRUNED.isdisjoint(p.parts))
    return found


def dockerignore_rules(path: Path) -> list[tuple[re.Pattern[str], bool]]:
    """(pattern, exception) pairs in file order, as Docker reads .dockerignore."""
    rules = []
    for line in path.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        exception = line.startswith("!")
        pattern = line.lstrip("!").strip().strip("/")
        regex = ""
        for part in re.split(r"(\*\*/?|\*|\?)", pattern):
            if part in ("**", "**/"):
                regex += "(.*/)?" if part == "**/" else ".*"
            elif part == "*":
                regex += "[^/]*"
            elif part == "?":
                regex += "[^/]"
            else:
                regex += re.escape(part)
        rules.append((re.compile(regex + "$"), exception))
    return rules


def ignored(relative: str, rules: list[tuple[re.Pattern[str], bool]]) -> bool:
    """The last rule matching the path or one of its parent directories decides."""
    parts = relative.split("/")
    prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    result = False
    for pattern, exception in rules:
        if any(pattern.match(prefix) for prefix in prefixes):
            result = not exception
    return result
