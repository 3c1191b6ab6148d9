"""The analyze stage: from the question (and the session's recent exchanges) work out what is
asked and what to search for: intent, keywords and search queries.

Through the LLM when a model is configured for the stage: its JSON answer is validated, a
malformed answer is asked for again, and after that the built-in analyzer answers instead and
the output says so (`fallback`). Without a model, the built-in analyzer: deterministic.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

import structlog

from conveyor import PermanentError, Route, Run
from conveyor.agents import db, memory
from conveyor.agents.config import AgentConfig
from conveyor.agents.llm import Router
from conveyor.agents.text import REFERRING_WORDS, keywords, words

log = structlog.get_logger("conveyor.agents.analyze")

MAX_KEYWORDS = 12
MAX_QUERIES = 4
JSON_TRIES = 2  # the model's first answer, and one more after telling it what was wrong
MAX_SESSION_ID_CHARS = 200
MAX_HISTORY_ANSWER_CHARS = 1000  # an earlier answer, as the analyzer's output carries it
# Words of a question that asks for the last answer again, when it has no search terms.
_REPEAT_WORDS = frozenset({"again", "repeat"})
# What the answer stage consumes: where a question that needs no retrieval goes.
SKIP_RETRIEVAL = "CONTEXT_READY"
_INTENTS = {
    "how": "how-to",
    "why": "reason",
    "what": "explanation",
    "which": "lookup",
    "who": "lookup",
    "where": "location",
    "when": "condition",
}
_YES_NO = frozenset(
    ["is", "are", "can", "does", "do", "did", "should", "will", "would", "could", "has", "have"]
)
_FOLLOW_UP_OPENERS = ("and ", "also ", "what about ", "how about ", "then ", "so ")


class InvalidQuestion(PermanentError):
    """The run's input cannot be answered; retrying will not change that."""


@dataclass(frozen=True)
class Question:
    text: str
    session_id: str | None


def read_question(run_input: dict[str, Any], max_chars: int) -> Question:
    """The question and session id from a run's input, checked: each problem has one message."""
    question = run_input.get("question")
    if question is None:
        raise InvalidQuestion('the input has no \'question\' (expected {"question": "..."})')
    if not isinstance(question, str):
        raise InvalidQuestion(f"'question' must be a string, not {type(question).__name__}")
    question = question.strip()
    if not question:
        raise InvalidQuestion("the question is empty")
    if len(question) > max_chars:
        raise InvalidQuestion(
            f"the question is {len(question)} characters; the limit is {max_chars} "
            "(CONVEYOR_MAX_QUESTION_CHARS)"
        )
    session = run_input.get("session_id")
    if session is not None:
        if not isinstance(session, str | int) or isinstance(session, bool):
            raise InvalidQuestion("'session_id' must be a string")
        session = str(session).strip()
        if not session or len(session) > MAX_SESSION_ID_CHARS:
            raise InvalidQuestion(f"'session_id' must be 1 to {MAX_SESSION_ID_CHARS} characters")
    return Question(question, session or None)


def builtin_analysis(question: str, history: list[dict[str, Any]]) -> dict[str, Any]:
    """Keywords without stopwords, an intent from the question word, and, for a question that
    leans on the previous one ("what happens to *them*?"), that question's keywords as well."""
    found = keywords(question)[:MAX_KEYWORDS]
    intent = question_intent(question)
    follow_up = bool(history) and is_follow_up(question, found)
    queries = [" ".join(found)] if found else []
    topic: list[str] = []
    if follow_up:
        topic = [k for k in keywords(history[0]["question"]) if k not in found][:6]
        if topic:
            queries.append(" ".join(found + topic))
    return {
        "intent": intent,
        "keywords": found,
        # The earlier question's keywords: searched with, but weighing less than the question's own.
        "topic": topic,
        "queries": [q for q in queries if q][:MAX_QUERIES],
        "follow_up": follow_up,
    }


def question_intent(question: str) -> str:
    """From the question word, looked for among the first words ("And how ...", "So why ...")."""
    for word in words(question)[:3]:
        if word in _INTENTS:
            return _INTENTS[word]
        if word in _YES_NO:
            return "yes-no"
    return "request"


def is_follow_up(question: str, found: list[str]) -> bool:
    lowered = question.lower().lstrip()
    return (
        any(w in REFERRING_WORDS for w in words(question))
        or lowered.startswith(_FOLLOW_UP_OPENERS)
        or len(found) <= 1
    )


class AnalysisFormatError(ValueError):
    """The model's answer is not the JSON object asked for."""


def parse_analysis(text: str) -> dict[str, Any]:
    """Validate the model's JSON: {"intent": str, "keywords": [str], "queries": [str]}."""
    body = text.strip()
    fenced = re.fullmatch(r"```(?:json)?\s*(.*?)\s*```", body, flags=re.DOTALL)
    if fenced:
        body = fenced.group(1)
    try:
        data = json.loads(body)
    except json.JSONDecodeError as exc:
        raise AnalysisFormatError(f"not JSON ({exc.msg} at character {exc.pos})") from None
    if not isinstance(data, dict):
        raise AnalysisFormatError(f"a JSON {type(data).__name__}, not an object")
    intent = data.get("intent")
    if not isinstance(intent, str) or not intent.strip() or len(intent) > 60:
        raise AnalysisFormatError("'intent' must be a short non-empty string")
    lists = {}
    for name, limit, longest in (("keywords", MAX_KEYWORDS, 60), ("queries", MAX_QUERIES, 300)):
        value = data.get(name)
        if not isinstance(value, list) or not value:
            raise AnalysisFormatError(f"'{name}' must be a non-empty list of strings")
        items = [v.strip() for v in value if isinstance(v, str) and v.strip()]
        if len(items) != len(value) or any(len(v) > longest for v in items):
            raise AnalysisFormatError(
                f"'{name}' must hold only non-empty strings of at most {longest} characters"
            )
        lists[name] = items[:limit]
    return {"intent": intent.strip(), **lists}


_SYSTEM = (
    "You are the analyzer of a question-answering pipeline over a document memory. Read the "
    "question and the conversation before it, and reply with one JSON object and nothing else: "
    '{"intent": "<a short label: how-to, explanation, reason, lookup, troubleshooting, ...>", '
    '"keywords": ["<2 to 12 search terms>"], "queries": ["<1 to 4 full-text search queries>"]}. '
    "Resolve words like 'it' or 'them' from the conversation, so that the queries stand alone."
)


class Analyzer:
    """The stage handler."""

    def __init__(self, config: AgentConfig, router: Router | None) -> None:
        self.config = config
        self.router = router

    async def __call__(self, run: Run) -> dict[str, Any] | Route:
        """The analysis; a question with nothing to search for, or one that asks for the last
        answer again ("what was that again?"), goes straight to the answer stage, past
        retrieval: the analysis carries the session's last exchange."""
        analysis = await self._analyze(run)
        asks_again = not analysis.get("keywords") and bool(
            _REPEAT_WORDS.intersection(words(str(analysis.get("question", ""))))
        )
        if not analysis.get("queries") or asks_again:
            return Route(SKIP_RETRIEVAL, {**analysis, "retrieval": "skipped: nothing to search"})
        return analysis

    async def _analyze(self, run: Run) -> dict[str, Any]:
        question = read_question(run.input, self.config.max_question_chars)
        history = await self._history(run, question)
        output: dict[str, Any] = {
            "question": question.text,
            "session_id": question.session_id,
            "history": history,
        }
        builtin = builtin_analysis(question.text, history)
        model = self.router.model_for(run.stage) if self.router else None
        if self.router is None or model is None:
            return {**output, **builtin, "analyzer": "builtin"}
        parsed, reasons = await self._ask_model(run, question.text, history)
        answered_by = run.usage.service if run.usage else None  # the model that answered
        if parsed is not None:
            return {
                **output,
                **parsed,
                "follow_up": builtin["follow_up"],
                "analyzer": "llm",
                "model": answered_by,
            }
        log.warning(
            "analyzer model gave no valid JSON; using the built-in analyzer",
            run_id=str(run.id),
            model=model,
            reasons=reasons,
        )
        fallback = {"from": "llm", "model": answered_by or model, "tries": len(reasons)}
        return {
            **output,
            **builtin,
            "analyzer": "builtin",
            "fallback": {**fallback, "reason": reasons[-1]},
        }

    async def _ask_model(
        self, run: Run, question: str, history: list[dict[str, Any]]
    ) -> tuple[dict[str, Any] | None, list[str]]:
        assert self.router is not None
        conversation = "\n".join(f"Q: {h['question']}\nA: {h['answer']}" for h in reversed(history))
        prompt = (
            f"Conversation so far:\n{conversation}\n\n" if conversation else ""
        ) + f"Question: {question}"
        messages = [{"role": "system", "content": _SYSTEM}, {"role": "user", "content": prompt}]
        reasons: list[str] = []
        for _ in range(JSON_TRIES):
            completion = await self.router.chat(run, messages, json_mode=True)
            try:
                return parse_analysis(completion.text), reasons
            except AnalysisFormatError as exc:
                reasons.append(str(exc))
                messages = [
                    *messages,
                    {"role": "assistant", "content": completion.text[:2000]},
                    {
                        "role": "user",
                        "content": f"That is not valid: {exc}. Reply with the JSON object only.",
                    },
                ]
        return None, reasons

    async def _history(self, run: Run, question: Question) -> list[dict[str, Any]]:
        """The session's latest exchanges, newest first (memory ids let the assembler cite them)."""
        if question.session_id is None or self.config.history_turns == 0:
            return []
        pool, schema = await db.pool()
        async with pool.connection() as conn:
            rows = await memory.recent_messages(
                conn,
                schema,
                memory.session_namespace(question.session_id),
                limit=self.config.history_turns,
                exclude_run_id=str(run.id),
            )
        history = []
        for row in rows:
            answer = row.content.split("\nA: ", 1)[1] if "\nA: " in row.content else row.content
            history.append(
                {
                    "memory_id": row.id,
                    "run_id": row.metadata.get("run_id"),
                    "question": row.metadata.get("question", ""),
                    "answer": answer[:MAX_HISTORY_ANSWER_CHARS],
                }
            )
        return history
