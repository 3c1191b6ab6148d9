"""The agents pipeline run by `conveyor run` (real worker processes) against a real PostgreSQL,
with the LLM router pointed at OpenAI-compatible servers on loopback, and offline."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry
from prometheus_client.multiprocess import MultiProcessCollector

from tests.helpers import ConveyorProcess, fetch_all, scalar, wait_until
from tests.llm_server import FakeLLM, Reply

Start = Callable[..., ConveyorProcess]
KEY = "sk-e2e-primary-1f2e3d"
FALLBACK_KEY = "sk-e2e-fallback-9a8b"
DOC = """# Leases

A lease lasts thirty seconds. The worker extends the lease of a run while its handler runs.

# Rescue

When a lease expires, another worker rescues the run and it is claimed again.
"""


def submit(url: str, question: dict[str, Any]) -> str:
    return str(
        scalar(
            url,
            "INSERT INTO conveyor.pipeline_runs (input) VALUES (%s::jsonb) RETURNING id",
            (json.dumps(question),),
        )
    )


def finished(url: str, run_id: str, timeout: float = 60) -> str:
    def status() -> str | None:
        found = scalar(
            url,
            "SELECT status FROM conveyor.pipeline_runs WHERE id = %s AND finished_at IS NOT NULL",
            (run_id,),
        )
        return str(found) if found else None

    return wait_until(status, timeout, f"run {run_id} to finish")


def events(url: str, run_id: str) -> list[tuple[Any, ...]]:
    return fetch_all(
        url,
        "SELECT stage, to_status, model, prompt_tokens, completion_tokens, error"
        " FROM conveyor.run_events WHERE run_id = %s ORDER BY id",
        (run_id,),
    )


def llm_metrics(directory: Path) -> dict[tuple[str, ...], float]:
    registry = CollectorRegistry()
    MultiProcessCollector(registry, path=str(directory))
    found: dict[tuple[str, ...], float] = {}
    for metric in registry.collect():
        for s in metric.samples:
            if s.name == "conveyor_llm_requests_total":
                found[(s.labels["stage"], s.labels["model"], s.labels["outcome"])] = s.value
            elif s.name == "conveyor_llm_tokens_total":
                found[(s.labels["stage"], s.labels["model"], s.labels["kind"])] = s.value
    return found


def test_llm_pipeline_models_retries_fallback_timeouts_and_tokens(
    database_url: str,
    start_conveyor: Start,
    fake_llm: FakeLLM,
    fallback_llm: FakeLLM,
    tmp_path: Path,
) -> None:
    doc = tmp_path / "leases.md"
    doc.write_text(DOC)
    assert start_conveyor("memory", "add", str(doc)).wait(60) == 0
    metrics_dir = tmp_path / "metrics"
    metrics_dir.mkdir()
    supervisor = start_conveyor(
        "run",
        CONVEYOR_LLM_BASE_URL=fake_llm.url,
        CONVEYOR_LLM_API_KEY=KEY,
        CONVEYOR_ANALYZE_MODEL="analyzer-small",
        CONVEYOR_ANSWER_MODEL="answer-large",
        CONVEYOR_LLM_FALLBACK_BASE_URL=fallback_llm.url,
        CONVEYOR_LLM_FALLBACK_API_KEY=FALLBACK_KEY,
        CONVEYOR_LLM_FALLBACK_MODEL="fallback-model",
        CONVEYOR_LLM_TIMEOUT_SECONDS="1",
        CONVEYOR_LLM_MAX_RETRIES="1",
        CONVEYOR_LLM_BACKOFF_SECONDS="0.05",
        CONVEYOR_ANSWER_MAX_ATTEMPTS="2",
        PROMETHEUS_MULTIPROC_DIR=str(metrics_dir),
    )

    # 1. The right model per stage, the context in the prompt, tokens on run_events.
    plain = submit(database_url, {"question": "How long does a lease last?"})
    assert finished(database_url, plain) == "DONE"
    analyze_request, answer_request = fake_llm.requests
    assert (analyze_request.model, analyze_request.json_mode) == ("analyzer-small", True)
    assert answer_request.model == "answer-large" and not answer_request.json_mode
    assert answer_request.headers["authorization"] == f"Bearer {KEY}"
    prompt = answer_request.text()
    assert "A lease lasts thirty seconds." in prompt  # the assembled context
    assert "Question: How long does a lease last?" in prompt
    assert events(database_url, plain) == [
        ("analyze", "ANALYZED", "analyzer-small", 11, 7, None),
        ("assemble", "CONTEXT_READY", None, None, None, None),
        ("answer", "DONE", "answer-large", 11, 7, None),
    ]
    outputs = scalar(
        database_url, "SELECT outputs FROM conveyor.pipeline_runs WHERE id = %s", (plain,)
    )
    assert outputs["analyze"]["analyzer"] == "llm"
    assert outputs["answer"]["answer"] == "Leases expire and the run is rescued [1]."
    assert outputs["answer"]["sources"][0]["source"].endswith("leases.md")

    # 2. A 429 then a 200: retried on the primary route.
    fake_llm.push("answer-large", Reply(status=429, headers={"Retry-After": "0"}))
    limited = submit(database_url, {"question": "What extends a lease?"})
    assert finished(database_url, limited) == "DONE"
    assert len(fake_llm.for_model("answer-large")) == 3
    assert events(database_url, limited)[-1][:3] == ("answer", "DONE", "answer-large")

    # 3. 500s on the primary: the fallback route answers, and its model is recorded.
    fake_llm.push("answer-large", Reply(status=500), Reply(status=500))
    failed_over = submit(database_url, {"question": "Who rescues a run?"})
    assert finished(database_url, failed_over) == "DONE"
    assert [r.headers["authorization"] for r in fallback_llm.requests] == [f"Bearer {FALLBACK_KEY}"]
    assert events(database_url, failed_over)[-1][:3] == ("answer", "DONE", "fallback-model")

    # 4. Timeouts on both routes: the stage's attempt fails and the engine retries the run.
    fake_llm.push("answer-large", Reply(delay=3), Reply(delay=3))
    fallback_llm.push("fallback-model", Reply(delay=3), Reply(delay=3))
    slow = submit(database_url, {"question": "When is a run claimed again?"})
    assert finished(database_url, slow) == "DONE"
    history = events(database_url, slow)
    assert [(h[0], h[1]) for h in history] == [
        ("analyze", "ANALYZED"),
        ("assemble", "CONTEXT_READY"),
        ("answer", "CONTEXT_READY"),  # the failed attempt, back in line
        ("answer", "DONE"),
    ]
    assert "LLMUnavailable" in history[2][5] and "timed out after 1s" in history[2][5]

    # 5. Every route refuses the key: FAILED after the stage's attempts; no key anywhere.
    refusal = {"error": {"message": f"Incorrect API key provided: {KEY} / {FALLBACK_KEY}"}}
    fake_llm.push("answer-large", *[Reply(status=401, body=refusal)] * 2)
    fallback_llm.push("fallback-model", *[Reply(status=401, body=refusal)] * 2)
    refused = submit(database_url, {"question": "Is my key right?"})
    assert finished(database_url, refused) == "FAILED"
    last_error = scalar(
        database_url, "SELECT last_error FROM conveyor.pipeline_runs WHERE id = %s", (refused,)
    )
    assert "HTTP 401" in last_error
    for secret in (KEY, FALLBACK_KEY):
        assert secret not in last_error
        assert secret not in str(events(database_url, refused))

    time.sleep(0.2)  # let the last metric writes land before reading the files
    found = llm_metrics(metrics_dir)
    assert found[("answer", "answer-large", "rate_limited")] == 1
    assert found[("answer", "answer-large", "server_error")] == 2
    assert found[("answer", "answer-large", "timeout")] == 2
    assert found[("answer", "fallback-model", "timeout")] == 2
    assert found[("answer", "answer-large", "client_error")] == 2
    assert found[("answer", "fallback-model", "ok")] == 1
    assert found[("analyze", "analyzer-small", "ok")] == 5
    assert found[("analyze", "analyzer-small", "prompt")] == 5 * 11
    assert found[("answer", "answer-large", "completion")] == 3 * 7
    supervisor.stop()
    log = supervisor.log()
    assert "llm request failed; retrying" in log
    assert KEY not in log and FALLBACK_KEY not in log


def test_offline_pipeline_bad_input_fails_at_once_and_sessions_remember(
    database_url: str, start_conveyor: Start
) -> None:
    start_conveyor("run", CONVEYOR_MAX_QUESTION_CHARS="100")
    empty = submit(database_url, {"question": "  "})
    too_long = submit(database_url, {"question": "why " * 30})
    missing = submit(database_url, {"text": "no question here"})
    good = submit(database_url, {"question": "What is a lease?", "session_id": "e2e"})
    assert finished(database_url, good) == "DONE"
    for run_id, message in [
        (empty, "InvalidQuestion: the question is empty"),
        (
            too_long,
            "InvalidQuestion: the question is 119 characters; the limit is 100 "
            "(CONVEYOR_MAX_QUESTION_CHARS)",
        ),
        (
            missing,
            """InvalidQuestion: the input has no 'question' (expected {"question": "..."})""",
        ),
    ]:
        assert finished(database_url, run_id) == "FAILED"
        history = events(database_url, run_id)
        assert [(h[0], h[1]) for h in history] == [("analyze", "FAILED")]  # no retries
        assert history[0][5].splitlines()[-1] == f"conveyor.agents.analyze.{message}"
    rows = fetch_all(database_url, "SELECT namespace, metadata->>'run_id' FROM conveyor.memory")
    assert rows == [("session:e2e", good)]  # nothing written for the bad runs
