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

from conveyor.db import DatabaseUnavailable, redact
from conveyor.settings import ConfigError

F = TypeVar("F", bound=Callable[..., Any])
EXIT_USAGE = 2


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
