"""Liveness shared between forked workers and their supervisor, without a query or a pipe.

One shared-memory slot per worker process: when its loop last turned and whether its LISTEN
connection is up. The supervisor's /healthz and /readyz read it; a probe costs no query.
"""

from __future__ import annotations

import multiprocessing
import time
from dataclasses import dataclass
from typing import Any


class LivenessBoard:
    def __init__(self, slots: int) -> None:
        # Created before fork: the children write into the same memory the supervisor reads.
        self._values: Any = multiprocessing.RawArray("d", slots * 2)
        self.slots = slots

    def slot(self, index: int) -> LivenessSlot:
        return LivenessSlot(self, index)

    def last_tick(self, index: int) -> float:
        return float(self._values[index * 2])

    def listening(self, index: int) -> bool:
        return bool(self._values[index * 2 + 1])

    def reset(self, index: int) -> None:
        self._values[index * 2] = time.time()  # a fresh child gets its start-up time as grace
        self._values[index * 2 + 1] = 0.0


@dataclass(frozen=True)
class LivenessSlot:
    board: LivenessBoard
    index: int

    def tick(self) -> None:
        self.board._values[self.index * 2] = time.time()

    def set_listening(self, listening: bool) -> None:
        self.board._values[self.index * 2 + 1] = 1.0 if listening else 0.0
