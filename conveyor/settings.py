"""One typed settings object, read from the environment. A bad value names its variable."""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

DEFAULT_PIPELINE = "conveyor.reference:pipeline"
_SCHEMA_NAME = re.compile(r"^[a-z_][a-z0-9_]{0,62}$")


class ConfigError(Exception):
    """A setting that cannot be used; the message is one line an operator can act on."""

    def __init__(self, variable: str, value: str, accepted: str) -> None:
        super().__init__(f"{variable}={value!r} is invalid: {accepted}")
        self.variable = variable


@dataclass(frozen=True)
class StageOverrides:
    """Per-stage values from CONVEYOR_<STAGE>_*; None keeps the pipeline's declaration."""

    concurrency: int | None = None
    batch: int | None = None
    timeout: float | None = None
    max_attempts: int | None = None


@dataclass(frozen=True)
class Settings:
    database_url: str | None = None
    listen_database_url: str | None = None
    schema: str = "conveyor"
    data_dir: Path = field(default_factory=lambda: _default_data_dir({}))
    pipeline: str = DEFAULT_PIPELINE
    # stage name -> processes; None means every stage of the pipeline, one process each.
    stages: dict[str, int] | None = None
    sweep_interval: float = 5.0
    lease: float = 30.0
    max_rescues: int = 3
    drain_timeout: float = 20.0
    # The LISTEN connection proves itself after this much silence, within the timeout.
    listener_check_interval: float = 15.0
    listener_check_timeout: float = 5.0
    # Server-side prepared statements; off for PgBouncer in transaction mode before 1.21.
    prepared_statements: bool = True
    # Finished runs older than this many seconds are pruned by the leader; None keeps them.
    retention: float | None = None
    metrics_port: int = 9464
    log_format: str = "auto"
    log_level: str = "info"
    stage_overrides: Mapping[str, StageOverrides] = field(default_factory=dict)

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Settings:
        env = os.environ if env is None else env
        reader = _SettingsReader(env)
        lease = reader.number("CONVEYOR_LEASE", 30.0, minimum=1.0)
        return cls(
            database_url=env.get("CONVEYOR_DATABASE_URL") or env.get("DATABASE_URL") or None,
            listen_database_url=env.get("CONVEYOR_LISTEN_DATABASE_URL") or None,
            schema=reader.schema("CONVEYOR_SCHEMA", "conveyor"),
            data_dir=_default_data_dir(env),
            pipeline=reader.import_path("CONVEYOR_PIPELINE", DEFAULT_PIPELINE),
            stages=reader.stages("CONVEYOR_STAGES"),
            sweep_interval=reader.number("CONVEYOR_SWEEP_INTERVAL", 5.0, minimum=0.05),
            lease=lease,
            max_rescues=reader.integer("CONVEYOR_MAX_RESCUES", 3, minimum=0),
            drain_timeout=reader.number("CONVEYOR_DRAIN_TIMEOUT", 20.0, minimum=0.0),
            listener_check_interval=reader.number(
                "CONVEYOR_LISTENER_CHECK_INTERVAL", 15.0, minimum=0.1
            ),
            listener_check_timeout=reader.number(
                "CONVEYOR_LISTENER_CHECK_TIMEOUT", 5.0, minimum=0.1
            ),
            retention=reader.duration("CONVEYOR_RETENTION"),
            prepared_statements=reader.choice("CONVEYOR_PREPARED_STATEMENTS", "on", ("on", "off"))
            == "on",
            metrics_port=reader.integer("CONVEYOR_METRICS_PORT", 9464, minimum=0, maximum=65535),
            log_format=reader.choice("CONVEYOR_LOG_FORMAT", "auto", ("auto", "json", "console")),
            log_level=reader.choice(
                "CONVEYOR_LOG_LEVEL", "info", ("debug", "info", "warning", "error")
            ),
            # Last: it skips the names read above (CONVEYOR_DRAIN_TIMEOUT is not stage "drain").
            stage_overrides=reader.stage_overrides(),
        )

    def overrides_for(self, stage: str) -> StageOverrides:
        return self.stage_overrides.get(stage, StageOverrides())


def _default_data_dir(env: Mapping[str, str]) -> Path:
    if env.get("CONVEYOR_DATA_DIR"):
        return Path(env["CONVEYOR_DATA_DIR"]).expanduser()
    base = env.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(base) / "conveyor"


_DURATION = re.compile(r"^(\d+(?:\.\d+)?)\s*(s|m|h|d|w)?$")
_UNIT_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


def parse_duration(text: str) -> float:
    """'90s', '30m', '12h', '7d', '2w' or plain seconds -> seconds."""
    match = _DURATION.match(text.strip().lower())
    if not match or float(match.group(1)) <= 0:
        raise ValueError(f"not a duration: {text!r}")
    return float(match.group(1)) * _UNIT_SECONDS[match.group(2) or "s"]


_STAGE_VARIABLE = re.compile(
    r"^CONVEYOR_([A-Z][A-Z0-9_]*)_(CONCURRENCY|BATCH|TIMEOUT|MAX_ATTEMPTS)$"
)
# Global settings whose names also fit the per-stage pattern: never a stage's override.


class EnvReader:
    """Reads variables from an environment: blank is unset, a bad value is a ConfigError that
    names its variable. The engine's settings and the agents' configuration both build on it."""

    def __init__(self, env: Mapping[str, str]) -> None:
        self.env = env
        self.read: set[str] = set()  # names already read as settings of their own

    def raw(self, name: str) -> str | None:
        self.read.add(name)
        value = self.env.get(name)
        return None if value is None or value.strip() == "" else value.strip()

    def number(self, name: str, default: float, *, minimum: float) -> float:
        raw = self.raw(name)
        if raw is None:
            return default
        try:
            value = float(raw)
        except ValueError:
            value = float("nan")
        if not minimum <= value < float("inf"):  # NaN fails it too
            raise ConfigError(name, raw, f"expected a number of seconds >= {minimum:g}")
        return value

    def integer(self, name: str, default: int, *, minimum: int, maximum: int | None = None) -> int:
        raw = self.raw(name)
        if raw is None:
            return default
        try:
            value = int(raw)
        except ValueError:
            value = minimum - 1
        if value < minimum or (maximum is not None and value > maximum):
            bound = f" and <= {maximum}" if maximum is not None else ""
            raise ConfigError(name, raw, f"expected an integer >= {minimum}{bound}")
        return value


class _SettingsReader(EnvReader):
    def duration(self, name: str) -> float | None:
        raw = self.raw(name)
        if raw is None or raw.lower() in ("off", "none", "0"):
            return None
        try:
            return parse_duration(raw)
        except ValueError:
            raise ConfigError(
                name, raw, "expected a duration like 90s, 30m, 12h, 7d (or off)"
            ) from None

    def choice(self, name: str, default: str, accepted: tuple[str, ...]) -> str:
        raw = self.raw(name)
        if raw is None:
            return default
        if raw.lower() not in accepted:
            raise ConfigError(name, raw, "expected one of " + ", ".join(accepted))
        return raw.lower()

    def schema(self, name: str, default: str) -> str:
        raw = self.raw(name)
        if raw is None:
            return default
        if not _SCHEMA_NAME.match(raw):
            raise ConfigError(name, raw, "expected a lower-case SQL identifier ([a-z_][a-z0-9_]*)")
        return raw

    def import_path(self, name: str, default: str) -> str:
        raw = self.raw(name)
        if raw is None:
            return default
        module, _, attribute = raw.partition(":")
        if not module or not attribute:
            raise ConfigError(name, raw, "expected an import path like 'package.module:pipeline'")
        return raw

    def stages(self, name: str) -> dict[str, int] | None:
        raw = self.raw(name)
        if raw is None:
            return None
        stages: dict[str, int] = {}
        for item in raw.split(","):
            stage, sep, count = item.strip().partition("=")
            stage = stage.strip()
            if not stage:
                raise ConfigError(
                    name, raw, "expected 'stage=processes,...' e.g. 'analyze=4,answer=2'"
                )
            try:
                processes = int(count) if sep else 1
            except ValueError:
                processes = -1
            if processes < 0:
                raise ConfigError(
                    name, raw, f"expected an integer >= 0 processes for stage {stage!r}"
                )
            stages[stage] = processes
        return stages

    def stage_overrides(self) -> dict[str, StageOverrides]:
        found: dict[str, dict[str, float | int]] = {}
        for variable in self.env:
            match = _STAGE_VARIABLE.match(variable)
            if not match or variable in self.read:
                continue
            stage, kind = match.group(1).lower(), match.group(2)
            if kind == "TIMEOUT":
                if self.raw(variable) is not None:
                    found.setdefault(stage, {})["timeout"] = self.number(variable, 0, minimum=0.001)
            elif self.raw(variable) is not None:
                found.setdefault(stage, {})[kind.lower()] = self.integer(variable, 0, minimum=1)
        return {stage: StageOverrides(**values) for stage, values in found.items()}  # type: ignore[arg-type]
