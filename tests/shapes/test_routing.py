"""Routing with real `conveyor run` processes: a stage chooses where each run goes, a loop back
to an earlier stage ends at its bound, and a route nobody declared fails only its run."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable

import psycopg
from psycopg_pool import AsyncConnectionPool

from conveyor import Pipeline, PipelineError, Route, Run, Stage
from conveyor.protocol import StageProtocol
from conveyor.results import Applied, Success
from tests.helpers import ConveyorProcess, fetch_all, scalar, wait_until

Start = Callable[..., ConveyorProcess]


def _insert(url: str, pipeline: str, inputs: list[dict[str, object]]) -> list[object]:
    with psycopg.connect(url, autocommit=True) as conn:
        return [
            conn.execute(
                "INSERT INTO conveyor.pipeline_runs (pipeline, input) VALUES (%s, %s) RETURNING id",
                (pipeline, json.dumps(run_input)),
            ).fetchone()[0]  # type: ignore[index]
            for run_input in inputs
        ]


def _finished(url: str, pipeline: str) -> int:
    return int(
        scalar(
            url,
            "SELECT count(*) FROM conveyor.pipeline_runs"
            " WHERE pipeline = %s AND finished_at IS NOT NULL",
            (pipeline,),
        )
    )


# The attempts that moved a run on (a hand-off given back or a release leaves an event too).
_MOVED = "duration IS NOT NULL AND (error IS NULL OR to_status = 'FAILED')"


def _route(url: str, run_id: object) -> list[tuple[str, str]]:
    rows = fetch_all(
        url,
        f"SELECT stage, to_status FROM conveyor.run_events WHERE run_id = %s AND {_MOVED}"
        " ORDER BY id",
        (run_id,),
    )
    return [(str(stage), str(to)) for stage, to in rows]


def test_a_three_way_router_sends_each_run_to_its_branch(
    database_url: str, start_conveyor: Start
) -> None:
    start_conveyor("run", CONVEYOR_PIPELINE="tests.shapes.pipelines:router")
    kinds = ["a", "b", "c", "b", "c", "c", "zzz"]
    ids = _insert(database_url, "router", [{"kind": kind} for kind in kinds])
    wait_until(lambda: _finished(database_url, "router") == len(kinds), 60, "every run to end")

    for run_id, kind in zip(ids, kinds, strict=True):
        status, outputs, error = fetch_all(
            database_url,
            "SELECT status, outputs, last_error FROM conveyor.pipeline_runs WHERE id = %s",
            (run_id,),
        )[0]
        if kind == "zzz":  # a route the stage does not declare: this run alone fails, at once
            assert status == "FAILED"
            assert str(error).startswith(
                "RouteError: stage 'triage' returned Route('TO_ZZZ'), which it does not declare"
            )
            assert _route(database_url, run_id) == [("triage", "FAILED")]
            continue
        assert status == "DONE"
        assert outputs == {"triage": {"kind": kind}, kind: {"branch": kind}}
        assert _route(database_url, run_id) == [("triage", f"TO_{kind.upper()}"), (kind, "DONE")]
    # the branches each ran exactly their runs: one attempt each, nothing retried
    moved = f"SELECT count(*) FROM conveyor.run_events WHERE {_MOVED}"
    assert scalar(database_url, moved) == 2 * 6 + 1
    retried = (
        "SELECT count(*) FROM conveyor.run_events WHERE error IS NOT NULL"
        " AND to_status <> 'FAILED' AND error NOT LIKE 'released:%'"
    )
    assert scalar(database_url, retried) == 0


def test_a_loop_back_to_an_earlier_stage_ends_at_its_bound(
    database_url: str, start_conveyor: Start
) -> None:
    start_conveyor("run", CONVEYOR_PIPELINE="tests.shapes.pipelines:loop")
    approved, endless = _insert(database_url, "loop", [{"approve_at": 3}, {"approve_at": 99}])
    wait_until(lambda: _finished(database_url, "loop") == 2, 60, "both runs to end")

    status, outputs, visits = fetch_all(
        database_url,
        "SELECT status, outputs, visits FROM conveyor.pipeline_runs WHERE id = %s",
        (approved,),
    )[0]
    assert status == "DONE" and outputs["review"] == {"approved": True}
    assert outputs["draft"] == {"version": 3}
    assert visits == {"draft": 3, "review": 3}
    assert _route(database_url, approved) == [
        ("draft", "DRAFTED"), ("review", "NEW"),
        ("draft", "DRAFTED"), ("review", "NEW"),
        ("draft", "DRAFTED"), ("review", "DONE"),
    ]  # fmt: skip

    status, error, visits = fetch_all(
        database_url,
        "SELECT status, last_error, visits FROM conveyor.pipeline_runs WHERE id = %s",
        (endless,),
    )[0]
    assert status == "FAILED"
    assert error == (
        "loop ended: stage draft has run 3 times for this run (max_visits 3), and stage review"
        " sent it back to NEW"
    )
    assert visits == {"draft": 3, "review": 3}
    route = _route(database_url, endless)
    assert route[-1] == ("review", "FAILED") and len(route) == 6
    event_error = scalar(
        database_url,
        "SELECT error FROM conveyor.run_events WHERE run_id = %s ORDER BY id DESC LIMIT 1",
        (endless,),
    )
    assert event_error == error


async def _noop(run: Run) -> dict[str, object]:
    return {}


def _refused(stages: list[Stage]) -> str:
    try:
        Pipeline("shapes", stages)
    except PipelineError as exc:
        return str(exc)
    raise AssertionError("the pipeline was accepted")


def test_routes_are_checked_when_the_pipeline_is_declared() -> None:
    first = Stage("first", _noop, consumes="NEW", produces="MIDDLE", routes=["ELSEWHERE"])
    last = Stage("last", _noop, consumes="MIDDLE", produces="DONE")
    assert _refused([first, last]) == (
        "pipeline 'shapes', stage 'first': sends runs to ELSEWHERE, which no stage consumes and"
        " which does not end a run (DONE or DONE)"
    )
    assert "which no stage consumes" in _refused(
        [Stage("first", _noop, consumes="NEW", produces="LIMBO"),
         Stage("last", _noop, consumes="OTHER", produces="DONE")]
    )  # fmt: skip
    assert _refused([Stage("a", _noop, "NEW", "DONE", routes=["FAILED"])]) == (
        "pipeline 'shapes', stage 'a': routes to FAILED, which is reserved (raise"
        " PermanentError to fail a run)"
    )
    assert "must match" in _refused([Stage("a", _noop, "NEW", "DONE", routes=["lower"])])
    assert "distinct" in _refused([Stage("a", _noop, "NEW", "DONE", routes="DONE")])
    assert "the working status of stage 'a'" in _refused(
        [Stage("a", _noop, "NEW", "DONE", routes=["A_RUNNING"])]
    )
    assert "max_visits" in _refused([Stage("a", _noop, "NEW", "DONE", max_visits=0)])
    # routes to the end, and back to the start, are fine; both DONE and the final status end
    # a run well
    ends = Pipeline("shapes", [Stage("a", _noop, "NEW", "SHIPPED", routes=["NEW", "DONE"])])
    assert [ends.succeeded(s) for s in ("DONE", "SHIPPED", "FAILED", "NEW")] == [
        True, True, False, False,
    ]  # fmt: skip
    assert Route("DONE").output == {}


def test_conveyor_refuses_a_pipeline_whose_routes_lead_nowhere(
    database_url: str, start_conveyor: Start
) -> None:
    process = start_conveyor("run", CONVEYOR_PIPELINE="tests.shapes.bad_routes:pipeline")
    assert process.wait(30) == 2
    assert "sends runs to NOWHERE, which no stage consumes" in process.log()


def test_a_run_whose_loop_ends_counts_as_failed_not_completed(database_url: str) -> None:
    """The batch's tally (and so conveyor_runs_failed_total) names the run the bound failed."""
    from tests.shapes.pipelines import loop

    review = loop.stage("review")

    async def scenario() -> Applied:
        async with AsyncConnectionPool(
            database_url, min_size=1, max_size=2, kwargs={"autocommit": True}
        ) as pool:
            protocol = StageProtocol(
                pool,
                schema="conveyor",
                pipeline=loop,
                stage=review,
                worker_id="routing-test",
                lease_seconds=30,
            )
            async with pool.connection() as conn:
                for visits in ('{"draft": 3, "review": 2}', '{"draft": 1, "review": 1}'):
                    await conn.execute(
                        "INSERT INTO conveyor.pipeline_runs (pipeline, status, visits)"
                        " VALUES ('loop', 'DRAFTED', %s)",
                        (visits,),
                    )
            claimed = await protocol.claim(2)
            successes = [
                Success(run_id, attempt, "{}", 0.0, 0.0, target="NEW")
                for run_id, _input, _outputs, attempt, _waited, _rescued in claimed
            ]
            return await protocol.apply(successes, [])

    applied = asyncio.run(scenario())
    assert (applied.completed, applied.failed, applied.refused) == (1, 1, 0)
    rows = fetch_all(
        database_url, "SELECT status, visits FROM conveyor.pipeline_runs ORDER BY status"
    )
    assert rows == [("FAILED", {"draft": 3, "review": 3}), ("NEW", {"draft": 1, "review": 2})]
