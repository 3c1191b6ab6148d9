"""The reference pipeline: NEW -> ANALYZED -> CONTEXT_READY -> DONE, run by the agents.

Its configuration is read from the environment when this module is imported (a bad value raises
ConfigError naming the variable, so `conveyor run` stops with exit code 2). Nothing configured:
the offline defaults, deterministic, no model needed.
"""

from __future__ import annotations

from conveyor.agents import build_pipeline, config_from_env

config = config_from_env()
pipeline = build_pipeline(config)
analyze, assemble, answer = (stage.handler for stage in pipeline.stages)
