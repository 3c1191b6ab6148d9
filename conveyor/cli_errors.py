"""The CLI's one-line errors: a known problem is one line on stderr and exit code 2, never a
traceback. Shared by `conveyor` (cli.py) and the groups it registers (the agents' `memory`),
which cannot import cli.py: it imports them."""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable
from typing import Any, NoReturn, TypeVar

import click
import psycopg

from conveyor.db import DatabaseUnavailable
from conveyor.settings import ConfigError
from conveyor.urls import redact

F = TypeVar("F", bound=Callable[..., Any])
EXIT_USAGE = 2


Callback = Callable[[click.Context, click.Parameter, Any], Any]


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
