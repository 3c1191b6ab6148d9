"""The `conveyor` command's parts: `context` (what every command group shares) below the
commands by topic (`runs`, `operations`), which conveyor/cli.py assembles into one group."""
