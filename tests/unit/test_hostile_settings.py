"""Hostile values, in process: every environment variable the engine and the agents read, the
password masking of malformed URLs, handler outputs that are not JSON objects, run inputs and
stored JSON that Python's json cannot take. tests/integration/test_hostile_settings.py drives the
real `conveyor` command with the same kinds of values."""

from __future__ import annotations

import asyncio
import functools
import math
import uuid
from typing import Any

import pytest

from conveyor import Run
from conveyor.agents import MODEL_STAGES
from conveyor.agents.config import AgentConfig, LLMConfig, Route
from conveyor.agents.llm import LLMUnavailable, Router
from conveyor.db import check_url
from conveyor.runs import DeepJSON, SubmitError, _input_json, _load_json
from conveyor.settings import ConfigError, Settings, parse_duration
from conveyor.urls import redact, redact_url
from conveyor.worker.runner import OutputError, output_json

SECRET = "s3cr3t"
BAD_UTF8 = "\udcff"  # a byte that is not UTF-8, as Python hands it over
LLM = {"CONVEYOR_LLM_BASE_URL": "http://127.0.0.1:9/v1", "CONVEYOR_LLM_MODEL": "m"}

ENGINE_VALUES: dict[str, list[str]] = {
    "CONVEYOR_DATABASE_URL": [
        f"postgresql://u:p@ss-{SECRET}@localhost:5432/db",
        f"postgresql://u:{SECRET}@[bad",
        f"postgresql://u:{SECRET}@localhost:abc/db",
        f"postgresql://u:{SECRET}@localhost:99999/db",
        f"postgresql://u:pa/{SECRET}@localhost/db",
        f"postgresql://u:pa {SECRET}@localhost/db",
        f"postgresql://u:%ZZ{SECRET}@localhost/db",
        f"postgresql://u:{SECRET}{BAD_UTF8}@localhost/db",
        f"mysql://u:{SECRET}@localhost/db",
        f"host=a password={SECRET} port=abc",
        f"host=a password=se {SECRET} port=1",
        f"host=a password='{SECRET}",
        "not a url",
    ],
    "DATABASE_URL": [f"postgresql://u:p@{SECRET}@h/db"],
    "CONVEYOR_LISTEN_DATABASE_URL": [
        f"postgresql://u:p@{SECRET}@h/db",
        f"postgresql://u:{SECRET}@[",
    ],
    "CONVEYOR_LEASE": ["1e308", "99999999999", "604801", "inf", "nan", "-1", "0"],
    "CONVEYOR_SWEEP_INTERVAL": ["1e308", "inf", "-1", "0", "86401"],
    "CONVEYOR_DRAIN_TIMEOUT": ["1e308", "nan", "-1"],
    "CONVEYOR_LISTENER_CHECK_INTERVAL": ["1e308", "0"],
    "CONVEYOR_LISTENER_CHECK_TIMEOUT": ["1e308", "0"],
    "CONVEYOR_MAX_RESCUES": ["99999999999999999999", "-1", "1e3", "1" * 5000],
    "CONVEYOR_RETENTION": ["99999999999999w", "1" * 400, "1e308", "-1d", "nan", "36501d"],
    "CONVEYOR_METRICS_PORT": ["99999", "-1", "abc"],
    "CONVEYOR_LOG_FORMAT": ["xml"],
    "CONVEYOR_EVENT_LOOP": ["libuv", "trio", f"uvloop{BAD_UTF8}"],
    "CONVEYOR_LOG_LEVEL": ["trace", f"info{BAD_UTF8}"],
    "CONVEYOR_SCHEMA": ["Bad-Schema", "a" * 70, f"s{BAD_UTF8}"],
    "CONVEYOR_PIPELINE": ["nope", ":x"],
    "CONVEYOR_STAGES": ["analyze=abc", "analyze=-1", "analyze=99999999999", "analyze=1e3", "="],
    "CONVEYOR_PREPARED_STATEMENTS": ["maybe"],
    "CONVEYOR_ANALYZE_CONCURRENCY": ["1000000000", "10001", "0", "-1", "inf"],
    "CONVEYOR_ANALYZE_BATCH": ["1000000000", "0"],
    "CONVEYOR_ANALYZE_TIMEOUT": ["1e308", "inf", "nan", "0", "-1"],
    "CONVEYOR_ANALYZE_MAX_ATTEMPTS": ["99999999999999", "0"],
    "CONVEYOR_ANALYZE_MAX_IN_FLIGHT": ["1000001", "-1", "1.5", "inf"],
    "CONVEYOR_LIMIT_OPENAI_GPT_4O_MAX_IN_FLIGHT": ["1000001", "-1", "1.5", "nan", "many"],
    "CONVEYOR_LIMIT_OPENAI_GPT_4O_RPM": ["0", "-1", "1e-12", "1e308", "inf", "nan", "fast"],
    "CONVEYOR_LIMIT_OPENAI_GPT_4O_TPM": ["0", "1e13", f"1{BAD_UTF8}"],
}
AGENT_VALUES: dict[str, list[str]] = {
    "CONVEYOR_LLM_BASE_URL": [
        f"https://user:{SECRET}@api.example.com/v1",
        f"https://:{SECRET}@api.example.com/v1",
        f"https://u:p@{SECRET}@api.example.com/v1",
        f"https://u:pa/{SECRET}@api.example.com/v1",
        f"https://{SECRET}@api.example.com/v1",
        "ftp://h/v1",
        "http://",
        "http://[bad/v1",
        "http://h:99999/v1",
        "http://h:abc/v1",
        "http://h/v1?x=1",
        "http://h\x7f/v1",
        f"http://h{BAD_UTF8}/v1",
    ],
    "CONVEYOR_LLM_FALLBACK_BASE_URL": [f"https://user:{SECRET}@api.example.com/v1"],
    "CONVEYOR_LLM_API_KEY": [
        f"{SECRET} x",
        f"{SECRET}{BAD_UTF8}",
        f"{SECRET}\u00e9",
        f"{SECRET}\x01",
    ],
    "CONVEYOR_LLM_TIMEOUT_SECONDS": ["1e308", "inf", "0"],
    "CONVEYOR_LLM_MAX_RETRIES": ["99999999999", "-1"],
    "CONVEYOR_LLM_BACKOFF_SECONDS": ["1e308", "nan"],
    "CONVEYOR_LLM_MAX_RETRY_AFTER_SECONDS": ["1e308"],
    "CONVEYOR_CONTEXT_TOKENS": ["99999999999999999999", "0"],
    "CONVEYOR_MAX_QUESTION_CHARS": ["99999999999999999999", "0"],
    "CONVEYOR_HISTORY_TURNS": ["99999999999999999999", "-1"],
    "CONVEYOR_MEMORY_NAMESPACE": ["x" * 300],
    "CONVEYOR_ASSEMBLE_MODEL": ["m"],
}


def _refusal(read: Any, name: str) -> str | None:
    """None when reading the environment raised one clean ConfigError naming `name`."""
    try:
        read()
    except ConfigError as exc:
        message = str(exc)
        if exc.variable != name or not message.startswith(f"{name}="):
            return f"names {exc.variable!r}: {message}"
        if "\n" in message or SECRET in message:
            return f"more than one line, or the password: {message}"
        return None
    except Exception as exc:  # anything else would be a traceback
        return f"{type(exc).__name__}: {exc}"
    return "accepted"


def test_every_hostile_environment_value_is_refused_naming_its_variable() -> None:
    attempts = [
        (name, value, functools.partial(Settings.from_env, {name: value}))
        for name, values in ENGINE_VALUES.items()
        for value in values
    ]
    attempts += [
        (
            name,
            value,
            functools.partial(
                AgentConfig.from_env, {**LLM, name: value}, model_stages=MODEL_STAGES
            ),
        )
        for name, values in AGENT_VALUES.items()
        for value in values
    ]
    failures = [
        f"{name}={value!r}: {why}"
        for name, value, read in attempts
        if (why := _refusal(read, name)) is not None
    ]
    tried, held = len(attempts), len(attempts) - len(failures)
    print(f"hostile environment values: {tried} tried, {held} held")
    assert held == tried, "\n".join(failures)


def test_the_bounds_themselves_are_accepted() -> None:
    settings = Settings.from_env(
        {
            "CONVEYOR_LEASE": "604800",
            "CONVEYOR_SWEEP_INTERVAL": "86400",
            "CONVEYOR_RETENTION": "36500d",
            "CONVEYOR_MAX_RESCUES": "1000",
            "CONVEYOR_STAGES": "analyze=1000,answer=0",
            "CONVEYOR_ANALYZE_CONCURRENCY": "10000",
            "CONVEYOR_ANALYZE_TIMEOUT": "604800",
            "CONVEYOR_ANALYZE_MAX_ATTEMPTS": "1000",
            "CONVEYOR_DATABASE_URL": "postgresql://u:p%40ss@h1:5432,h2/db?host=/tmp/a@b",
        }
    )
    assert settings.lease == 604800 and settings.retention == 36500 * 86400
    assert settings.overrides_for("analyze").concurrency == 10000


@pytest.mark.parametrize(
    ("text", "hidden"),
    [
        ("postgresql://u:p@ss-s3cr3t@host/db", "ss-s3cr3t"),
        ("failed: postgresql://u:pa/s3cr3t@h:5432/db, retrying", "s3cr3t"),
        ("host=a password=se s3cr3t port=1", "s3cr3t"),
        ("host=a password='se s3cr3t' port=1", "s3cr3t"),
        ("host=a password='s3cr3t", "s3cr3t"),
        ("host=a PASSWORD = s3cr3t", "s3cr3t"),
        ("a DSN that ends password=s3cr3t\nnext line", "s3cr3t"),
    ],
)
def test_redaction_hides_a_malformed_password(text: str, hidden: str) -> None:
    assert hidden not in redact(text)
    assert hidden not in redact_url(text)


def test_redaction_keeps_what_follows_an_already_masked_password() -> None:
    text = "cannot connect to the database at host=h password=***: connection refused"
    assert redact(text) == text
    assert redact("postgresql://u:***@h/db") == "postgresql://u:***@h/db"


def test_one_configured_url_hides_everything_up_to_its_last_at() -> None:
    assert redact_url("postgresql://u:p a@s s@host/db") == "postgresql://u:***@host/db"
    with pytest.raises(ConfigError) as refused:
        check_url("CONVEYOR_DATABASE_URL", "postgresql://u:p@ss@host/db")
    assert "%40" in str(refused.value) and "ss@" not in str(refused.value)


def test_parse_duration_never_returns_infinity() -> None:
    with pytest.raises(ValueError):
        parse_duration("9" * 400 + "w")


@pytest.mark.parametrize(
    ("output", "reason"),
    [
        ([1, 2], "a value of type list, not a JSON object"),
        ("text", "a value of type str"),
        (7, "a value of type int"),
        (None, "returned None"),
        (object(), "a value of type object"),
        ({"x": {1, 2}}, "not JSON serializable"),
        ({"x": math.nan}, "Out of range float values"),
        ({"x": -math.inf}, "Out of range float values"),
        ({1: "a"}, "a key of type int"),
        ({None: "a"}, "a key of type NoneType"),
        ({"x": "a\x00b"}, "NUL character"),
    ],
)
def test_an_output_that_is_not_a_json_object_is_one_clear_line(output: Any, reason: str) -> None:
    with pytest.raises(OutputError) as refused:
        output_json("emit", output)
    message = str(refused.value)
    assert message.startswith("stage 'emit' returned ") and reason in message
    assert "\n" not in message


def test_outputs_too_deep_or_cyclic_are_refused_without_recursion_errors() -> None:
    deep: dict[str, Any] = {}
    node = deep
    for _ in range(100_000):
        node["a"] = {}
        node = node["a"]
    cycle: dict[str, Any] = {}
    cycle["self"] = cycle
    for output, reason in ((deep, "nested too deeply"), (cycle, "Circular reference")):
        with pytest.raises(OutputError, match=reason):
            output_json("emit", output)
    assert (
        output_json("emit", {"text": "\\u0000 is text here"})
        == '{"text": "\\\\u0000 is text here"}'
    )


@pytest.mark.parametrize(
    ("run_input", "reason"),
    [
        ({"q": f"a{BAD_UTF8}"}, "not valid Unicode"),
        ({"q": math.nan}, "not JSON-serialisable"),
        ([1], "must be a JSON object"),
    ],
)
def test_a_run_input_jsonb_refuses_is_a_submit_error(run_input: Any, reason: str) -> None:
    with pytest.raises(SubmitError, match=reason):
        _input_json(run_input)


def test_stored_json_too_deep_for_python_reads_as_its_text() -> None:
    text = '{"q": ' + "[" * 5000 + "]" * 5000 + "}"
    loaded = _load_json(text.encode())
    assert isinstance(loaded, DeepJSON) and loaded.text == text
    assert isinstance(_load_json("[" * 150 + "]" * 150), DeepJSON)  # too deep to print safely
    assert _load_json('{"a": [[1]], "b": "[[[[["}') == {"a": [[1]], "b": "[[[[["}


def test_a_route_refuses_userinfo_in_its_base_url() -> None:
    with pytest.raises(ValueError, match="user:password@"):
        Route("primary", f"https://u:{SECRET}@api.example.com/v1", "sk-1")


def test_an_llm_request_that_cannot_be_sent_is_a_clean_failure_without_the_key() -> None:
    key = f"sk-{SECRET}"
    run = Run(uuid.uuid4(), f"p{uuid.uuid4().hex[:8]}", "answer", {}, {}, 1)
    for base_url in ("http://127.0.0.1:99999/v1", "http://127.0.0.1:9/v1"):  # invalid; refused
        router = Router(
            LLMConfig(
                primary=Route("primary", base_url, key),
                models={"answer": "m"},
                max_retries=0,
                timeout_seconds=5,
            )
        )
        with pytest.raises(LLMUnavailable) as failed:
            asyncio.run(router.chat(run, [{"role": "user", "content": "hi"}]))
        assert SECRET not in str(failed.value) and "\n" not in str(failed.value)


def test_an_empty_output_is_an_empty_object_and_a_dict_subclass_is_checked() -> None:
    class Ordered(dict[Any, Any]):
        pass

    assert output_json("emit", {}) == "{}"
    assert output_json("emit", Ordered(a=1)) == '{"a": 1}'
    with pytest.raises(OutputError, match="a key of type int"):
        output_json("emit", Ordered({1: "a"}))
