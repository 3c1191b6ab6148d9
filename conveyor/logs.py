"""structlog configuration: JSON lines in production, console rendering on a terminal.

Context comes from contextvars: a forked child binds its pid, a worker its pipeline, stage and
worker id, and each run's task sets `current_run` (its run_id and attempt); every line logged
under them, including those of standard-library loggers (psycopg, asyncio) and of handlers,
carries them.
"""

from __future__ import annotations

import logging
import sys
from contextvars import ContextVar
from typing import Any
from uuid import UUID

import structlog
from structlog.tracebacks import ExceptionDictTransformer

from conveyor.urls import redact

_LEVELS = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warning": logging.WARNING,
    "error": logging.ERROR,
}


# The run the current task (or the handler's thread) works on: (id, attempt). One variable set
# per run, where binding run_id and attempt through structlog cost ~3 us of every run (the id's
# text included), logged or not; add_run_context makes the id's text only for a line written.
current_run: ContextVar[tuple[UUID, int] | None] = ContextVar("conveyor_run", default=None)


def add_run_context(_logger: Any, _method: str, event_dict: Any) -> Any:
    run = current_run.get()
    if run is not None:
        event_dict.setdefault("run_id", str(run[0]))
        event_dict.setdefault("attempt", run[1])
    return event_dict


def configure_logging(log_format: str = "auto", level: str = "info") -> None:
    """Configure once per process, at CLI entry: to stdout, never to files."""
    as_json = log_format == "json" or (log_format == "auto" and not sys.stdout.isatty())
    shared: list[structlog.types.Processor] = [
        structlog.contextvars.merge_contextvars,
        add_run_context,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    renderer: structlog.types.Processor = (
        structlog.processors.JSONRenderer()
        if as_json
        else _RedactedText(
            structlog.dev.ConsoleRenderer(
                colors=sys.stdout.isatty(), exception_formatter=structlog.dev.plain_traceback
            )
        )
    )
    # Structured tracebacks without local variables (a frame's locals may hold a database URL),
    # then no field may carry a password.
    exceptions: list[structlog.types.Processor] = [
        *(
            [structlog.processors.ExceptionRenderer(ExceptionDictTransformer(show_locals=False))]
            if as_json
            else []
        ),
        redact_secrets,
    ]
    structlog.configure(
        processors=[*shared, *exceptions, renderer],
        wrapper_class=structlog.make_filtering_bound_logger(_LEVELS[level]),
        # One write() per line (print() writes the newline apart): the supervisor and its workers
        # share stdout, and under PYTHONUNBUFFERED two processes' lines would otherwise merge.
        logger_factory=structlog.WriteLoggerFactory(sys.stdout),
        cache_logger_on_first_use=False,
    )
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            foreign_pre_chain=[*shared, structlog.stdlib.add_logger_name],
            processors=[
                structlog.stdlib.ProcessorFormatter.remove_processors_meta,
                *exceptions,
                renderer,
            ],
        )
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    # Libraries speak up from WARNING; their INFO chatter (connection pools, pg_ctl) only in debug.
    root.setLevel(logging.DEBUG if level == "debug" else max(_LEVELS[level], logging.WARNING))


def redact_secrets(_logger: Any, _method: str, event_dict: Any) -> Any:
    """Hide the password of any URL or DSN in any field, however deep (exception frames)."""
    return _redacted(event_dict)


def _redacted(value: Any) -> Any:
    if isinstance(value, str):
        # The cheap test first: most values hold neither a URL nor a DSN.
        return redact(value) if "://" in value or "password" in value.lower() else value
    if isinstance(value, dict):
        return {key: _redacted(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_redacted(item) for item in value]
    if isinstance(value, tuple):  # exc_info is a tuple and must stay one
        return tuple(_redacted(item) for item in value)
    return value


class _RedactedText:
    """Console rendering formats tracebacks itself: redact the finished text as well."""

    def __init__(self, renderer: Any) -> None:
        self.renderer = renderer

    def __call__(self, logger: Any, method_name: str, event_dict: Any) -> str:
        return redact(str(self.renderer(logger, method_name, event_dict)))
