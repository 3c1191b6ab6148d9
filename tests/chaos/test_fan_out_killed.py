"""50 parents fan out into 100 children each while a killer SIGKILLs a random worker about every
second: every parent joins exactly once, with exactly its 100 children's outputs in order, and
no child is created or completed twice."""

from __future__ import annotations

import json
import time

import psycopg
import pytest

from tests.chaos.conftest import RecordCounts, Supervisors
from tests.chaos.load import Killer, event_counts
from tests.helpers import fetch_all, scalar, wait_until

PARENTS = 50
WIDTH = 100
KILLING_SECONDS = 20.0

# Per run: its transitions that completed a stage, or joined it, by kind.
_MOVES = """
SELECT r.id, r.parent_id IS NULL AS is_parent, r.status,
       count(e.id) FILTER (WHERE e.stage = 'split' AND e.to_status = 'SPLIT_WAITING'),
       count(e.id) FILTER (WHERE e.stage IS NULL AND e.to_status = 'SPLIT'),
       count(e.id) FILTER (WHERE e.stage = 'gather' AND e.to_status = 'GATHERED'),
       count(e.id) FILTER (WHERE e.stage = 'square' AND e.to_status = 'DONE')
  FROM conveyor.pipeline_runs r
  LEFT JOIN conveyor.run_events e ON e.run_id = r.id
 GROUP BY r.id
"""


def _submit_parents(url: str, first: int, count: int) -> None:
    with psycopg.connect(url, autocommit=True) as conn:
        for n in range(first, first + count):
            conn.execute(
                "INSERT INTO conveyor.pipeline_runs (pipeline, input, idempotency_key)"
                " VALUES ('fan', %s, %s) ON CONFLICT DO NOTHING",
                (json.dumps({"width": WIDTH, "sleep": 0.05}), f"parent-{n}"),
            )


@pytest.mark.chaos
@pytest.mark.timeout(300)
def test_fan_out_under_worker_sigkills_joins_each_parent_once(
    database_url: str, supervisors: Supervisors, record_counts: RecordCounts
) -> None:
    supervisor = supervisors.start(
        CONVEYOR_PIPELINE="tests.shapes.pipelines:fan",
        CONVEYOR_STAGES="split=2,square=3,gather=2",
        CONVEYOR_LEASE="2",
        CONVEYOR_SWEEP_INTERVAL="0.5",
        CONVEYOR_MAX_RESCUES="10",  # the kills are not the runs' fault
    )
    wait_until(
        lambda: scalar(database_url, "SELECT count(*) FROM conveyor.workers") == 7,
        60,
        "seven registered workers",
    )
    killer = Killer(supervisor.pid, duration=KILLING_SECONDS)
    killer.start()
    # The parents arrive over the first half of the killing window, so kills land on splits,
    # children and joins alike.
    for batch in range(10):
        _submit_parents(database_url, batch * PARENTS // 10, PARENTS // 10)
        time.sleep(1.0)
    killer.join(KILLING_SECONDS + 10)
    assert not killer.is_alive()
    kills = len(killer.killed)
    assert kills >= 0.75 * KILLING_SECONDS, "the killer kept killing"

    wait_until(
        lambda: (
            scalar(
                database_url,
                "SELECT count(*) FROM conveyor.pipeline_runs WHERE parent_id IS NULL"
                " AND status = 'GATHERED'",
            )
            == PARENTS
        ),
        180,
        f"{PARENTS} parents joined and gathered",
    )

    duplicates = lost = 0
    parents = children = 0
    for _run_id, is_parent, status, split, joined, gathered, squared in fetch_all(
        database_url, _MOVES
    ):
        expected = (1, 1, 1, 0) if is_parent else (0, 0, 0, 1)
        moves = (split, joined, gathered, squared)
        duplicates += sum(max(0, got - want) for got, want in zip(moves, expected, strict=True))
        lost += sum(max(0, want - got) for got, want in zip(moves, expected, strict=True))
        lost += status != ("GATHERED" if is_parent else "DONE")
        parents += is_parent
        children += not is_parent
    assert (parents, children) == (PARENTS, PARENTS * WIDTH)
    # No child created twice: exactly WIDTH per parent, indexes 0..WIDTH-1.
    per_parent = fetch_all(
        database_url,
        "SELECT count(*), count(DISTINCT child_index), min(child_index), max(child_index)"
        " FROM conveyor.pipeline_runs WHERE parent_id IS NOT NULL GROUP BY parent_id",
    )
    assert per_parent == [(WIDTH, WIDTH, 0, WIDTH - 1)] * PARENTS
    # Each join saw exactly its own children's outputs, in order.
    squares = [n * n for n in range(WIDTH)]
    for (gathered,) in fetch_all(
        database_url,
        "SELECT outputs -> 'gather' FROM conveyor.pipeline_runs WHERE parent_id IS NULL",
    ):
        assert gathered["indexes"] == list(range(WIDTH))
        assert gathered["squares"] == squares
        assert gathered["failed"] == []
    rescues = scalar(
        database_url,
        "SELECT count(*) FROM conveyor.run_events WHERE error LIKE 'lease expired%%'",
    )
    events = event_counts(supervisor.log())
    record_counts(
        kills=kills,
        restarts=events["worker process started"] - 7,
        parents=parents,
        children=children,
        duplicates=duplicates,
        lost=lost,
        rescues=rescues,
        deadlocks=supervisor.log().count("deadlock detected"),
    )
    assert duplicates == 0
    assert lost == 0
    assert rescues > 0, "kills landed on runs in flight"
    assert supervisor.stop() == 0
