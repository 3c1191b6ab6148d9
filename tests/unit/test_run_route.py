"""A run's route: the stages that moved it on, in order, from its history."""

from __future__ import annotations

from typing import Any

from conveyor.runs import route_of


def _event(stage: str | None, from_status: str | None, to_status: str) -> dict[str, Any]:
    return {"stage": stage, "from_status": from_status, "to_status": to_status}


def test_retries_and_throttles_are_not_stages_visited() -> None:
    history = [
        _event(None, None, "NEW"),  # submitted
        _event("analyze", "NEW", "NEW"),  # failed, retried
        _event("analyze", "NEW", "NEW"),  # throttled
        _event("analyze", "NEW", "CONTEXT_READY"),  # skipped assemble
        _event("answer", "CONTEXT_READY", "DONE"),
    ]
    assert route_of(history) == ["analyze", "answer"]


def test_a_loop_is_each_visit_in_order() -> None:
    history = [
        _event("draft", "NEW", "DRAFTED"),
        _event("review", "DRAFTED", "NEW"),
        _event("draft", "NEW", "DRAFTED"),
        _event("review", "DRAFTED", "DONE"),
    ]
    assert route_of(history) == ["draft", "review", "draft", "review"]


def test_events_without_a_stage_are_not_on_the_route() -> None:
    history = [
        _event("analyze", "NEW", "FAILED"),
        _event(None, "FAILED", "NEW"),  # a retry command
        _event("analyze", "NEW", "ANALYZED"),
        _event(None, "ANALYZED", "CANCELLED"),  # a cancel
    ]
    assert route_of(history) == ["analyze", "analyze"]
    assert route_of([]) == []
