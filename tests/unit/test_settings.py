from __future__ import annotations

import pytest

from conveyor.settings import ConfigError, Settings, StageOverrides


def test_defaults_without_environment() -> None:
    settings = Settings.from_env({})
    assert settings.database_url is None
    assert settings.schema == "conveyor"
    assert settings.stages is None
    assert settings.sweep_interval == 5.0
    assert settings.event_loop == "uvloop"


def test_reads_every_variable() -> None:
    settings = Settings.from_env(
        {
            "DATABASE_URL": "postgresql://x/y",
            "CONVEYOR_SCHEMA": "jobs",
            "CONVEYOR_STAGES": "analyze=4, assemble=1,answer=2",
            "CONVEYOR_SWEEP_INTERVAL": "2.5",
            "CONVEYOR_LEASE": "60",
            "CONVEYOR_ANALYZE_CONCURRENCY": "32",
            "CONVEYOR_ANSWER_MAX_ATTEMPTS": "5",
            "CONVEYOR_ANSWER_TIMEOUT": "90",
            "CONVEYOR_LOG_FORMAT": "JSON",
            "CONVEYOR_EVENT_LOOP": "Asyncio",
        }
    )
    assert settings.database_url == "postgresql://x/y"
    assert settings.schema == "jobs"
    assert settings.stages == {"analyze": 4, "assemble": 1, "answer": 2}
    assert (settings.sweep_interval, settings.lease) == (2.5, 60.0)
    assert settings.overrides_for("analyze") == StageOverrides(concurrency=32)
    assert settings.overrides_for("answer") == StageOverrides(timeout=90.0, max_attempts=5)
    assert settings.log_format == "json"
    assert settings.event_loop == "asyncio"


def test_global_timeouts_are_not_read_as_stage_overrides() -> None:
    settings = Settings.from_env(
        {"CONVEYOR_DRAIN_TIMEOUT": "0.5", "CONVEYOR_LISTENER_CHECK_TIMEOUT": "2"}
    )
    assert (settings.drain_timeout, settings.listener_check_timeout) == (0.5, 2.0)
    assert settings.stage_overrides == {}


def test_conveyor_url_wins_over_database_url() -> None:
    env = {"DATABASE_URL": "postgresql://a/b", "CONVEYOR_DATABASE_URL": "postgresql://c/d"}
    assert Settings.from_env(env).database_url == "postgresql://c/d"


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("CONVEYOR_SWEEP_INTERVAL", "abc"),
        ("CONVEYOR_SWEEP_INTERVAL", "-1"),
        ("CONVEYOR_SWEEP_INTERVAL", "nan"),
        ("CONVEYOR_LEASE", "0"),
        ("CONVEYOR_METRICS_PORT", "70000"),
        ("CONVEYOR_SCHEMA", "Robert'); DROP TABLE"),
        ("CONVEYOR_STAGES", "analyze=two"),
        ("CONVEYOR_STAGES", "=3"),
        ("CONVEYOR_PIPELINE", "no_colon_here"),
        ("CONVEYOR_LOG_LEVEL", "loud"),
        ("CONVEYOR_ANALYZE_BATCH", "0"),
        ("CONVEYOR_ANSWER_TIMEOUT", "soon"),
    ],
)
def test_bad_value_names_its_variable(variable: str, value: str) -> None:
    with pytest.raises(ConfigError) as raised:
        Settings.from_env({variable: value})
    assert raised.value.variable == variable
    message = str(raised.value)
    assert message.startswith(f"{variable}={value!r} is invalid: expected")
    assert "\n" not in message


def test_global_timeouts_are_not_taken_for_a_stage() -> None:
    # CONVEYOR_DRAIN_TIMEOUT and CONVEYOR_LISTENER_CHECK_TIMEOUT look like CONVEYOR_<STAGE>_TIMEOUT;
    # read as stages "drain" and "listener_check" they made every command exit 2.
    settings = Settings.from_env(
        {
            "CONVEYOR_DRAIN_TIMEOUT": "20",
            "CONVEYOR_LISTENER_CHECK_TIMEOUT": "4",
            "CONVEYOR_ANSWER_TIMEOUT": "90",
        }
    )
    assert settings.drain_timeout == 20.0
    assert settings.listener_check_timeout == 4.0
    assert dict(settings.stage_overrides) == {"answer": StageOverrides(timeout=90.0)}


def test_prepared_statements_can_be_turned_off_for_a_transaction_pooler() -> None:
    assert Settings.from_env({}).prepared_statements is True
    assert Settings.from_env({"CONVEYOR_PREPARED_STATEMENTS": "off"}).prepared_statements is False
    with pytest.raises(ConfigError, match="CONVEYOR_PREPARED_STATEMENTS"):
        Settings.from_env({"CONVEYOR_PREPARED_STATEMENTS": "sometimes"})
