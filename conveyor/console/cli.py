"""`conveyor console`: the operators' web page, served by uvicorn on one socket."""

from __future__ import annotations

import click

from conveyor.commands.context import App, clear_errors, ensure_schema, pass_app
from conveyor.console.settings import DEFAULT_PORT, ConsoleSettings
from conveyor.db import listen_url


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
@pass_app
@clear_errors
def console_command(app: App, bind: str | None, allow_actions: bool, no_auth: bool) -> None:
    """The operators' web page: every stage and run, live; retry and cancel when allowed."""
    settings = ConsoleSettings.from_env(bind=bind, allow_actions=allow_actions, no_auth=no_auth)
    ensure_schema(app)
    from conveyor.console import server

    sock = server.listen(settings)
    server.serve(
        settings,
        sock,
        app.pipeline,
        app.url,
        listen_url(app.settings, app.url),
        app.settings.schema,
        app.settings.event_loop,
    )
