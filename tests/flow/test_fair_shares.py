"""Fair shares: a stage grouped by tenant interleaves its claims between groups, and holds each
group to its cap, whatever their backlogs."""

from __future__ import annotations

import time
from collections.abc import Callable

from tests.helpers import ConveyorProcess, fetch_all, scalar


def test_ten_runs_of_b_are_not_starved_by_ten_thousand_of_a(
    database_url: str, start_conveyor: Callable[..., ConveyorProcess]
) -> None:
    """10,000 runs of tenant A queued before 10 of tenant B, two per tenant at once: B's runs
    are all DONE before A's backlog has moved 200, and neither tenant ever had more than two
    runs in its handlers at once."""
    fetch_all(
        database_url,
        "INSERT INTO conveyor.pipeline_runs (pipeline, input, run_after)"
        " SELECT 'fair', '{\"tenant\": \"A\"}', now() - interval '1 hour' + n * interval '1 ms'"
        "   FROM generate_series(1, 10000) n RETURNING 1",
    )
    fetch_all(
        database_url,
        "INSERT INTO conveyor.pipeline_runs (pipeline, input)"
        " SELECT 'fair', '{\"tenant\": \"B\"}' FROM generate_series(1, 10) RETURNING 1",
    )
    start_conveyor(
        "worker",
        "--stage",
        "work",
        CONVEYOR_PIPELINE="tests.flow.pipelines:fair",
        CONVEYOR_LOG_LEVEL="warning",
    )
    deadline = time.monotonic() + 90
    b_done = 0
    while time.monotonic() < deadline:
        b_done = scalar(
            database_url,
            "SELECT count(*) FROM conveyor.pipeline_runs"
            " WHERE input->>'tenant' = 'B' AND status = 'DONE'",
        )
        if b_done == 10:
            break
        time.sleep(0.1)
    a_done = scalar(
        database_url,
        "SELECT count(*) FROM conveyor.pipeline_runs WHERE input->>'tenant' = 'A'"
        " AND status = 'DONE'",
    )
    assert b_done == 10
    assert a_done < 200, a_done
    most_at_once = fetch_all(
        database_url,
        "SELECT r.input->>'tenant', max(overlapping) FROM ("
        "  SELECT e.run_id, (SELECT count(*) FROM conveyor.run_events o"
        "                     JOIN conveyor.pipeline_runs ro ON ro.id = o.run_id"
        "                    WHERE ro.input->>'tenant' = r.input->>'tenant'"
        "                      AND o.started_at <= e.started_at"
        "                      AND o.started_at + o.duration > e.started_at) AS overlapping"
        "    FROM conveyor.run_events e JOIN conveyor.pipeline_runs r ON r.id = e.run_id"
        ") counted JOIN conveyor.pipeline_runs r ON r.id = counted.run_id"
        " GROUP BY 1 ORDER BY 1",
    )
    assert most_at_once == [("A", 2), ("B", 2)]
