"""What a chaos scenario proves afterwards, read from pipeline_runs and run_events only.

For the test pipeline `chain` (one -> two -> three): a run that ends DONE must have exactly one
completed transition per stage; a run that ends FAILED in stage one must have none. Anything
beyond that is a duplicate, anything missing (a run not in its expected terminal status, a stage
completion that never happened) is lost.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Collection
from dataclasses import dataclass
from typing import Any
from uuid import UUID

from tests.helpers import fetch_all

COMPLETED = {"one": "ONE_DONE", "two": "TWO_DONE", "three": "DONE"}
WORKING = ("ONE_RUNNING", "TWO_RUNNING", "THREE_RUNNING")

_PER_RUN = """
SELECT r.id, r.status, r.rescues,
       (r.input->>'n')::int AS n,
       (r.outputs->'three'->>'seen')::int AS seen,
       count(e.id) FILTER (WHERE e.stage = 'one' AND e.to_status = 'ONE_DONE') AS one,
       count(e.id) FILTER (WHERE e.stage = 'two' AND e.to_status = 'TWO_DONE') AS two,
       count(e.id) FILTER (WHERE e.stage = 'three' AND e.to_status = 'DONE') AS three
  FROM conveyor.pipeline_runs r
  LEFT JOIN conveyor.run_events e ON e.run_id = r.id
 GROUP BY r.id
"""

_EVENT_KINDS = """
SELECT count(*) FILTER (WHERE error LIKE 'lease expired%%'),
       count(*) FILTER (WHERE error LIKE 'released:%%')
  FROM conveyor.run_events
"""


@dataclass(frozen=True)
class Audit:
    runs: int
    statuses: dict[str, int]
    duplicates: int  # completed transitions beyond the one expected per run and stage
    lost: int  # runs off their expected terminal status + expected completions that are missing
    mismatched: int  # DONE runs whose final output does not carry their own input
    rescues: int  # run_events rows written by a rescue of an expired lease
    released: int  # run_events rows written by a release at shutdown
    max_rescues_of_a_run: int

    def counts(self) -> dict[str, Any]:
        return {
            "runs": self.runs,
            "duplicates": self.duplicates,
            "lost": self.lost,
            "rescues": self.rescues,
            "released": self.released,
            "max_rescues_of_a_run": self.max_rescues_of_a_run,
        }


def audit(url: str, *, failed: Collection[UUID] = ()) -> Audit:
    """Every run is expected DONE, except those in `failed` (expected FAILED in stage one)."""
    rows = fetch_all(url, _PER_RUN)
    [(rescues, released)] = fetch_all(url, _EVENT_KINDS)
    statuses: Counter[str] = Counter()
    duplicates = lost = mismatched = max_rescues = 0
    for run_id, status, run_rescues, n, seen, *completions in rows:
        statuses[status] += 1
        max_rescues = max(max_rescues, run_rescues)
        expected_status = "FAILED" if run_id in failed else "DONE"
        expected_each = 1 if expected_status == "DONE" else 0
        if status != expected_status:
            lost += 1
        for count in completions:
            duplicates += max(0, count - expected_each)
            lost += max(0, expected_each - count)
        if status == "DONE" and seen != n:
            mismatched += 1
    return Audit(
        runs=len(rows),
        statuses=dict(statuses),
        duplicates=duplicates,
        lost=lost,
        mismatched=mismatched,
        rescues=rescues,
        released=released,
        max_rescues_of_a_run=max_rescues,
    )


def assert_each_once(result: Audit, runs: int, *, failed: int = 0) -> None:
    """Nothing lost, nothing done twice."""
    expected = {"DONE": runs - failed, **({"FAILED": failed} if failed else {})}
    assert result.runs == runs, result
    assert result.statuses == expected, result
    assert result.duplicates == 0, result
    assert result.lost == 0, result
    assert result.mismatched == 0, result
