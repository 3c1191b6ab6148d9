"""The agents of the reference pipeline: analyzer, context assembler and answerer over `memory`.

Stage handlers on conveyor's public API. With no model configured they run offline and
deterministic; environment variables (see conveyor.agents.config) route them to an
OpenAI-compatible LLM and embeddings endpoint.
"""

from __future__ import annotations

from typing import Any

from conveyor import Pipeline, Stage
from conveyor.agents.analyze import SKIP_RETRIEVAL, Analyzer
from conveyor.agents.answer import Answerer
from conveyor.agents.assemble import Assembler
from conveyor.agents.config import AgentConfig
from conveyor.agents.llm import Embedder, Router

# The stages that may call a chat model (CONVEYOR_<STAGE>_MODEL); assemble uses embeddings.
MODEL_STAGES = ("analyze", "answer")


def question_input(text: str, session: str | None = None) -> dict[str, Any]:
    """A run's input from a line of text (`conveyor submit TEXT [--session S]`): the question,
    and the session whose memory follow-up questions share."""
    return {"question": text} if not session else {"question": text, "session_id": session}


def build_pipeline(config: AgentConfig, name: str) -> Pipeline:
    """NEW -> ANALYZED -> CONTEXT_READY -> DONE, with the agents as handlers; a question with
    nothing to search for, or one asking for the last answer again, goes from NEW to
    CONTEXT_READY. These statuses are the product's
    contract: outside services insert at NEW and watch for DONE."""
    router = Router(config.llm) if config.llm.models else None
    embedder = Embedder(config.embeddings, config.llm) if config.embeddings else None
    return Pipeline(
        name,
        [
            Stage(
                "analyze",
                Analyzer(config, router),
                consumes="NEW",
                working="ANALYZING",
                produces="ANALYZED",
                routes=[SKIP_RETRIEVAL],  # nothing to search: straight to the answer
                limits=router.limits_for("analyze") if router else (),
            ),
            Stage(
                "assemble",
                Assembler(config, embedder),
                consumes="ANALYZED",
                working="ASSEMBLING",
                produces="CONTEXT_READY",
            ),
            Stage(
                "answer",
                Answerer(config, router, embedder),
                consumes="CONTEXT_READY",
                working="ANSWERING",
                produces="DONE",
                limits=router.limits_for("answer") if router else (),
            ),
        ],
        text_input=question_input,
    )


def config_from_env() -> AgentConfig:
    return AgentConfig.from_env(model_stages=MODEL_STAGES)


__all__ = ["MODEL_STAGES", "AgentConfig", "build_pipeline", "config_from_env", "question_input"]
