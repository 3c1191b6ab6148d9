from __future__ import annotations

from tests.integration.conftest import start_conveyor

__all__ = ["start_conveyor"]
