"""The `conveyor` command: the group that reads the settings, with every command group added.

The top of the CLI: the commands live in conveyor/commands/ (by topic), conveyor/console/cli.py
and conveyor/commands/memory.py, all on conveyor/commands/context.py; only `python -m conveyor` and
the `conveyor` console script import this module.
"""

from __future__ import annotations

import click

from conveyor.commands import operations, runs
from conveyor.commands.context import App, fail
from conveyor.commands.memory import memory_group
from conveyor.console.cli import console_command
from conveyor.logs import configure_logging
from conveyor.settings import ConfigError, Settings


@click.group()
@click.pass_context
def cli(ctx: click.Context) -> None:
    """conveyor: multi-stage pipelines on PostgreSQL."""
    try:
        settings = Settings.from_env()
    except ConfigError as exc:
        fail(str(exc))
    configure_logging(settings.log_format, settings.log_level)
    ctx.obj = App(settings)


for command in [*operations.COMMANDS, *runs.COMMANDS, memory_group, console_command]:
    cli.add_command(command)


def main() -> None:
    cli(prog_name="conveyor")
