"""The agents' settings: offline by default; every bad value names its variable; keys never show."""

from __future__ import annotations

import subprocess
import sys

import pytest

from conveyor.agents import MODEL_STAGES
from conveyor.agents.config import AgentConfig
from conveyor.agents.route_calls import retry_after_seconds
from conveyor.settings import ConfigError
from tests.helpers import ROOT, conveyor_env


def config(env: dict[str, str]) -> AgentConfig:
    return AgentConfig.from_env(env, model_stages=MODEL_STAGES)


def test_nothing_set_is_offline() -> None:
    found = config({})
    assert found.llm.primary is None and found.llm.models == {}
    assert found.embeddings is None
    assert (found.context_tokens, found.max_question_chars) == (1000, 2000)


def test_a_model_per_stage_with_a_fallback_route() -> None:
    found = config(
        {
            "CONVEYOR_LLM_BASE_URL": "http://localhost:11434/v1/",
            "CONVEYOR_LLM_API_KEY": "sk-secret",
            "CONVEYOR_LLM_MODEL": "small",
            "CONVEYOR_ANSWER_MODEL": "large",
            "CONVEYOR_LLM_FALLBACK_BASE_URL": "https://backup.example/v1",
            "CONVEYOR_ANSWER_FALLBACK_MODEL": "backup-large",
            "CONVEYOR_LLM_TIMEOUT_SECONDS": "12.5",
            "CONVEYOR_LLM_MAX_RETRIES": "0",
        }
    )
    llm = found.llm
    assert llm.primary is not None and llm.primary.base_url == "http://localhost:11434/v1"
    assert llm.primary.api_key == "sk-secret"
    assert "sk-secret" not in repr(llm)
    assert llm.models == {"analyze": "small", "answer": "large"}
    assert llm.fallback_model_for("answer") == "backup-large"
    assert llm.fallback_model_for("analyze") == "small"  # the same model on the other route
    assert (llm.timeout_seconds, llm.max_retries) == (12.5, 0)


def test_builtin_keeps_one_stage_offline() -> None:
    found = config(
        {
            "CONVEYOR_LLM_BASE_URL": "http://127.0.0.1:8000/v1",
            "CONVEYOR_LLM_MODEL": "m",
            "CONVEYOR_ANALYZE_MODEL": "builtin",
        }
    )
    assert found.llm.models == {"answer": "m"}


def test_embeddings_default_to_the_llm_route() -> None:
    found = config(
        {
            "CONVEYOR_LLM_BASE_URL": "http://127.0.0.1:8000/v1",
            "CONVEYOR_LLM_API_KEY": "k",
            "CONVEYOR_ANSWER_MODEL": "m",
            "CONVEYOR_EMBEDDINGS_MODEL": "e",
        }
    )
    assert found.embeddings is not None
    assert found.embeddings.route.base_url == "http://127.0.0.1:8000/v1"
    assert found.embeddings.route.api_key == "k"


@pytest.mark.parametrize(
    ("env", "variable", "says"),
    [
        ({"CONVEYOR_LLM_BASE_URL": "ftp://host/v1", "CONVEYOR_LLM_MODEL": "m"},
         "CONVEYOR_LLM_BASE_URL", "http:// or https://"),
        ({"CONVEYOR_LLM_BASE_URL": "http://h/v1"}, "CONVEYOR_LLM_BASE_URL", "needs a model"),
        ({"CONVEYOR_ANSWER_MODEL": "m"}, "CONVEYOR_ANSWER_MODEL", "CONVEYOR_LLM_BASE_URL"),
        ({"CONVEYOR_LLM_BASE_URL": "http://h/v1", "CONVEYOR_ASSEMBLE_MODEL": "m"},
         "CONVEYOR_ASSEMBLE_MODEL", "does not call a chat model"),
        ({"CONVEYOR_LLM_FALLBACK_BASE_URL": "http://h/v1"},
         "CONVEYOR_LLM_FALLBACK_BASE_URL", "needs the primary route"),
        ({"CONVEYOR_LLM_BASE_URL": "http://h/v1", "CONVEYOR_LLM_MODEL": "m",
          "CONVEYOR_LLM_FALLBACK_MODEL": "f"}, "CONVEYOR_LLM_FALLBACK_MODEL", "FALLBACK_BASE_URL"),
        ({"CONVEYOR_LLM_BASE_URL": "http://h/v1", "CONVEYOR_LLM_MODEL": "m",
          "CONVEYOR_LLM_TIMEOUT_SECONDS": "soon"}, "CONVEYOR_LLM_TIMEOUT_SECONDS", "number"),
        ({"CONVEYOR_LLM_BASE_URL": "http://h/v1", "CONVEYOR_LLM_MODEL": "m",
          "CONVEYOR_LLM_MAX_RETRIES": "-1"}, "CONVEYOR_LLM_MAX_RETRIES", "integer >= 0"),
        ({"CONVEYOR_EMBEDDINGS_MODEL": "e"}, "CONVEYOR_EMBEDDINGS_MODEL", "need a route"),
        ({"CONVEYOR_CONTEXT_TOKENS": "10"}, "CONVEYOR_CONTEXT_TOKENS", ">= 50"),
        ({"CONVEYOR_MAX_QUESTION_CHARS": "x"}, "CONVEYOR_MAX_QUESTION_CHARS", "integer"),
    ],
)  # fmt: skip
def test_a_bad_value_names_its_variable(env: dict[str, str], variable: str, says: str) -> None:
    with pytest.raises(ConfigError) as raised:
        config(env)
    assert raised.value.variable == variable
    assert str(raised.value).startswith(f"{variable}=")
    assert says in str(raised.value)


def test_keys_and_url_passwords_never_appear_in_errors() -> None:
    with pytest.raises(ConfigError) as raised:
        config({"CONVEYOR_LLM_API_KEY": "sk-very-secret"})
    assert raised.value.variable == "CONVEYOR_LLM_API_KEY"
    assert "sk-very-secret" not in str(raised.value)
    with pytest.raises(ConfigError) as raised:
        config({"CONVEYOR_LLM_BASE_URL": "ftp://user:hunter2@host/v1", "CONVEYOR_LLM_MODEL": "m"})
    assert "hunter2" not in str(raised.value)


def test_the_cli_exits_2_with_the_variable_and_without_the_key(tmp_path: object) -> None:
    env = conveyor_env(
        "postgresql://127.0.0.1:1/never-used",
        CONVEYOR_LLM_BASE_URL="http://127.0.0.1:9/v1",
        CONVEYOR_LLM_API_KEY="sk-cli-secret",
        CONVEYOR_ASSEMBLE_MODEL="m",
    )
    result = subprocess.run(
        [sys.executable, "-m", "conveyor", "run"],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    assert result.stderr.startswith("conveyor: error: CONVEYOR_ASSEMBLE_MODEL='m' is invalid")
    assert "Traceback" not in result.stderr
    assert "sk-cli-secret" not in result.stderr + result.stdout


def test_retry_after_as_seconds_or_http_date() -> None:
    assert retry_after_seconds("3") == 3.0
    assert retry_after_seconds("0.5") == 0.5
    assert retry_after_seconds(None) is None
    assert retry_after_seconds("soon") is None
    assert retry_after_seconds("Wed, 21 Oct 2015 07:28:00 GMT") == 0.0  # in the past
    future = retry_after_seconds("Fri, 01 Jan 2100 00:00:00 GMT")
    assert future is not None and future > 1e9
