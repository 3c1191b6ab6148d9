"""A fan-out's declaration, checked when the pipeline is declared, and a handler's FanOut,
checked before anything is stored: each mistake is one line, and fails only its run."""

from __future__ import annotations

import asyncio
from typing import Any
from uuid import uuid4

from conveyor import FanOut, Pipeline, PipelineError, Run, Stage
from conveyor.results import Failure, Success
from conveyor.worker.runner import run_handler


async def _noop(run: Run) -> dict[str, object]:
    return {}


def _refused(stages: list[Stage]) -> str:
    try:
        Pipeline("shapes", stages)
    except PipelineError as exc:
        return str(exc)
    raise AssertionError("the pipeline was accepted")


def _parts(**fields: Any) -> list[Stage]:
    return [
        Stage("split", _noop, "NEW", "SPLIT", **fields),
        Stage("part", _noop, "PART", "DONE"),
        Stage("join", _noop, "SPLIT", "JOINED"),
    ]


def test_a_fan_out_is_checked_when_the_pipeline_is_declared() -> None:
    fan = Pipeline("shapes", _parts(fan_out="PART"))
    split, part, join = fan.stages
    assert split.waiting == "SPLIT_WAITING"
    assert fan.fans_out and fan.joins(join) and not fan.joins(part)
    assert fan.destinations(split)["SPLIT_WAITING"].ends is False

    assert _refused(_parts(fan_out="NOWHERE")) == (
        "pipeline 'shapes', stage 'split': fan_out NOWHERE: no stage consumes it, so no child "
        "would start"
    )
    assert "must match" in _refused(_parts(fan_out="part"))
    for waiting in ("PART", "SPLIT", "PART_RUNNING", "DONE", "JOINED"):
        assert "waiting status" in _refused(_parts(fan_out="PART", waiting=waiting)), waiting
    assert "on_child_failure" in _refused(_parts(fan_out="PART", on_child_failure="ignore"))
    assert "a waiting status is for a stage with fan_out" in _refused(_parts(waiting="HOLD"))
    # the parent joins at a stage: a fan-out cannot end the pipeline
    assert _refused(
        [
            Stage("split", _noop, "NEW", "SPLIT", fan_out="PART"),
            Stage("part", _noop, "PART", "DONE"),
        ]
    ) == (
        "pipeline 'shapes', stage 'split': fans out, but no stage consumes SPLIT to join its "
        "children"
    )
    assert Pipeline("shapes", _parts(fan_out="PART", on_child_failure="join"))


def _outcome(handler: Any, **stage_fields: Any) -> Success | Failure:
    stage = Stage("split", handler, "NEW", "SPLIT", **stage_fields)
    run = Run(uuid4(), "shapes", "split", {}, {}, 1)
    return asyncio.run(run_handler(stage, run))


def _error(handler: Any, **stage_fields: Any) -> str:
    outcome = _outcome(handler, **stage_fields)
    assert isinstance(outcome, Failure)
    assert outcome.retry_in is None  # no retry can change it
    return outcome.error


def test_a_handler_fan_out_is_checked_before_anything_is_stored() -> None:
    def returning(value: Any) -> Any:
        return lambda run: value

    ok = _outcome(returning(FanOut([{"n": 1}, {"n": 2}], {"pages": 2})), fan_out="PART")
    assert isinstance(ok, Success)
    assert ok.target == "SPLIT_WAITING" and ok.output_json == '{"pages": 2}'
    assert ok.spawn is not None
    assert (ok.spawn.pipeline, ok.spawn.status) == ("shapes", "PART")
    assert ok.spawn.inputs == ('{"n": 1}', '{"n": 2}')
    # no children: the run moves on at once
    empty = _outcome(returning(FanOut([])), fan_out="PART")
    assert isinstance(empty, Success) and empty.target is None and empty.spawn is None
    elsewhere = _outcome(returning(FanOut([{}], pipeline="other", status="START")), fan_out="PART")
    assert isinstance(elsewhere, Success) and elsewhere.spawn is not None
    assert (elsewhere.spawn.pipeline, elsewhere.spawn.status) == ("other", "START")

    assert _error(returning(FanOut([{}]))) == (
        "FanOutError: stage 'split' returned FanOut, but declares no fan_out status for children"
    )
    assert "not a list of inputs" in _error(returning(FanOut({"n": 1})), fan_out="PART")  # type: ignore[arg-type]
    assert "its children start in PART" in _error(
        returning(FanOut([{}], status="OTHER")), fan_out="PART"
    )
    assert "without the status" in _error(returning(FanOut([{}], pipeline="other")), fan_out="PART")
    assert "not a pipeline name" in _error(
        returning(FanOut([{}], pipeline="Bad Name", status="X")), fan_out="PART"
    )
    assert _error(returning(FanOut([{}, "text"])), fan_out="PART") == (
        "OutputError: stage 'split' returned as child 1's input a value of type str, not a JSON "
        "object (a dict with str keys)"
    )
    assert "at most 100000" in _error(returning(FanOut([{}] * 100_001)), fan_out="PART")
