from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.helpers import ConveyorProcess, conveyor_env


@pytest.fixture
def start_conveyor(database_url: str, tmp_path: Path) -> Iterator[Callable[..., ConveyorProcess]]:
    """Start `conveyor ARGS` against the test database; every process is stopped at teardown."""
    started: list[ConveyorProcess] = []

    def start(*args: str, **env: str) -> ConveyorProcess:
        name = f"{len(started)}-{'-'.join(args)}".replace("/", "_")
        process = ConveyorProcess(
            list(args), conveyor_env(database_url, **env), tmp_path / f"{name}.log"
        )
        started.append(process)
        return process

    yield start
    for process in started:
        process.stop(timeout=30)
