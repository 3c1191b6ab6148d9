"""The reference pipeline: NEW -> ANALYZED -> CONTEXT_READY -> DONE.

Its handlers are the offline defaults: deterministic, no model needed.
"""

from __future__ import annotations

import re
from typing import Any

from conveyor.pipeline import Pipeline, Run, Stage

_WORD = re.compile(r"[a-zA-Z][a-zA-Z0-9_-]+")
_STOPWORDS = frozenset(
    [
        "a",
        "an",
        "and",
        "are",
        "as",
        "at",
        "be",
        "by",
        "can",
        "do",
        "does",
        "for",
        "from",
        "how",
        "i",
        "in",
        "is",
        "it",
        "of",
        "on",
        "or",
        "so",
        "that",
        "the",
        "this",
        "to",
        "was",
        "what",
        "when",
        "where",
        "which",
        "who",
        "why",
        "will",
        "with",
        "you",
        "your",
    ]
)


def _question(run: Run) -> str:
    question = run.input.get("question")
    if not isinstance(question, str) or not question.strip():
        raise ValueError("input has no 'question' string")
    return question.strip()


async def analyze(run: Run) -> dict[str, Any]:
    question = _question(run)
    keywords = [w.lower() for w in _WORD.findall(question) if w.lower() not in _STOPWORDS]
    intent = "question" if question.endswith("?") else "request"
    return {"intent": intent, "keywords": keywords, "queries": [" ".join(keywords)]}


async def assemble(run: Run) -> dict[str, Any]:
    analysis = run.outputs.get("analyze") or {}
    keywords = analysis.get("keywords", [])
    return {"context": [], "sources": [], "keywords": keywords}


async def answer(run: Run) -> dict[str, Any]:
    question = _question(run)
    keywords = (run.outputs.get("assemble") or {}).get("keywords", [])
    text = f"No documents matched {', '.join(keywords) or 'the question'}: {question}"
    return {"answer": text, "sources": []}


pipeline = Pipeline(
    "agents",
    [
        Stage("analyze", analyze, consumes="NEW", working="ANALYZING", produces="ANALYZED"),
        Stage(
            "assemble",
            assemble,
            consumes="ANALYZED",
            working="ASSEMBLING",
            produces="CONTEXT_READY",
        ),
        Stage("answer", answer, consumes="CONTEXT_READY", working="ANSWERING", produces="DONE"),
    ],
)
