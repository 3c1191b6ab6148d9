"""What every command group shares: the context object (`App`), the one-line errors (a known
problem is one line on stderr and exit code 2, never a traceback) and option checks.

Imported by the commands of conveyor/commands/, conveyor/console/cli.py and
conveyor/commands/memory.py; conveyor/cli.py, which assembles them, imports them all.
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NoReturn, TypeVar

import click
import psycopg

from conveyor import migrate, runs
from conveyor.db import DatabaseUnavailable, connect, database_url
from conveyor.pipeline import Pipeline, PipelineError, load_pipeline
from conveyor.settings import ConfigError, Settings
from conveyor.urls import redact

F = TypeVar("F", bound=Callable[..., Any])
EXIT_USAGE = 2

Callback = Callable[[click.Context, click.Parameter, Any], Any]


@dataclass
class App:
    settings: Settings
    _pipeline: Pipeline | None = None
    _url: str | None = None

    @property
    def pipeline(self) -> Pipeline:
        if self._pipeline is None:
            self._pipeline = load_pipeline(self.settings.pipeline).with_settings(self.settings)
        return self._pipeline

    @property
    def url(self) -> str:
        if self._url is None:
            self._url = database_url(self.settings)
        return self._url

    def connect(self) -> psycopg.Connection[Any]:
        return connect(self.url, autocommit=True)

    def check_stages(self) -> dict[str, int]:
        """The processes per stage to run; an unknown stage in CONVEYOR_STAGES is an error."""
        plan = self.settings.stages or {stage.name: 1 for stage in self.pipeline.stages}
        known = [stage.name for stage in self.pipeline.stages]
        for name in plan:
            if name not in known:
                raise ConfigError(
                    "CONVEYOR_STAGES",
                    ",".join(f"{k}={v}" for k, v in plan.items()),
                    f"pipeline {self.pipeline.name!r} has no stage {name!r} "
                    f"(stages: {', '.join(known)})",
                )
        return plan


pass_app = click.make_pass_decorator(App)


def ensure_schema(app: App) -> None:
    """The embedded database migrates itself; a configured one must be migrated on purpose."""
    with app.connect() as conn:
        if migrate.is_current(conn, app.settings.schema):
            return
        if app.settings.database_url is None:
            migrate.migrate(conn, app.settings.schema)
            return
    raise DatabaseUnavailable(
        f"schema {app.settings.schema!r} is not migrated to the latest version: "
        "run `conveyor migrate` first"
    )


def fail(message: str) -> NoReturn:
    """Print `conveyor: error: <message>` on stderr and exit 2."""
    click.echo(f"conveyor: error: {message}", err=True)
    sys.exit(EXIT_USAGE)


def one_line_errors(*known: type[Exception]) -> Callable[[F], F]:
    """A decorator for commands: a bad setting, an unreachable database and the `known` errors
    end the command with one line (passwords masked) and exit code 2."""
    expected: tuple[type[Exception], ...] = (ConfigError, DatabaseUnavailable, *known)

    def decorate(command: F) -> F:
        @functools.wraps(command)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            try:
                return command(*args, **kwargs)
            except expected as exc:
                fail(redact(str(exc)))
            except psycopg.OperationalError as exc:
                lines = [line for line in str(exc).splitlines() if line.strip()]
                fail(f"database: {redact(lines[-1] if lines else '')}")

        return wrapper  # type: ignore[return-value]

    return decorate


# Known failures print one line and exit 2: no traceback for a bad setting.
clear_errors = one_line_errors(PipelineError, runs.SubmitError)


def checked_text(*, blank: bool = True, max_chars: int | None = None) -> Callback:
    """A click callback for text arguments and options: UTF-8 (bytes that are not arrive as lone
    surrogates, which PostgreSQL and JSON refuse later, with a traceback), not blank unless
    `blank`, at most `max_chars` characters."""

    def check(ctx: click.Context, param: click.Parameter, value: Any) -> Any:
        for text in value if isinstance(value, tuple) else (value,):
            if text is not None:
                _check_text(text, blank, max_chars)
        return value

    return check


def _check_text(text: str, blank: bool, max_chars: int | None) -> None:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise click.BadParameter("expected UTF-8 text (it holds bytes that are not)") from None
    if not blank and not text.strip():
        raise click.BadParameter("expected text, not an empty string")
    if max_chars is not None and len(text) > max_chars:
        raise click.BadParameter(f"expected at most {max_chars} characters")


def seconds_between(minimum: float, maximum: float) -> Callback:
    """A click callback for a float option: inf, NaN and a typo's 1e308 would end in a traceback
    (an interval or a sleep out of range) or in a wait that never ends."""

    def check(ctx: click.Context, param: click.Parameter, value: float) -> float:
        if not minimum <= value <= maximum:  # NaN fails it too
            raise click.BadParameter(
                f"expected a number of seconds from {minimum:.10g} to {maximum:.10g}, not {value:g}"
            )
        return value

    return check


PRIORITY = click.IntRange(-32768, 32767)  # smallint
