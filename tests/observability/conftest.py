from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.integration.conftest import start_conveyor
from tests.llm_server import FakeLLM
from tests.observability.prom import Prometheus, require_binary


@pytest.fixture
def promtool() -> str:
    return require_binary("promtool")


@pytest.fixture
def start_prometheus(tmp_path: Path) -> Iterator[Callable[..., Prometheus]]:
    """Start a Prometheus scraping the given targets; stopped at teardown."""
    binary = require_binary("prometheus")
    started: list[Prometheus] = []

    def start(targets: list[str], rule_files: list[Path] | None = None) -> Prometheus:
        workdir = tmp_path / f"prometheus-{len(started)}"
        workdir.mkdir()
        server = Prometheus(binary, workdir, targets, rule_files or [])
        started.append(server)
        return server.start()

    yield start
    for server in started:
        server.stop()


@pytest.fixture
def fake_llm() -> Iterator[FakeLLM]:
    """An OpenAI-compatible server on loopback for the agents' model calls."""
    server = FakeLLM()
    yield server
    server.close()


__all__ = ["start_conveyor"]
