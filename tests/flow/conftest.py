from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.integration.conftest import start_conveyor
from tests.llm_server import FakeLLM

__all__ = ["start_conveyor"]


@pytest.fixture
def model_server() -> Iterator[FakeLLM]:
    server = FakeLLM()
    yield server
    server.close()
