"""A run's route: the stages that moved it on, in order, from its history (run_events rows as
the statements of sql/queries.sql write them)."""

from __future__ import annotations

from typing import Any

from conveyor.runs import route_of


def _event(
    stage: str | None,
    from_status: str | None,
    to_status: str,
    *,
    ran: bool = True,
    error: str | None = None,
) -> dict[str, Any]:
    return {
        "stage": stage,
        "from_status": from_status,
        "to_status": to_status,
        "duration_seconds": 0.01 if ran else None,
        "error": error,
    }


def test_retries_throttles_releases_and_rescues_are_not_visits() -> None:
    history = [
        _event("analyze", "ANALYZING", "NEW", error="ValueError: flaky"),  # retried
        _event("analyze", "ANALYZING", "NEW", error="throttled: openai:gpt-4o until ..."),
        _event("analyze", "ANALYZING", "NEW", ran=False, error="released: shutting down"),
        _event("analyze", "ANALYZING", "NEW", ran=False, error="rescued: worker died"),
        _event("analyze", "NEW", "CONTEXT_READY"),  # routed past assemble
        _event("answer", "CONTEXT_READY", "DONE"),
    ]
    assert route_of(history) == ["analyze", "answer"]


def test_a_loop_is_each_visit_in_order_self_loops_too() -> None:
    history = [
        _event("draft", "NEW", "DRAFTED"),
        _event("review", "DRAFTED", "DRAFTED"),  # a stage that sends a run back to itself
        _event("review", "DRAFTED", "NEW"),
        _event("draft", "NEW", "DRAFTED"),
        _event("review", "DRAFTED", "FAILED", error="loop ended: stage draft has run ..."),
    ]
    assert route_of(history) == ["draft", "review", "review", "draft", "review"]


def test_commands_and_final_failures() -> None:
    history = [
        _event("analyze", "ANALYZING", "FAILED", error="PermanentError: no question"),
        _event("analyze", "FAILED", "NEW", ran=False),  # conveyor retry
        _event("analyze", "NEW", "ANALYZED"),
        _event(None, "ANALYZED", "CANCELLED", ran=False),  # conveyor cancel
    ]
    assert route_of(history) == ["analyze", "analyze"]
    assert route_of([]) == []
