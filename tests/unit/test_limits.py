"""Declaring limits: what a Limit, a Stage and the environment accept, and what a Run does with
flow control outside a worker."""

from __future__ import annotations

import asyncio
import time
import uuid
from typing import Any

import pytest

from conveyor import Limit, Pipeline, PipelineError, Run, Stage, Throttled
from conveyor.flow_control import stage_limits
from conveyor.limits import LimitError, env_name, stage_key
from conveyor.settings import Settings


def _handler(run: Run) -> dict[str, Any]:
    return {}


def test_env_names_of_keys() -> None:
    assert env_name("openai:gpt-4o") == "OPENAI_GPT_4O"
    assert env_name("primary:llama-3.1-8b") == "PRIMARY_LLAMA_3_1_8B"
    assert stage_key("agents", "answer") == "stage:agents:answer"


@pytest.mark.parametrize(
    "bad",
    [
        {"key": ""},
        {"key": "x" * 201},
        {"key": "a\nb"},
        {"key": 7},
        {"key": "k", "max_in_flight": -1},
        {"key": "k", "max_in_flight": 1.5},
        {"key": "k", "requests_per_minute": 0},
        {"key": "k", "requests_per_minute": 1e-12},  # its bucket's intervals would overflow
        {"key": "k", "tokens_per_minute": 5e-324},
        {"key": "k", "requests_per_minute": float("nan")},
        {"key": "k", "tokens_per_minute": float("inf")},
    ],
)
def test_a_limit_that_cannot_be_kept_is_refused_in_one_line(bad: dict[str, Any]) -> None:
    with pytest.raises(LimitError) as raised:
        Limit(**bad)
    assert "\n" not in str(raised.value)


def test_a_stage_declares_limits_once_and_bounds_its_cap() -> None:
    with pytest.raises(PipelineError, match="declared twice"):
        Pipeline("p", [Stage("s", _handler, "NEW", "DONE", limits=[Limit("k"), Limit("k")])])
    with pytest.raises(PipelineError, match=r"conveyor\.Limit"):
        Pipeline("p", [Stage("s", _handler, "NEW", "DONE", limits=["k"])])  # type: ignore[list-item]
    with pytest.raises(PipelineError, match="max_in_flight"):
        Pipeline("p", [Stage("s", _handler, "NEW", "DONE", max_in_flight=-1)])
    with pytest.raises(PipelineError, match="timeout"):
        Pipeline("p", [Stage("s", _handler, "NEW", "DONE", timeout=float("nan"))])


def test_the_environment_overrides_the_declaration() -> None:
    pipeline = Pipeline(
        "p",
        [
            Stage(
                "answer",
                _handler,
                "NEW",
                "DONE",
                limits=[Limit("openai:gpt-4o", max_in_flight=8, requests_per_minute=500)],
                max_in_flight=3,
            )
        ],
    )
    settings = Settings.from_env(
        {
            "CONVEYOR_LIMIT_OPENAI_GPT_4O_MAX_IN_FLIGHT": "4",
            "CONVEYOR_LIMIT_OPENAI_GPT_4O_RPM": "off",
            "CONVEYOR_LIMIT_OPENAI_GPT_4O_TPM": "30000",
            "CONVEYOR_ANSWER_MAX_IN_FLIGHT": "2",
        }
    )
    configured = pipeline.with_settings(settings)
    assert stage_limits(configured, configured.stages[0], settings) == (
        Limit("openai:gpt-4o", max_in_flight=4, tokens_per_minute=30000.0),
        Limit("stage:p:answer", max_in_flight=2),
    )


def test_outside_a_worker_a_run_has_nothing_to_wait_for() -> None:
    run = Run(uuid.uuid4(), "p", "s", {}, {}, 1)

    async def scenario() -> Throttled:
        reservation = await run.acquire("openai:gpt-4o", tokens=100)
        await reservation.settle(80)
        return await run.close_limit("openai:gpt-4o", retry_after=5, reason="429")

    throttled = asyncio.run(scenario())
    assert throttled.key == "openai:gpt-4o"
    assert 4 < throttled.wait_seconds() <= 5
    assert str(throttled).startswith("openai:gpt-4o until ") and str(throttled).endswith(": 429")
    assert Throttled("k").wait_seconds() == 1.0
    assert Throttled("k", time.time() - 10).wait_seconds() == 0.0


def test_a_per_group_cap_needs_a_group_and_the_environment_overrides_it() -> None:
    with pytest.raises(PipelineError, match="with group_by"):
        Pipeline("p", [Stage("s", _handler, "NEW", "DONE", max_in_flight_per_group=2)])
    with pytest.raises(PipelineError, match="group_by"):
        Pipeline("p", [Stage("s", _handler, "NEW", "DONE", group_by="")])
    pipeline = Pipeline(
        "p", [Stage("s", _handler, "NEW", "DONE", group_by="tenant", max_in_flight_per_group=2)]
    )
    settings = Settings.from_env(
        {"CONVEYOR_S_MAX_IN_FLIGHT_PER_GROUP": "5", "CONVEYOR_S_GROUP_TOKENS_PER_DAY": "9000"}
    )
    configured = pipeline.with_settings(settings).stages[0]
    assert (configured.max_in_flight_per_group, configured.group_tokens_per_day) == (5, 9000)
    with pytest.raises(PipelineError, match="group_tokens_per_day"):
        Pipeline("p", [Stage("s", _handler, "NEW", "DONE", group_tokens_per_day=10)])
