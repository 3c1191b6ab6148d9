"""Fan-out and join with real `conveyor run` processes: children created once with the parent's
completion, the join in order, each child-failure policy, a cancel that reaches the children,
and a child inserted by hand."""

from __future__ import annotations

import json
from collections.abc import Callable

import psycopg
import pytest

from tests.helpers import ConveyorProcess, conveyor_command, fetch_all, scalar, wait_until

Start = Callable[..., ConveyorProcess]
FAN = "tests.shapes.pipelines:fan"


def _parent(url: str, pipeline: str, **run_input: object) -> str:
    with psycopg.connect(url, autocommit=True) as conn:
        row = conn.execute(
            "INSERT INTO conveyor.pipeline_runs (pipeline, input) VALUES (%s, %s) RETURNING id",
            (pipeline, json.dumps(run_input)),
        ).fetchone()
    assert row is not None
    return str(row[0])


def _run(url: str, run_id: str) -> tuple[str, dict[str, object], str | None]:
    status, outputs, error = fetch_all(
        url,
        "SELECT status, outputs, last_error FROM conveyor.pipeline_runs WHERE id = %s",
        (run_id,),
    )[0]
    return str(status), outputs, error


def _status(url: str, run_id: str) -> str:
    return _run(url, run_id)[0]


def _children(url: str, parent: str) -> list[tuple[int, str, str | None]]:
    rows = fetch_all(
        url,
        "SELECT child_index, status, last_error FROM conveyor.pipeline_runs"
        " WHERE parent_id = %s ORDER BY child_index",
        (parent,),
    )
    return [(int(index), str(status), error) for index, status, error in rows]


def _parent_moves(url: str, parent: str) -> list[tuple[str | None, str, str]]:
    rows = fetch_all(
        url,
        "SELECT stage, from_status, to_status FROM conveyor.run_events"
        " WHERE run_id = %s AND (duration IS NOT NULL OR stage IS NULL) ORDER BY id",
        (parent,),
    )
    return [(stage, str(start), str(end)) for stage, start, end in rows]


def test_children_are_created_with_the_parent_and_joined_in_order(
    database_url: str, start_conveyor: Start
) -> None:
    start_conveyor("run", CONVEYOR_PIPELINE=FAN)
    observer = psycopg.connect(database_url, autocommit=True)
    observer.execute("LISTEN pipeline_events")
    wide = _parent(database_url, "fan", width=40)
    empty = _parent(database_url, "fan", width=0)
    wait_until(lambda: _status(database_url, wide) == "GATHERED", 60, "the wide parent joined")
    wait_until(lambda: _status(database_url, empty) == "GATHERED", 60, "the empty one on")

    # Children are ordinary runs on the observer channel: each inserted at PART, and ended.
    with observer:
        seen = [json.loads(n.payload) for n in observer.notifies(timeout=2)]
    child_ids = {
        str(row[0])
        for row in fetch_all(
            database_url, "SELECT id FROM conveyor.pipeline_runs WHERE parent_id = %s", (wide,)
        )
    }
    inserted = {e["id"] for e in seen if e["operation"] == "INSERT" and e["status"] == "PART"}
    assert inserted == child_ids
    assert {e["id"] for e in seen if e["status"] == "DONE"} == child_ids
    assert [e["status"] for e in seen if e["id"] == wide] == [
        "NEW", "SPLIT_RUNNING", "SPLIT_WAITING", "SPLIT", "GATHER_RUNNING", "GATHERED",
    ]  # fmt: skip

    status, outputs, error = _run(database_url, wide)
    assert (status, error) == ("GATHERED", None)
    assert outputs["split"] == {"width": 40}
    assert outputs["gather"] == {
        "indexes": list(range(40)),
        "squares": [n * n for n in range(40)],
        "failed": [],
        "errors": [],
    }
    assert _children(database_url, wide) == [(n, "DONE", None) for n in range(40)]
    # Each child ran its stage once; the parent waited, joined once, and gathered once.
    assert (
        scalar(
            database_url,
            "SELECT count(*) FROM conveyor.run_events e JOIN conveyor.pipeline_runs c"
            " ON c.id = e.run_id WHERE c.parent_id = %s AND e.stage = 'square'",
            (wide,),
        )
        == 40
    )
    assert _parent_moves(database_url, wide) == [
        ("split", "NEW", "SPLIT_WAITING"),
        (None, "SPLIT_WAITING", "SPLIT"),
        ("gather", "SPLIT", "GATHERED"),
    ]
    # A fan-out of no children moves the run on at once, and its join sees none.
    assert _run(database_url, empty)[1]["gather"] == {
        "indexes": [],
        "squares": [],
        "failed": [],
        "errors": [],
    }
    assert _children(database_url, empty) == []
    assert (
        scalar(
            database_url,
            "SELECT children_pending FROM conveyor.pipeline_runs WHERE id = %s",
            (wide,),
        )
        == 0
    )

    # `conveyor show` lists a parent's children, and names a child's parent.
    shown = conveyor_command(database_url, "show", wide, CONVEYOR_PIPELINE=FAN)
    assert shown.returncode == 0, shown.stderr
    assert "children  40 (DONE 40)" in shown.stdout
    first_child = str(
        scalar(
            database_url,
            "SELECT id FROM conveyor.pipeline_runs WHERE parent_id = %s AND child_index = 0",
            (wide,),
        )
    )
    assert f"       0  {first_child}  DONE" in shown.stdout
    as_json = conveyor_command(database_url, "show", "--json", wide, CONVEYOR_PIPELINE=FAN)
    children = json.loads(as_json.stdout)["children"]
    assert children["total"] == 40 and children["by_status"] == {"DONE": 40}
    assert [c["index"] for c in children["first"]] == list(range(40))
    child = conveyor_command(database_url, "show", first_child, CONVEYOR_PIPELINE=FAN)
    assert f"parent    {wide}  (child 0)" in child.stdout


def test_a_failing_child_fails_its_parent_and_cancels_its_siblings(
    database_url: str, start_conveyor: Start
) -> None:
    start_conveyor("run", CONVEYOR_PIPELINE=FAN)
    # Child 0 fails at once; its 29 siblings would run for a minute (20 in flight, 9 waiting).
    parent = _parent(database_url, "fan", width=30, fail=[0], sleep=60)
    wait_until(lambda: _status(database_url, parent) == "FAILED", 60, "the parent failed")
    _, outputs, error = _run(database_url, parent)
    assert error is not None and error.startswith("child 0 (run ")
    assert "ended FAILED" in error and "child 0 refuses" in error
    assert "gather" not in outputs  # the join never ran
    wait_until(
        lambda: (
            all(status != "PART" for _, status, _ in _children(database_url, parent))
            and scalar(
                database_url,
                "SELECT count(*) FROM conveyor.pipeline_runs WHERE parent_id = %s"
                " AND finished_at IS NULL",
                (parent,),
            )
            == 0
        ),
        30,
        "every sibling ended",
    )
    children = _children(database_url, parent)
    assert children[0][1] == "FAILED"
    assert [status for _, status, _ in children[1:]] == ["CANCELLED"] * 29
    assert all(
        err == f"cancelled: its parent run {parent} ended FAILED" for _, _, err in children[1:]
    )
    # The siblings that were running are interrupted, not completed late.
    assert (
        scalar(
            database_url,
            "SELECT count(*) FROM conveyor.run_events e JOIN conveyor.pipeline_runs c"
            " ON c.id = e.run_id WHERE c.parent_id = %s AND e.to_status = 'DONE'",
            (parent,),
        )
        == 0
    )


def test_under_the_join_policy_the_join_sees_the_failures(
    database_url: str, start_conveyor: Start
) -> None:
    start_conveyor("run", CONVEYOR_PIPELINE="tests.shapes.pipelines:fan_join")
    parent = _parent(database_url, "fan_join", width=6, fail=[2, 5])
    wait_until(lambda: _status(database_url, parent) == "GATHERED", 60, "the parent joined")
    gathered = _run(database_url, parent)[1]["gather"]
    assert isinstance(gathered, dict)
    assert gathered["squares"] == [0, 1, None, 9, 16, None]
    assert gathered["failed"] == [2, 5]
    assert all("child" in str(e) and "refuses" in str(e) for e in gathered["errors"])


def test_cancelling_a_parent_cancels_its_unfinished_children(
    database_url: str, start_conveyor: Start
) -> None:
    start_conveyor("run", CONVEYOR_PIPELINE=FAN)
    parent = _parent(database_url, "fan", width=25, sleep=60)
    wait_until(lambda: len(_children(database_url, parent)) == 25, 60, "the children")
    result = conveyor_command(database_url, "cancel", parent, CONVEYOR_PIPELINE=FAN)
    assert result.returncode == 0, result.stdout + result.stderr
    assert _status(database_url, parent) == "CANCELLED"
    assert [status for _, status, _ in _children(database_url, parent)] == ["CANCELLED"] * 25
    assert (
        scalar(
            database_url,
            "SELECT count(*) FROM conveyor.run_events e JOIN conveyor.pipeline_runs c"
            " ON c.id = e.run_id WHERE c.parent_id = %s AND e.to_status = 'CANCELLED'",
            (parent,),
        )
        == 25
    )


def test_a_child_inserted_by_hand_joins_like_the_rest(
    database_url: str, start_conveyor: Start
) -> None:
    start_conveyor("run", CONVEYOR_PIPELINE=FAN)
    parent = _parent(database_url, "fan", width=3, sleep=3)
    wait_until(lambda: _status(database_url, parent) == "SPLIT_WAITING", 60, "the parent waits")
    with psycopg.connect(database_url, autocommit=True) as conn:
        conn.execute(
            "INSERT INTO conveyor.pipeline_runs (pipeline, status, input, parent_id)"
            " VALUES ('fan', 'PART', '{\"n\": 7}', %s)",
            (parent,),
        )
    wait_until(lambda: _status(database_url, parent) == "GATHERED", 60, "the parent joined")
    gathered = _run(database_url, parent)[1]["gather"]
    assert isinstance(gathered, dict)
    assert gathered["indexes"] == [0, 1, 2, 3]
    assert gathered["squares"] == [0, 1, 4, 49]

    # A run that does not wait for children refuses one, with an error that says so.
    with (
        psycopg.connect(database_url, autocommit=True) as conn,
        pytest.raises(psycopg.errors.CheckViolation, match="is not waiting for children"),
    ):
        conn.execute(
            "INSERT INTO conveyor.pipeline_runs (pipeline, status, parent_id)"
            " VALUES ('fan', 'PART', %s)",
            (parent,),
        )


def test_a_retried_child_is_waited_for_again(database_url: str, start_conveyor: Start) -> None:
    start_conveyor("run", CONVEYOR_PIPELINE="tests.shapes.pipelines:fan_join")
    # Child 1 fails at once; child 0 and 2 take a few seconds, so the parent still waits.
    parent = _parent(database_url, "fan_join", width=3, fail=[1], sleep=4)
    wait_until(
        lambda: [s for _, s, _ in _children(database_url, parent)][1:2] == ["FAILED"],
        60,
        "child 1 failed",
    )
    failed = str(
        scalar(
            database_url,
            "SELECT id FROM conveyor.pipeline_runs WHERE parent_id = %s AND child_index = 1",
            (parent,),
        )
    )
    with psycopg.connect(database_url, autocommit=True) as conn:
        # Retried with a different input that succeeds: the parent waits for it again.
        conn.execute(
            "UPDATE conveyor.pipeline_runs SET input = input || '{\"fail\": false}' WHERE id = %s",
            (failed,),
        )
    retried = conveyor_command(
        database_url, "retry", failed, CONVEYOR_PIPELINE="tests.shapes.pipelines:fan_join"
    )
    assert retried.returncode == 0, retried.stdout + retried.stderr
    wait_until(lambda: _status(database_url, parent) == "GATHERED", 60, "the parent joined")
    gathered = _run(database_url, parent)[1]["gather"]
    assert isinstance(gathered, dict)
    # Joined once, after all three: the retried child's output is there, nothing failed.
    assert gathered["squares"] == [0, 1, 4]
    assert gathered["failed"] == []
    assert [s for _, s, _ in _children(database_url, parent)] == ["DONE"] * 3
    assert [m for m in _parent_moves(database_url, parent) if m[0] is None] == [
        (None, "SPLIT_WAITING", "SPLIT")
    ]


def test_a_run_back_for_a_second_fan_out_joins_only_the_latest(
    database_url: str, start_conveyor: Start
) -> None:
    start_conveyor("run", CONVEYOR_PIPELINE="tests.shapes.pipelines:fan_again")
    parent = _parent(database_url, "fan_again", width=4)
    wait_until(lambda: _status(database_url, parent) == "GATHERED", 60, "the parent's second join")
    gathered = _run(database_url, parent)[1]["gather"]
    # The first join saw 4 children; sent back, the run created none, and its join saw none.
    assert isinstance(gathered, dict) and gathered["indexes"] == []
    assert len(_children(database_url, parent)) == 4
    assert [stage for stage, _, _ in _parent_moves(database_url, parent)] == [
        "split", None, "gather", "split", "gather",
    ]  # fmt: skip


def test_hand_inserted_children_are_counted_once_or_refused(
    database_url: str, start_conveyor: Start
) -> None:
    start_conveyor("run", CONVEYOR_PIPELINE=FAN)
    parent = _parent(database_url, "fan", width=2, sleep=3)
    wait_until(lambda: _status(database_url, parent) == "SPLIT_WAITING", 60, "the parent waits")
    insert = (
        "INSERT INTO conveyor.pipeline_runs (pipeline, status, input, parent_id, idempotency_key)"
        " VALUES ('fan', 'PART', '{\"n\": 5}', %s, 'extra-child')"
        " ON CONFLICT (pipeline, idempotency_key) WHERE idempotency_key IS NOT NULL DO NOTHING"
    )
    with psycopg.connect(database_url, autocommit=True) as conn:
        conn.execute(insert, (parent,))
        conn.execute(insert, (parent,))  # a client's retry: no second child, and no count
        with pytest.raises(psycopg.errors.CheckViolation, match="leave child_index out"):
            conn.execute(
                "INSERT INTO conveyor.pipeline_runs (pipeline, status, parent_id, child_index)"
                " VALUES ('fan', 'PART', %s, 7)",
                (parent,),
            )
        pending = conn.execute(
            "SELECT children_pending FROM conveyor.pipeline_runs WHERE id = %s", (parent,)
        ).fetchone()
    assert pending is not None and pending[0] <= 3
    wait_until(lambda: _status(database_url, parent) == "GATHERED", 60, "the parent joined")
    gathered = _run(database_url, parent)[1]["gather"]
    assert isinstance(gathered, dict) and gathered["squares"] == [0, 1, 25]
