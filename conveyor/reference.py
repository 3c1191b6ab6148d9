"""The reference pipeline: NEW -> ANALYZED -> CONTEXT_READY -> DONE, run by the agents.

`NAME` is the pipeline a plain-SQL insert that names none starts (the `pipeline` column's default
in sql/001_init.sql says the same); reading it imports nothing of the agents. The pipeline itself
is built when `pipeline` (or one of its handlers) is first asked for, by `CONVEYOR_PIPELINE=
conveyor.reference:pipeline` (the default) or an import: its configuration is read from the
environment then (a bad value raises ConfigError naming the variable, so `conveyor run` stops with
exit code 2). Nothing configured: the offline defaults, deterministic, no model needed.
"""

from __future__ import annotations

import asyncio
import threading
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from conveyor.agents import AgentConfig
    from conveyor.agents.memory import Loaded
    from conveyor.pipeline import Handler, Pipeline

NAME = "agents"

# Built on first use (module __getattr__): declared here for type checkers.
config: AgentConfig
pipeline: Pipeline
analyze: Handler
assemble: Handler
answer: Handler

_BUILT = ("config", "pipeline", "analyze", "assemble", "answer")
_building = threading.Lock()


def __getattr__(attribute: str) -> Any:
    if attribute not in _BUILT:
        raise AttributeError(f"module {__name__!r} has no attribute {attribute!r}")
    with _building:
        if "pipeline" not in globals():
            from conveyor.agents import build_pipeline, config_from_env

            built_config = config_from_env()
            built = build_pipeline(built_config, NAME)
            handlers = dict(zip(_BUILT[2:], (stage.handler for stage in built.stages), strict=True))
            globals().update(config=built_config, **handlers, pipeline=built)
    return globals()[attribute]


def load_bundled_corpus(url: str, schema: str) -> tuple[list[Loaded], list[str]]:
    """Load the agents' bundled corpus (the documents `conveyor demo` asks about) into memory:
    what each document became, and notes for the operator."""
    from conveyor.agents import config_from_env
    from conveyor.agents.ingest import bundled_corpus, ingest

    return asyncio.run(ingest(url, schema, bundled_corpus(), config_from_env()))
