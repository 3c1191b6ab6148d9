"""The assemble stage: run the analyzer's searches against memory, de-duplicate, rank, and build a
context that fits a token budget, each passage keeping its source.

Full-text search is always there. With an embeddings model configured and pgvector in the
database, similarity search runs as well, and the ranked lists are fused by reciprocal rank
(RRF: each list adds 1/(k + rank), so agreement between lists wins over any one score).
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import structlog

from conveyor import Run
from conveyor.agents import db, memory
from conveyor.agents.config import AgentConfig
from conveyor.agents.llm import Embedder
from conveyor.agents.text import estimate_tokens, truncate_to_tokens

log = structlog.get_logger("conveyor.agents.assemble")

RRF_K = 60
PER_QUERY = 8
MIN_PASSAGE_TOKENS = 40  # a passage cut shorter than this says too little to be worth its place


@dataclass(frozen=True)
class Ranked:
    hit: memory.Hit
    score: float


def fuse(lists: Sequence[Sequence[memory.Hit]], k: int = RRF_K) -> list[Ranked]:
    """Reciprocal rank fusion of ranked lists, de-duplicated by row and by identical text.
    Ties keep the order in which the rows were first found."""
    scores: dict[int, float] = {}
    first_seen: dict[int, tuple[int, int]] = {}
    hits: dict[int, memory.Hit] = {}
    for list_index, ranked in enumerate(lists):
        for rank, hit in enumerate(ranked, start=1):
            scores[hit.id] = scores.get(hit.id, 0.0) + 1.0 / (k + rank)
            first_seen.setdefault(hit.id, (rank, list_index))
            hits.setdefault(hit.id, hit)
    order = sorted(scores, key=lambda i: (-scores[i], first_seen[i], i))
    fused: list[Ranked] = []
    seen_text: set[str] = set()
    for row_id in order:
        text = " ".join(hits[row_id].content.split()).lower()
        fingerprint = hashlib.sha1(text.encode()).hexdigest()
        if fingerprint in seen_text:
            continue
        seen_text.add(fingerprint)
        fused.append(Ranked(hits[row_id], scores[row_id]))
    return fused


def pack(ranked: Sequence[Ranked], budget: int) -> list[dict[str, Any]]:
    """Passages in rank order while they fit the token budget. One that does not fit is left out
    and smaller ones after it may still fit; the best passage alone, if too long, is cut down."""
    context: list[dict[str, Any]] = []
    used = 0
    for item in ranked:
        content = item.hit.content
        tokens = estimate_tokens(content)
        if used + tokens > budget:
            room = budget - used
            if context or room < MIN_PASSAGE_TOKENS:
                continue
            content = truncate_to_tokens(content, room)
            tokens = estimate_tokens(content)
        used += tokens
        meta = item.hit.metadata
        context.append(
            {
                "ref": len(context) + 1,
                "memory_id": item.hit.id,
                "kind": item.hit.kind,
                "namespace": item.hit.namespace,
                "source": item.hit.source,
                "position": meta.get("position"),
                "heading": meta.get("heading"),
                "line": meta.get("line"),
                "run_id": meta.get("run_id"),
                "score": round(item.score, 6),
                "tokens": tokens,
                "content": content,
            }
        )
    return context


class Assembler:
    """The stage handler."""

    def __init__(self, config: AgentConfig, embedder: Embedder | None) -> None:
        self.config = config
        self.embedder = embedder

    async def __call__(self, run: Run) -> dict[str, Any]:
        analysis = run.outputs.get("analyze") or {}
        queries = [q for q in analysis.get("queries") or [] if isinstance(q, str) and q.strip()]
        if not queries and analysis.get("keywords"):
            queries = [" ".join(analysis["keywords"])]
        session_id = analysis.get("session_id") or run.input.get("session_id")
        namespaces = [self.config.documents_namespace]
        if session_id:
            namespaces.append(memory.session_namespace(str(session_id)))

        pool, schema = await db.pool()
        retrieval = "full-text"
        vector_schema: str | None = None
        vectors: list[list[float]] = []
        if self.embedder is not None and queries:
            async with pool.connection() as conn:
                vector_schema = await memory.vector_type_schema(conn, schema)
            if vector_schema is None:
                retrieval = f"full-text (vector search off: {memory.VECTOR_UNAVAILABLE})"
                log.warning("vector search unavailable", reason=memory.VECTOR_UNAVAILABLE)
            else:
                # No connection is held while the embeddings endpoint answers.
                vectors = await self.embedder.embed(queries, run=run)
                retrieval = "full-text + vector (RRF)"
        lists: list[list[memory.Hit]] = []
        async with pool.connection() as conn:
            for query in queries:
                hits = await memory.search_text(
                    conn, schema, query, namespaces, limit=PER_QUERY, exclude_run_id=str(run.id)
                )
                lists.append(hits)
            for vector in vectors:
                assert self.embedder is not None and vector_schema is not None
                hits = await memory.search_vector(
                    conn,
                    schema,
                    vector_schema,
                    vector,
                    self.embedder.model,
                    namespaces,
                    limit=PER_QUERY,
                    exclude_run_id=str(run.id),
                )
                lists.append(hits)
            if analysis.get("follow_up") and analysis.get("history"):
                # The question leans on the last exchange: it belongs in the context even when
                # it shares no word with the new question.
                latest = analysis["history"][0].get("memory_id")
                if isinstance(latest, int):
                    lists.append(await memory.fetch(conn, schema, [latest]))
        ranked = fuse(lists)
        context = pack(ranked, self.config.context_tokens)
        return {
            "queries": queries,
            "keywords": analysis.get("keywords", []),
            "namespaces": namespaces,
            "retrieval": retrieval,
            "candidates": len(ranked),
            "budget_tokens": self.config.context_tokens,
            "tokens": sum(c["tokens"] for c in context),
            "context": context,
            "sources": [source_line(c) for c in context],
        }


def source_line(passage: dict[str, Any]) -> dict[str, Any]:
    """What a citation shows: where a passage came from, without its text."""
    keys = ("ref", "source", "heading", "position", "line", "kind", "run_id")
    return {k: passage.get(k) for k in keys if passage.get(k) is not None}
