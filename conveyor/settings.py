"""One typed settings object, read from the environment. A bad value names its variable."""

from __future__ import annotations

import ipaddress
import math
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from conveyor.event_loop import EVENT_LOOPS
from conveyor.limits import (
    MAX_IN_FLIGHT,
    MAX_REQUESTS_PER_MINUTE,
    MAX_TOKENS_PER_DAY,
    MAX_TOKENS_PER_MINUTE,
    MIN_PER_MINUTE,
)
from conveyor.urls import redact_url, url_problem

DEFAULT_PIPELINE = "conveyor.reference:pipeline"
_SCHEMA_NAME = re.compile(r"^[a-z_][a-z0-9_]{0,62}$")

# Upper bounds: a value past them is a typo, and would overflow a timer or an interval later.
DAY = 86400.0
WEEK = 7 * DAY
# PostgreSQL's CHECK on a worker's registry row: no lease (or registry entry) beyond a week.
MAX_LEASE_SECONDS = WEEK
MAX_DURATION_SECONDS = 36500 * DAY  # retention, prune, a submit's delay: a century
MAX_CONCURRENCY = 10_000  # sync handlers get a thread each
MAX_ATTEMPTS = 1000
MAX_PROCESSES = 1000  # per stage, on one machine
MAX_RESCUES = 1000


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
    max_in_flight: int | None = None
    max_in_flight_per_group: int | None = None
    group_tokens_per_day: int | None = None


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
    metrics_host: str = "0.0.0.0"  # every interface: kubelet and Prometheus reach the pod's IP
    log_format: str = "auto"
    log_level: str = "info"
    # The worker, maintenance and console processes' event loop (conveyor/event_loop.py).
    event_loop: str = "uvloop"
    stage_overrides: Mapping[str, StageOverrides] = field(default_factory=dict)
    # CONVEYOR_LIMIT_<NAME>_*: NAME (limits.env_name of a key) -> field -> value, None for off.
    limit_overrides: Mapping[str, Mapping[str, float | None]] = field(default_factory=dict)

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Settings:
        env = os.environ if env is None else env
        reader = _SettingsReader(env)
        lease = reader.number("CONVEYOR_LEASE", 30.0, minimum=1.0, maximum=MAX_LEASE_SECONDS)
        return cls(
            database_url=reader.database_url("CONVEYOR_DATABASE_URL")
            or reader.database_url("DATABASE_URL"),
            listen_database_url=reader.database_url("CONVEYOR_LISTEN_DATABASE_URL"),
            schema=reader.schema("CONVEYOR_SCHEMA", "conveyor"),
            data_dir=_default_data_dir(env),
            pipeline=reader.import_path("CONVEYOR_PIPELINE", DEFAULT_PIPELINE),
            stages=reader.stages("CONVEYOR_STAGES"),
            sweep_interval=reader.number("CONVEYOR_SWEEP_INTERVAL", 5.0, minimum=0.05, maximum=DAY),
            lease=lease,
            max_rescues=reader.integer("CONVEYOR_MAX_RESCUES", 3, minimum=0, maximum=MAX_RESCUES),
            drain_timeout=reader.number("CONVEYOR_DRAIN_TIMEOUT", 20.0, minimum=0.0, maximum=DAY),
            listener_check_interval=reader.number(
                "CONVEYOR_LISTENER_CHECK_INTERVAL", 15.0, minimum=0.1, maximum=DAY
            ),
            listener_check_timeout=reader.number(
                "CONVEYOR_LISTENER_CHECK_TIMEOUT", 5.0, minimum=0.1, maximum=DAY
            ),
            retention=reader.duration("CONVEYOR_RETENTION"),
            prepared_statements=reader.choice("CONVEYOR_PREPARED_STATEMENTS", "on", ("on", "off"))
            == "on",
            metrics_port=reader.integer("CONVEYOR_METRICS_PORT", 9464, minimum=0, maximum=65535),
            metrics_host=reader.ip_address("CONVEYOR_METRICS_HOST", "0.0.0.0"),
            log_format=reader.choice("CONVEYOR_LOG_FORMAT", "auto", ("auto", "json", "console")),
            log_level=reader.choice(
                "CONVEYOR_LOG_LEVEL", "info", ("debug", "info", "warning", "error")
            ),
            event_loop=reader.choice("CONVEYOR_EVENT_LOOP", "uvloop", EVENT_LOOPS),
            limit_overrides=reader.limit_overrides(),
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
    """'90s', '30m', '12h', '7d', '2w' or plain seconds -> seconds (finite, > 0)."""
    match = _DURATION.match(text.strip().lower())
    if not match or float(match.group(1)) <= 0:
        raise ValueError(f"not a duration: {text!r}")
    seconds = float(match.group(1)) * _UNIT_SECONDS[match.group(2) or "s"]
    if not math.isfinite(seconds):  # hundreds of digits read as infinity
        raise ValueError(f"not a duration: {text!r}")
    return seconds


_STAGE_VARIABLE = re.compile(
    r"^CONVEYOR_([A-Z][A-Z0-9_]*)_"
    r"(CONCURRENCY|BATCH|TIMEOUT|MAX_ATTEMPTS|MAX_IN_FLIGHT|MAX_IN_FLIGHT_PER_GROUP"
    r"|GROUP_TOKENS_PER_DAY)$"
)
_STAGE_MINIMUM = {"MAX_IN_FLIGHT": 0}  # 0 starts nothing: the stage is paused
_STAGE_MAXIMUM = {
    "CONCURRENCY": MAX_CONCURRENCY,
    "BATCH": MAX_CONCURRENCY,  # a claim takes no more than the free slots anyway
    "MAX_ATTEMPTS": MAX_ATTEMPTS,
    "MAX_IN_FLIGHT": MAX_IN_FLIGHT,
    "MAX_IN_FLIGHT_PER_GROUP": MAX_IN_FLIGHT,
    "GROUP_TOKENS_PER_DAY": MAX_TOKENS_PER_DAY,
}
_LIMIT_VARIABLE = re.compile(r"^CONVEYOR_LIMIT_([A-Z0-9][A-Z0-9_]*?)_(MAX_IN_FLIGHT|RPM|TPM)$")
_LIMIT_FIELDS = {  # variable suffix -> (Limit field, maximum)
    "MAX_IN_FLIGHT": ("max_in_flight", float(MAX_IN_FLIGHT)),
    "RPM": ("requests_per_minute", MAX_REQUESTS_PER_MINUTE),
    "TPM": ("tokens_per_minute", MAX_TOKENS_PER_MINUTE),
}
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
        if value is None or value.strip() == "":
            return None
        if not _is_utf8(value):  # bytes that are not UTF-8 arrive as lone surrogates
            raise ConfigError(name, _shown(name, value), "expected UTF-8 text")
        return value.strip()

    def number(
        self, name: str, default: float, *, minimum: float, maximum: float | None = None
    ) -> float:
        raw = self.raw(name)
        if raw is None:
            return default
        try:
            value = float(raw)
        except ValueError:
            value = float("nan")
        top = float("inf") if maximum is None else maximum
        if not minimum <= value < float("inf") or value > top:  # NaN fails it too
            bound = f" and <= {maximum:g}" if maximum is not None else ""
            raise ConfigError(name, raw, f"expected a number of seconds >= {minimum:g}{bound}")
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


def _is_utf8(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _shown(name: str, value: str) -> str:
    """A value as an error may show it: a key or password never, a URL's password hidden."""
    if name.endswith(("_KEY", "PASSWORD")):
        return "***"
    return redact_url(value.encode("utf-8", "backslashreplace").decode())


class _SettingsReader(EnvReader):
    def duration(self, name: str) -> float | None:
        raw = self.raw(name)
        if raw is None or raw.lower() in ("off", "none", "0"):
            return None
        try:
            seconds = parse_duration(raw)
        except ValueError:
            seconds = math.inf
        if seconds > MAX_DURATION_SECONDS:
            raise ConfigError(
                name, raw, "expected a duration like 90s, 30m, 12h, 7d (or off), at most 36500d"
            )
        return seconds

    def database_url(self, name: str) -> str | None:
        raw = self.raw(name)
        if raw is None:
            return None
        problem = url_problem(raw)
        if problem is not None:
            raise ConfigError(name, redact_url(raw), problem)
        return raw

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

    def ip_address(self, name: str, default: str) -> str:
        raw = self.raw(name)
        if raw is None:
            return default
        try:
            return str(ipaddress.ip_address(raw))
        except ValueError:
            raise ConfigError(
                name, raw, "expected an IP address to listen on, e.g. 0.0.0.0, 127.0.0.1 or ::"
            ) from None

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
            if not 0 <= processes <= MAX_PROCESSES:
                raise ConfigError(
                    name,
                    raw,
                    f"expected an integer from 0 to {MAX_PROCESSES} processes for stage {stage!r}",
                )
            stages[stage] = processes
        return stages

    def limit_overrides(self) -> dict[str, dict[str, float | None]]:
        found: dict[str, dict[str, float | None]] = {}
        for variable in self.env:
            match = _LIMIT_VARIABLE.match(variable)
            raw = self.raw(variable) if match else None
            if match is None or raw is None:
                continue
            name, (field_name, top) = match.group(1), _LIMIT_FIELDS[match.group(2)]
            if raw.lower() in ("off", "none"):
                found.setdefault(name, {})[field_name] = None
                continue
            try:
                value = float(raw)
            except ValueError:
                value = math.nan
            if field_name == "max_in_flight":
                fits, accepted = (
                    0 <= value <= top and value.is_integer(),
                    f"an integer from 0 to {top:.0f}",
                )
            else:
                fits = MIN_PER_MINUTE <= value <= top
                accepted = f"a number from {MIN_PER_MINUTE:g} to {top:g}"
            if not fits:  # NaN fails it too
                raise ConfigError(variable, raw, f"expected {accepted}, or off")
            found.setdefault(name, {})[field_name] = value
        return found

    def stage_overrides(self) -> dict[str, StageOverrides]:
        found: dict[str, dict[str, float | int]] = {}
        for variable in self.env:
            match = _STAGE_VARIABLE.match(variable)
            if not match or variable in self.read:
                continue
            stage, kind = match.group(1).lower(), match.group(2)
            if self.raw(variable) is None:
                continue
            if kind == "TIMEOUT":
                value: float | int = self.number(variable, 0, minimum=0.001, maximum=WEEK)
            else:
                value = self.integer(
                    variable, 0, minimum=_STAGE_MINIMUM.get(kind, 1), maximum=_STAGE_MAXIMUM[kind]
                )
            found.setdefault(stage, {})[kind.lower()] = value
        return {stage: StageOverrides(**values) for stage, values in found.items()}  # type: ignore[arg-type]
