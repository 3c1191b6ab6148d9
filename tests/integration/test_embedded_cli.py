"""`conveyor embedded url|stop` as an operator runs them: quiet unless something is wrong."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from conveyor import _embedded
from tests.helpers import ROOT


@pytest.fixture
def data_dir() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="conveyor-embedded-"))
    os.chmod(path, 0o755)  # as root the wheel runs the server as an unprivileged user
    try:
        yield path
    finally:
        _embedded.stop(path, mode="immediate")
        shutil.rmtree(path, ignore_errors=True)


def _conveyor(data_dir: Path, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith(("CONVEYOR_", "XDG_RUNTIME"))}
    return subprocess.run(
        [sys.executable, "-m", "conveyor", "embedded", *args],
        env={**base, "CONVEYOR_DATA_DIR": str(data_dir), "PYTHONPATH": str(ROOT), **env},
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.mark.timeout(60)
def test_stop_without_a_server_says_so_and_nothing_else(data_dir: Path) -> None:
    # XDG_RUNTIME_DIR unset, as in containers and root shells: platformdirs warned about it.
    result = _conveyor(data_dir, "stop")
    assert (result.returncode, result.stdout, result.stderr) == (0, "not running\n", "")


@pytest.mark.timeout(180)
def test_start_then_stop_print_only_their_answers(data_dir: Path) -> None:
    started = _conveyor(data_dir, "url")
    assert started.returncode == 0 and started.stderr == ""
    assert started.stdout.startswith("postgresql://")
    stopped = _conveyor(data_dir, "stop")
    assert (stopped.returncode, stopped.stdout, stopped.stderr) == (0, "stopped\n", "")
    assert not (data_dir / "pgdata" / "postmaster.pid").exists()


@pytest.mark.timeout(60)
def test_an_unusable_runtime_directory_is_still_reported(data_dir: Path) -> None:
    runtime = data_dir / "runtime"
    runtime.mkdir(mode=0o755)  # the XDG spec wants 0700: a real misconfiguration
    result = _conveyor(data_dir, "stop", XDG_RUNTIME_DIR=str(runtime))
    assert result.returncode == 0 and result.stdout == "not running\n"
    assert f"XDG_RUNTIME_DIR {runtime} has mode 0755" in result.stderr
