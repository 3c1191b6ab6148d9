"""`conveyor console`: the operators' web page, served by uvicorn on one socket."""

from __future__ import annotations

from typing import TYPE_CHECKING

import click

from conveyor.console.settings import DEFAULT_PORT, ConsoleSettings
from conveyor.db import listen_url

if TYPE_CHECKING:
    from conveyor.cli import App


@click.command("console")
@click.option(
    "--bind",
    default=None,
    help=f"HOST:PORT to listen on [env CONVEYOR_CONSOLE_BIND; default 127.0.0.1:{DEFAULT_PORT}]",
)
@click.option(
    "--allow-actions",
    is_flag=True,
    help="Allow retry and cancel from the page [env CONVEYOR_CONSOLE_ACTIONS=1].",
)
@click.option(
    "--no-auth",
    is_flag=True,
    help="Allow a non-loopback bind without CONVEYOR_CONSOLE_USER/PASSWORD "
    "(only behind a proxy that authenticates).",
)
@click.pass_obj
def console_command(app: App, bind: str | None, allow_actions: bool, no_auth: bool) -> None:
    """The operators' web page: every stage and run, live; retry and cancel when allowed."""
    from conveyor.cli import clear_errors  # here: conveyor.cli imports this module

    clear_errors(_serve)(app, bind, allow_actions, no_auth)


def _serve(app: App, bind: str | None, allow_actions: bool, no_auth: bool) -> None:
    from conveyor.cli import _ensure_schema

    settings = ConsoleSettings.from_env(bind=bind, allow_actions=allow_actions, no_auth=no_auth)
    _ensure_schema(app)
    from conveyor.console import server

    sock = server.listen(settings)
    server.serve(
        settings,
        sock,
        app.pipeline,
        app.url,
        listen_url(app.settings, app.url),
        app.settings.schema,
    )
