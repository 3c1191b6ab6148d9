"""benchmarks.versus works: a tiny comparison of HEAD's code with the tree's prints a row per
figure for both, with their ratio, and leaves no worktree or database behind. It runs in a
repository of its own, a copy of the code committed once, so that it needs no history of this
checkout. No speed is asserted."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import psycopg
import pytest

from tests.helpers import ROOT, PgServer


@pytest.fixture(scope="module")
def repository(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The code the benchmarks run, copied and committed into a repository of its own."""
    path = tmp_path_factory.mktemp("versus") / "repo"
    for part in ("conveyor", "benchmarks", "sql"):
        shutil.copytree(ROOT / part, path / part, ignore=shutil.ignore_patterns("__pycache__"))
    for command in (
        ["init", "--quiet"],
        ["add", "."],
        ["-c", "user.name=t", "-c", "user.email=t@t", "commit", "--quiet", "-m", "code"],
    ):
        _git(path, *command)
    return path


def _git(repository: Path, *args: str) -> str:
    done = subprocess.run(["git", *args], cwd=repository, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


def _versus(pg_server: PgServer, repository: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CONVEYOR_")}
    env.update({"CONVEYOR_DATABASE_URL": pg_server.admin_url, "PYTHONPATH": str(repository)})
    return subprocess.run(
        [sys.executable, "-m", "benchmarks.versus", *args],
        env=env,
        cwd=repository,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_a_tiny_comparison_prints_both_trees_figures_and_leaves_nothing(
    pg_server: PgServer, repository: Path
) -> None:
    worktrees = _git(repository, "worktree", "list")
    done = _versus(pg_server, repository, "HEAD", "--tiny", "--only", "a,c")
    assert done.returncode == 0, done.stderr

    head = _git(repository, "rev-parse", "HEAD")
    assert f"before: HEAD ({head[:10]}); after: this tree ({repository})" in done.stdout
    number = r"(?:[\d,]+(?:\.\d+)?|n/a)"  # n/a: a tiny backlog ran dry before it was counted
    for figure, what in [
        (r"\(a\) one worker, one stage", "runs/s"),
        (r"\(a\), observer off", "backends CPU us/run"),
        (r"\(c\) commit -> handler start", "p99 ms"),
    ]:
        row = rf"^\| {figure}: {what} +\| {number} +\| {number} +\| (\d+\.\d\d|n/a) \("
        assert re.search(row, done.stdout, re.M), (figure, done.stdout)
    assert "(d)" not in done.stdout  # only what was asked for
    # ABBA: each figure measured twice from each tree
    assert done.stderr.count("measuring c from") == 4

    assert _git(repository, "worktree", "list") == worktrees
    with psycopg.connect(pg_server.admin_url, autocommit=True) as conn:
        left = conn.execute(
            "SELECT datname FROM pg_database WHERE datname LIKE 'conveyor_bench_%'"
        ).fetchall()
    assert left == []


def test_a_bad_reference_or_letter_is_a_clear_error(pg_server: PgServer, repository: Path) -> None:
    unknown = _versus(pg_server, repository, "no-such-ref-anywhere", "--tiny", "--only", "c")
    assert unknown.returncode == 1
    assert "no commit named 'no-such-ref-anywhere'" in unknown.stderr
    assert "Traceback" not in unknown.stderr

    letter = _versus(pg_server, repository, "HEAD", "--only", "a,z")
    assert letter.returncode == 2
    assert "--only takes letters among" in letter.stderr and "'z'" in letter.stderr


def test_the_worktree_runs_its_own_statements(repository: Path) -> None:
    """Each tree's conveyor reads its own sql/, whatever an editable install maps it to."""
    probe = (
        "import subprocess, sys\n"
        "from benchmarks import versus\n"
        "with versus.worktree('HEAD') as (path, _):\n"
        "    found = subprocess.run([sys.executable, '-c', 'import conveyor.queries as q;"
        ' print(q.resources.files("conveyor.sql"))\'], cwd=path,'
        " env={'PYTHONPATH': str(path)}, capture_output=True, text=True)\n"
        "    print(path, found.stdout.strip(), found.stderr.strip())\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", probe],
        cwd=repository,
        env={**os.environ, "PYTHONPATH": str(repository)},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    tree, statements = done.stdout.split()[:2]
    assert Path(statements).is_relative_to(tree), (tree, statements)  # not the installed tree's
