"""The answer stage: the answer from the assembled context, with citations, and the exchange
written back to the session's memory so that a follow-up question can use it (in the
transaction that stores the answer, through Run.write).

Through the LLM when a model is configured for the stage (told to answer only from the numbered
passages and cite them as [n]); otherwise an extractive answer: the context's sentences that best
cover the question's keywords, each followed by the passage it came from.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from conveyor import Run
from conveyor.agents import db, memory
from conveyor.agents.assemble import source_line
from conveyor.agents.config import AgentConfig
from conveyor.agents.llm import Embedder, Router
from conveyor.agents.text import paragraphs, plain, stems

MAX_WINDOW = 3  # consecutive sentences of one paragraph quoted together
MAX_ANSWER_WORDS = 130
MIN_SENTENCE_WORDS = 4
MAX_SENTENCE_WORDS = 80
# A second excerpt (from another passage) must add at least this share of the keywords' weight.
MIN_ADDED_COVERAGE = 0.3
TOPIC_WEIGHT = 0.3
_CITED = re.compile(r"\[(\d+(?:\s*,\s*\d+)*)\]")


@dataclass(frozen=True)
class Sentence:
    text: str
    stems: frozenset[str]


@dataclass(frozen=True)
class Excerpt:
    ref: int
    passage_rank: int
    paragraph: int
    start: int
    sentences: tuple[Sentence, ...]
    heading: frozenset[str] = frozenset()  # stems of the section's title

    @property
    def stems(self) -> frozenset[str]:
        return frozenset().union(*(s.stems for s in self.sentences))

    @property
    def words(self) -> int:
        return sum(len(s.text.split()) for s in self.sentences)

    @property
    def text(self) -> str:
        return " ".join(s.text for s in self.sentences)


def passage_text(passage: dict[str, Any]) -> str:
    """A passage as prose to quote: for a remembered exchange, its answer without citations."""
    content = str(passage.get("content", ""))
    if passage.get("kind") == "message" and "\nA: " in content:
        content = content.split("\nA: ", 1)[1]
    return content


def extractive_answer(
    keywords: Sequence[str], context: Sequence[dict[str, Any]], topic: Sequence[str] = ()
) -> tuple[str, list[int]]:
    """(answer, cited refs): the excerpt of the context that best covers the question.

    An excerpt is up to three consecutive sentences of one paragraph, starting at a sentence that
    contains a keyword, so that it reads as the passage meant it. Keywords weigh more the rarer
    they are in the context; a better-ranked passage and a section's opening get a small bonus.
    A second excerpt from another passage is added only when it covers much of what the first
    one missed. `topic`: keywords of the question a follow-up leans on; they weigh less."""
    own = stems(" ".join(keywords))
    wanted = own | stems(" ".join(topic))
    passages: list[_Passage] = []
    for rank, passage in enumerate(context):
        paragraphs_of = [
            [Sentence(text, frozenset(stems(text))) for text in paragraph]
            for paragraph in paragraphs(passage_text(passage))
        ]
        title = str(passage.get("heading") or "").split(" > ")[-1]
        passages.append(_Passage(rank, int(passage["ref"]), paragraphs_of, frozenset(stems(title))))
    every = [s for p in passages for paragraph in p.paragraphs for s in paragraph]
    if not wanted or not every:
        return "", []
    weight = {
        s: max(0.1, 1.0 + math.log(len(every) / (1 + sum(1 for x in every if s in x.stems))))
        * (1.0 if s in own else TOPIC_WEIGHT)
        for s in wanted
    }
    total = sum(weight.values())

    def coverage(found: frozenset[str]) -> float:
        return sum(weight[s] for s in wanted & found) / total

    def score(excerpt: Excerpt) -> float:
        lead = excerpt.sentences[0]
        matched = sum(1 for s in excerpt.sentences[1:] if wanted & s.stems)
        # Writers put the point first: a paragraph's opening is worth a little more, the more so
        # under a title that matches the question.
        opening = 0.0 if excerpt.start else (0.1 if excerpt.paragraph == 0 else 0.05)
        opening *= 1 + 2 * coverage(excerpt.heading)
        return (
            0.6 * coverage(excerpt.stems)
            + 0.3 * coverage(lead.stems)
            + 0.05 * matched
            + 0.25 / (1 + excerpt.passage_rank)
            + opening
        )

    excerpts = list(_excerpts(passages, wanted))
    if not excerpts:
        return "", []
    # On a tie the longer excerpt wins: the paragraph goes on explaining the same point.
    ranked = sorted(
        excerpts,
        key=lambda e: (-score(e), -len(e.sentences), e.passage_rank, e.paragraph, e.start),
    )
    chosen = [ranked[0]]
    for excerpt in ranked[1:]:
        added = coverage(excerpt.stems - chosen[0].stems)
        fits = chosen[0].words + excerpt.words <= MAX_ANSWER_WORDS
        if excerpt.ref != chosen[0].ref and added >= MIN_ADDED_COVERAGE and fits:
            chosen.append(excerpt)
            break
    chosen.sort(key=lambda e: (e.passage_rank, e.paragraph, e.start))
    text = " ".join(f"{e.text} [{e.ref}]" for e in chosen)
    return text, sorted({e.ref for e in chosen})


@dataclass(frozen=True)
class _Passage:
    rank: int
    ref: int
    paragraphs: list[list[Sentence]]
    heading: frozenset[str]


def _excerpts(passages: list[_Passage], wanted: set[str]) -> Iterator[Excerpt]:
    for passage in passages:
        for number, paragraph in enumerate(passage.paragraphs):
            for start, lead in enumerate(paragraph):
                if not wanted & lead.stems or not _quotable(lead):
                    continue
                taken: list[Sentence] = []
                for sentence in paragraph[start : start + MAX_WINDOW]:
                    if not _quotable(sentence):
                        break
                    if sum(len(s.text.split()) for s in taken) + len(sentence.text.split()) > (
                        MAX_ANSWER_WORDS
                    ):
                        break
                    taken.append(sentence)
                    yield Excerpt(
                        passage.ref, passage.rank, number, start, tuple(taken), passage.heading
                    )


def _quotable(sentence: Sentence) -> bool:
    count = len(sentence.text.split())
    return MIN_SENTENCE_WORDS <= count <= MAX_SENTENCE_WORDS and "```" not in sentence.text


def cited_refs(text: str, context: Sequence[dict[str, Any]]) -> list[int]:
    known = {int(c["ref"]) for c in context}
    found = {int(n) for group in _CITED.findall(text) for n in group.split(",")}
    return sorted(found & known)


_SYSTEM = (
    "You answer questions using only the numbered context passages you are given. After each "
    "statement, cite the passages it comes from as [n]. If the passages do not contain the "
    "answer, say so plainly. Be concise: a short paragraph."
)


def answer_prompt(
    question: str, context: Sequence[dict[str, Any]], history: Sequence[dict[str, Any]]
) -> list[dict[str, str]]:
    passages = []
    for passage in context:
        where = passage.get("source", "")
        if passage.get("heading"):
            where += f" - {passage['heading']}"
        passages.append(f"[{passage['ref']}] ({where})\n{passage_text(passage)}")
    conversation = "\n".join(f"Q: {h['question']}\nA: {h['answer']}" for h in reversed(history))
    user = "Context:\n\n" + ("\n\n".join(passages) if passages else "(no passages found)")
    if conversation:
        user += f"\n\nConversation so far:\n{conversation}"
    user += f"\n\nQuestion: {question}"
    return [{"role": "system", "content": _SYSTEM}, {"role": "user", "content": user}]


class Answerer:
    """The stage handler."""

    def __init__(
        self, config: AgentConfig, router: Router | None, embedder: Embedder | None
    ) -> None:
        self.config = config
        self.router = router
        self.embedder = embedder

    async def __call__(self, run: Run) -> dict[str, Any]:
        analysis = run.outputs.get("analyze") or {}
        assembled = run.outputs.get("assemble") or {}
        question = str(analysis.get("question") or run.input.get("question") or "").strip()
        context: list[dict[str, Any]] = list(assembled.get("context") or [])
        output: dict[str, Any]
        if self.router is not None and self.router.model_for(run.stage):
            messages = answer_prompt(question, context, analysis.get("history") or [])
            completion = await self.router.chat(run, messages)
            text = completion.text.strip()
            refs = cited_refs(text, context)
            output = {"answer": text, "answerer": "llm", "model": completion.model}
        else:
            text, refs = extractive_answer(
                analysis.get("keywords") or [], context, analysis.get("topic") or []
            )
            history = analysis.get("history") or []
            if not text and not context and history and history[0].get("answer"):
                # nothing was searched for ("what was that again?"): the session's last answer
                text = f"As answered earlier in this session: {history[0]['answer']}"
            if not text:
                topic = ", ".join((analysis.get("keywords") or [])[:6]) or "this question"
                text = f"Nothing in memory answers this: no passage matches {topic}."
            output = {"answer": text, "answerer": "extractive"}
        by_ref = {int(c["ref"]): c for c in context}
        output["sources"] = [source_line(by_ref[r]) for r in refs]
        output["remembered"] = await self._remember(run, analysis, question, text, output)
        return output

    async def _remember(
        self,
        run: Run,
        analysis: dict[str, Any],
        question: str,
        answer: str,
        output: dict[str, Any],
    ) -> bool:
        """Hand the exchange to the engine (Run.write): it is written to the session's memory
        in the transaction that stores this answer, so an answer that is not stored (its lease
        lost, its attempt stale) leaves no exchange behind."""
        session_id = analysis.get("session_id") or run.input.get("session_id")
        if not session_id:
            return False
        answer_text = plain(answer)
        embedding, vector_schema = None, None
        if self.embedder is not None:
            pool, schema = await db.pool()
            async with pool.connection() as conn:
                vector_schema = await memory.vector_type_schema(conn, schema)
            if vector_schema is not None:  # embedded with no connection held
                exchange = f"Q: {question}\nA: {answer_text}"
                (embedding,) = await self.embedder.embed([exchange], run=run)
        else:
            schema = db.schema()
        run.write(
            *memory.exchange_write(
                schema,
                session_id=str(session_id),
                run_id=str(run.id),
                question=question,
                answer=answer_text,
                sources=[s["source"] for s in output["sources"]],
                embedding=embedding,
                embedding_model=self.embedder.model if self.embedder else None,
                vector_schema=vector_schema,
            )
        )
        return True
