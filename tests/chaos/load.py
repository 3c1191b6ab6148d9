"""Load and faults for the chaos scenarios: submitting runs, a worker killer, the processes'
state from /proc, the supervisor's JSON log, and queries that survive a database outage."""

from __future__ import annotations

import json
import os
import random
import signal
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any
from uuid import UUID

import psycopg

from benchmarks.procstat import children as children_of
from tests.helpers import scalar

CHAIN = "tests.pipelines:chain"

_SUBMIT = """
INSERT INTO conveyor.pipeline_runs (pipeline, input, idempotency_key)
SELECT 'chain', jsonb_build_object('n', n) || %(extra)s::jsonb, 'n-' || n
  FROM generate_series(%(first)s::int, %(last)s::int) n
    ON CONFLICT (pipeline, idempotency_key) WHERE idempotency_key IS NOT NULL DO NOTHING
RETURNING id
"""


def submit(url: str, count: int, *, first: int = 1, **extra: Any) -> list[UUID]:
    """Insert runs n = first .. first+count-1 with `extra` merged into each input. The
    idempotency key makes a retried insert (after a lost connection) harmless."""
    with psycopg.connect(url, autocommit=True) as conn:
        rows = conn.execute(
            _SUBMIT, {"extra": json.dumps(extra), "first": first, "last": first + count - 1}
        ).fetchall()
    return [row[0] for row in rows]


def count_status(url: str, *statuses: str) -> int | None:
    """Runs in any of `statuses`, or None while the database cannot be reached."""
    try:
        return int(
            scalar(
                url,
                "SELECT count(*) FROM conveyor.pipeline_runs WHERE status = ANY(%s)",
                (list(statuses),),
            )
        )
    except psycopg.OperationalError:
        return None


def all_in(url: str, runs: int, *statuses: str) -> bool:
    return count_status(url, *statuses) == runs


# -- processes -------------------------------------------------------------------------------


def process_state(pid: int) -> str | None:
    """The state letter from /proc (R, S, Z, ...), or None once the process is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat[stat.rindex(")") + 2]


def is_running(pid: int) -> bool:
    """Alive and not a zombie (an orphan's zombie may never be reaped in a container)."""
    return process_state(pid) not in (None, "Z", "X")


# The chaos supervisors run two processes per stage plus their maintenance process.
CHILDREN = 3 * 2 + 1


def live_children(pid: int) -> list[int]:
    return [child for child in children_of(pid) if is_running(child)]


class Killer(threading.Thread):
    """SIGKILLs a random live child of `parent` every `interval` seconds for `duration`."""

    def __init__(
        self, parent: int, *, duration: float, interval: tuple[float, float] = (0.5, 1.0)
    ) -> None:
        super().__init__(name="killer", daemon=True)
        self.parent = parent
        self.duration = duration
        self.interval = interval
        self.killed: list[int] = []
        self._halt = threading.Event()

    def run(self) -> None:
        deadline = time.monotonic() + self.duration
        while not self._halt.wait(random.uniform(*self.interval)):
            if time.monotonic() > deadline:
                return
            candidates = [pid for pid in live_children(self.parent) if pid not in self.killed]
            if not candidates:
                continue
            victim = random.choice(candidates)
            try:
                os.kill(victim, signal.SIGKILL)
            except ProcessLookupError:
                continue
            self.killed.append(victim)

    def stop(self) -> None:
        self._halt.set()


class Feeder(threading.Thread):
    """Submits `total` runs in batches of `batch` every `interval` seconds."""

    def __init__(self, url: str, *, total: int, batch: int, interval: float, **extra: Any) -> None:
        super().__init__(name="feeder", daemon=True)
        self.url = url
        self.total = total
        self.batch = batch
        self.interval = interval
        self.extra = extra
        self.submitted = 0
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            while self.submitted < self.total:
                started = time.monotonic()
                count = min(self.batch, self.total - self.submitted)
                submit(self.url, count, first=self.submitted + 1, **self.extra)
                self.submitted += count
                time.sleep(max(0.0, self.interval - (time.monotonic() - started)))
        except BaseException as exc:  # reported by the test after join()
            self.error = exc


# -- the supervisor's log ---------------------------------------------------------------------


def log_events(text: str) -> list[dict[str, Any]]:
    """The events of a conveyor JSON log. Every line must be exactly one JSON object: the
    supervisor and its workers share stdout, and a merged or torn line would be lost to a
    log collector (and would make the counts below wrong)."""
    lines = text.split("\n")[:-1]  # the last piece is empty, or a line still being written
    events = []
    for number, line in enumerate(lines, 1):
        try:
            event = json.loads(line)
        except json.JSONDecodeError:
            raise AssertionError(f"log line {number} is not one JSON object: {line!r}") from None
        assert isinstance(event, dict), f"log line {number} is not an object: {line!r}"
        events.append(event)
    return events


def event_counts(text: str) -> Counter[str]:
    return Counter(str(event.get("event")) for event in log_events(text))
