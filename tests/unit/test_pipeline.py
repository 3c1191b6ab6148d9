from __future__ import annotations

from typing import Any

import pytest

from conveyor import Backoff, Pipeline, PipelineError, Run, Stage
from conveyor.pipeline import load_pipeline
from conveyor.settings import Settings


async def noop(run: Run) -> dict[str, Any]:
    return {}


def sync_noop(run: Run) -> dict[str, Any]:
    return {}


def test_reference_pipeline_statuses() -> None:
    from conveyor.reference import pipeline

    chain = [(s.consumes, s.working, s.produces) for s in pipeline.stages]
    assert chain == [
        ("NEW", "ANALYZING", "ANALYZED"),
        ("ANALYZED", "ASSEMBLING", "CONTEXT_READY"),
        ("CONTEXT_READY", "ANSWERING", "DONE"),
    ]
    assert pipeline.final_status == "DONE"
    assert pipeline.is_terminal("DONE") and pipeline.is_terminal("FAILED")
    assert not pipeline.is_terminal("ANALYZED")


def test_working_status_and_batch_defaults() -> None:
    stage = Stage("embed", noop, consumes="NEW", produces="DONE", concurrency=8)
    assert stage.working == "EMBED_RUNNING"
    assert stage.batch == 8
    assert stage.is_async
    assert not Stage("s", sync_noop, consumes="NEW", produces="DONE").is_async


@pytest.mark.parametrize(
    ("stages", "message"),
    [
        (
            [
                Stage("a", noop, consumes="NEW", produces="MID"),
                Stage("b", noop, consumes="NEW", produces="DONE"),
            ],
            "status NEW is already consumed by stage 'a'",
        ),
        ([Stage("a", noop, consumes="DONE", produces="OTHER")], "consumes DONE, a terminal"),
        ([Stage("a", noop, consumes="NEW", produces="FAILED")], "produces FAILED"),
        ([Stage("A b", noop, consumes="NEW", produces="DONE")], "stage name must match"),
        ([Stage("a", noop, consumes="new", produces="DONE")], "status 'new' must match"),
        ([Stage("a", noop, consumes="NEW", produces="DONE", timeout=0)], "timeout must be > 0"),
        ([], "has no stages"),
    ],
)
def test_invalid_declarations_fail_with_one_line(stages: list[Stage], message: str) -> None:
    with pytest.raises(PipelineError) as raised:
        Pipeline("p", stages)
    assert message in str(raised.value)
    assert "\n" not in str(raised.value)


def test_load_pipeline_by_import_path() -> None:
    assert load_pipeline("conveyor.reference:pipeline").name == "agents"
    with pytest.raises(PipelineError, match="cannot import 'nowhere'"):
        load_pipeline("nowhere:pipeline")
    with pytest.raises(PipelineError, match="has no 'missing'"):
        load_pipeline("conveyor.reference:missing")
    with pytest.raises(PipelineError, match=r"not a conveyor\.Pipeline"):
        load_pipeline("conveyor.reference:answer")


def test_environment_overrides_per_stage() -> None:
    from conveyor.reference import pipeline

    settings = Settings.from_env(
        {"CONVEYOR_ANSWER_CONCURRENCY": "4", "CONVEYOR_ANALYZE_MAX_ATTEMPTS": "7"}
    )
    tuned = pipeline.with_settings(settings)
    assert (tuned.stage("answer").concurrency, tuned.stage("answer").batch) == (4, 4)
    assert tuned.stage("analyze").max_attempts == 7
    assert tuned.stage("assemble") == pipeline.stage("assemble")
    with pytest.raises(PipelineError, match="CONVEYOR_NOPE_"):
        pipeline.with_settings(Settings.from_env({"CONVEYOR_NOPE_BATCH": "3"}))


def test_backoff_grows_with_jitter_and_is_capped() -> None:
    backoff = Backoff(base=1.0, cap=10.0)
    for attempt, ceiling in [(1, 1.0), (2, 2.0), (3, 4.0), (10, 10.0)]:
        delays = [backoff.delay(attempt) for _ in range(200)]
        assert all(ceiling / 2 <= d <= ceiling for d in delays)
        assert len(set(delays)) > 100  # jittered, not a fixed value
