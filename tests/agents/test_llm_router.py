"""The LLM router against a real HTTP server on loopback: retries, Retry-After, fallback routes,
timeouts, malformed answers, token accounting and metrics. The key never leaks."""

from __future__ import annotations

import uuid

import pytest
from prometheus_client import REGISTRY

from conveyor import Run, Usage
from conveyor.agents.analyze import Analyzer
from conveyor.agents.config import AgentConfig, LLMConfig, Route
from conveyor.agents.llm import LLMUnavailable, Router
from tests.agents.conftest import run_async
from tests.llm_server import USAGE, FakeLLM, Reply, chat_reply

KEY = "sk-test-4f1c9e"
MESSAGES = [{"role": "user", "content": "hello"}]


def router_for(
    primary: FakeLLM,
    fallback: FakeLLM | None = None,
    *,
    stage: str = "answer",
    model: str = "primary-model",
    fallback_model: str = "fallback-model",
    **tuning: float,
) -> Router:
    return Router(
        LLMConfig(
            primary=Route("primary", primary.url, KEY),
            fallback=Route("fallback", fallback.url, "sk-fallback-77") if fallback else None,
            models={stage: model},
            fallback_models={stage: fallback_model} if fallback else {},
            timeout_seconds=tuning.get("timeout", 5.0),
            max_retries=int(tuning.get("retries", 2)),
            backoff_seconds=tuning.get("backoff", 0.01),
            max_retry_after_seconds=tuning.get("max_retry_after", 30.0),
        )
    )


def new_run(stage: str = "answer", pipeline: str | None = None) -> Run:
    # A pipeline name of its own per test keeps the metric samples apart.
    return Run(uuid.uuid4(), pipeline or f"p{uuid.uuid4().hex[:8]}", stage, {}, {}, 1)


def sample(name: str, run: Run, **labels: str) -> float:
    value = REGISTRY.get_sample_value(
        name, {"pipeline": run.pipeline, "stage": run.stage, **labels}
    )
    return value or 0.0


def test_a_completion_calls_the_stage_model_and_records_tokens(fake_llm: FakeLLM) -> None:
    router, run = router_for(fake_llm), new_run()
    fake_llm.push("primary-model", Reply(body=chat_reply("It works [1].", "primary-model")))
    completion = run_async(lambda: router.chat(run, MESSAGES))
    assert completion.text == "It works [1]."
    assert (completion.model, completion.route) == ("primary-model", "primary")
    (request,) = fake_llm.requests
    assert request.path == "/v1/chat/completions"
    assert request.headers["authorization"] == f"Bearer {KEY}"
    assert request.body["model"] == "primary-model"
    assert request.body["messages"] == MESSAGES
    assert run.usage == Usage("primary-model", input_units=11, output_units=7)
    ok = {"model": "primary-model", "outcome": "ok"}
    assert sample("conveyor_llm_requests_total", run, **ok) == 1
    prompt = {"model": "primary-model", "kind": "prompt"}
    assert sample("conveyor_llm_tokens_total", run, **prompt) == USAGE["prompt_tokens"]
    completion_kind = {"model": "primary-model", "kind": "completion"}
    assert sample("conveyor_llm_tokens_total", run, **completion_kind) == 7
    assert sample("conveyor_llm_latency_seconds_count", run, model="primary-model") == 1


def test_429_is_retried_after_the_retry_after_it_asks_for(fake_llm: FakeLLM) -> None:
    router, run = router_for(fake_llm, backoff=0.0), new_run()
    fake_llm.push(
        "primary-model",
        Reply(status=429, body={"error": "slow down"}, headers={"Retry-After": "1"}),
    )
    completion = run_async(lambda: router.chat(run, MESSAGES))
    assert completion.route == "primary"
    first, second = fake_llm.requests
    assert second.at - first.at >= 0.95  # it waited as told, not its own (zero) backoff
    limited = {"model": "primary-model", "outcome": "rate_limited"}
    assert sample("conveyor_llm_requests_total", run, **limited) == 1
    assert sample("conveyor_llm_requests_total", run, model="primary-model", outcome="ok") == 1


def test_500s_on_the_primary_fall_over_to_the_fallback(
    fake_llm: FakeLLM, fallback_llm: FakeLLM
) -> None:
    router, run = router_for(fake_llm, fallback_llm, retries=1), new_run()
    fake_llm.push("primary-model", Reply(status=500), Reply(status=503))
    completion = run_async(lambda: router.chat(run, MESSAGES))
    assert completion.text == "The fallback route answers [1]."
    assert (completion.route, completion.model) == ("fallback", "fallback-model")
    assert len(fake_llm.requests) == 2  # the first try and one retry
    assert fallback_llm.requests[0].headers["authorization"] == "Bearer sk-fallback-77"
    assert run.usage is not None and run.usage.service == "fallback-model"
    errors = {"model": "primary-model", "outcome": "server_error"}
    assert sample("conveyor_llm_requests_total", run, **errors) == 2
    assert sample("conveyor_llm_requests_total", run, model="fallback-model", outcome="ok") == 1


def test_a_client_error_is_not_retried_and_the_key_never_leaks(
    fake_llm: FakeLLM, fallback_llm: FakeLLM
) -> None:
    router, run = router_for(fake_llm), new_run()
    body = {"error": {"message": f"Incorrect API key provided: {KEY}"}}
    fake_llm.push("primary-model", Reply(status=401, body=body))
    with pytest.raises(LLMUnavailable) as raised:
        run_async(lambda: router.chat(run, MESSAGES))
    assert len(fake_llm.requests) == 1
    message = str(raised.value)
    assert "HTTP 401" in message and "primary route (primary-model)" in message
    assert KEY not in message and "***" in message

    # With a fallback route, the same 401 sends the call there.
    router = router_for(fake_llm, fallback_llm)
    fake_llm.push("primary-model", Reply(status=401, body=body))
    assert run_async(lambda: router.chat(new_run(), MESSAGES)).route == "fallback"


def test_a_timeout_is_retried_then_raised_as_a_retryable_failure(fake_llm: FakeLLM) -> None:
    router, run = router_for(fake_llm, timeout=0.3, retries=1), new_run()
    fake_llm.push("primary-model", Reply(delay=1.5), Reply(delay=1.5))
    with pytest.raises(LLMUnavailable, match=r"timed out after 0\.3s"):
        run_async(lambda: router.chat(run, MESSAGES))
    assert len(fake_llm.requests) == 2
    timeouts = {"model": "primary-model", "outcome": "timeout"}
    assert sample("conveyor_llm_requests_total", run, **timeouts) == 2
    assert run.usage is None  # nothing answered: no usage recorded


def test_a_malformed_body_is_retried(fake_llm: FakeLLM) -> None:
    router, run = router_for(fake_llm), new_run()
    fake_llm.push("primary-model", Reply(body="<html>bad gateway</html>"))
    assert run_async(lambda: router.chat(run, MESSAGES)).route == "primary"
    bad = {"model": "primary-model", "outcome": "bad_response"}
    assert sample("conveyor_llm_requests_total", run, **bad) == 1


def test_a_retry_after_beyond_the_limit_goes_to_the_fallback_at_once(
    fake_llm: FakeLLM, fallback_llm: FakeLLM
) -> None:
    router = router_for(fake_llm, fallback_llm, max_retry_after=5.0)
    fake_llm.push("primary-model", Reply(status=429, headers={"Retry-After": "3600"}))
    completion = run_async(lambda: router.chat(new_run(), MESSAGES))
    assert completion.route == "fallback"
    assert len(fake_llm.requests) == 1


def analyzer_for(server: FakeLLM) -> Analyzer:
    router = router_for(server, stage="analyze", model="analyzer-model")
    return Analyzer(AgentConfig(llm=router.config), router)


def test_the_analyzer_uses_a_valid_json_answer(fake_llm: FakeLLM) -> None:
    run = new_run("analyze")
    run.input = {"question": "How are leases extended?"}
    answer = (
        '{"intent": "how-to", "keywords": ["lease", "heartbeat"], "queries": ["lease heartbeat"]}'
    )
    fake_llm.push("analyzer-model", Reply(body=chat_reply(answer, "analyzer-model")))
    output = run_async(lambda: analyzer_for(fake_llm)(run))
    assert output["analyzer"] == "llm" and output["model"] == "analyzer-model"
    assert (output["keywords"], output["queries"]) == (["lease", "heartbeat"], ["lease heartbeat"])
    (request,) = fake_llm.requests
    assert request.json_mode
    assert request.body["messages"][-1]["content"].endswith("Question: How are leases extended?")


def test_a_malformed_analysis_is_asked_again_then_falls_back_to_the_builtin(
    fake_llm: FakeLLM,
) -> None:
    run = new_run("analyze")
    run.input = {"question": "How are leases extended?"}
    fake_llm.push(
        "analyzer-model",
        Reply(body=chat_reply("Sure! The keywords are lease and heartbeat.", "analyzer-model")),
        Reply(body=chat_reply('{"intent": "how-to", "keywords": "lease"}', "analyzer-model")),
    )
    output = run_async(lambda: analyzer_for(fake_llm)(run))
    assert output["analyzer"] == "builtin"
    assert output["keywords"] == ["leases", "extended"]  # the built-in analyzer's
    assert output["fallback"] == {
        "from": "llm",
        "model": "analyzer-model",
        "tries": 2,
        "reason": "'keywords' must be a non-empty list of strings",
    }
    _, second = fake_llm.requests
    assert "not valid: not JSON" in second.body["messages"][-1]["content"]
    assert second.body["messages"][-2]["role"] == "assistant"
    assert run.usage is not None and (run.usage.input_units, run.usage.output_units) == (
        22,
        14,
    )  # both calls are counted
