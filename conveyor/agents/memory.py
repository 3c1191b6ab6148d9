"""The agents' memory: documents, exchanges and facts in the `memory` table, found by full-text
search (a GIN index) and, where pgvector and an embeddings model are there, by similarity.

Every statement names its schema through psycopg.sql; user text only ever travels as a parameter.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import psycopg
from psycopg import sql
from psycopg.rows import dict_row
from psycopg.types.json import Jsonb

from conveyor import Write
from conveyor.agents.documents import Document
from conveyor.agents.text import keywords

VECTOR_UNAVAILABLE = "the pgvector extension is not installed in this database"


@dataclass(frozen=True)
class Hit:
    id: int
    namespace: str
    kind: str
    content: str
    metadata: dict[str, Any]
    score: float = 0.0

    @property
    def source(self) -> str:
        return str(self.metadata.get("source") or f"memory:{self.id}")


@dataclass(frozen=True)
class Loaded:
    source: str
    chunks: int
    status: str  # "added", "replaced" or "unchanged"
    notes: list[str] = field(default_factory=list)


def session_namespace(session_id: str) -> str:
    return f"session:{session_id}"


def _table(schema: str) -> sql.Composed:
    return sql.SQL("{}.memory").format(sql.Identifier(schema))


# -- writing -------------------------------------------------------------------------------------


async def add_documents(
    conn: psycopg.AsyncConnection[Any],
    schema: str,
    documents: Sequence[Document],
    *,
    namespace: str = "default",
    embeddings: dict[str, list[list[float]]] | None = None,
    embedding_model: str | None = None,
) -> list[Loaded]:
    """Load documents as chunks, all in one transaction. A document already loaded with the same
    text (and the same embeddings model) is left alone; a changed one is replaced whole.

    embeddings: source -> one vector per chunk, when an embeddings model is configured."""
    results = []
    vector_schema = await vector_type_schema(conn, schema) if embeddings else None
    async with conn.transaction():
        for document in documents:
            # Two loads of the same source at once would both insert: take turns per source.
            await conn.execute(
                "SELECT pg_advisory_xact_lock(hashtext(%s))",
                (f"conveyor.memory:{schema}:{namespace}:{document.source}",),
            )
            vectors = (embeddings or {}).get(document.source) if vector_schema else None
            results.append(
                await _load_one(
                    conn, schema, namespace, document, vectors, embedding_model, vector_schema
                )
            )
            if embeddings and not vector_schema:
                results[-1].notes.append(f"stored without embeddings: {VECTOR_UNAVAILABLE}")
    return results


async def loaded_state(
    conn: psycopg.AsyncConnection[Any], schema: str, namespace: str, source: str
) -> tuple[set[str], set[str | None], int]:
    """(sha256s, embedding models, chunk count) of a source as it is in memory now."""
    query = sql.SQL(
        "SELECT metadata->>'sha256', metadata->>'embedding_model' FROM {}"
        " WHERE namespace = %s AND kind = 'document' AND metadata->>'source' = %s"
    ).format(_table(schema))
    rows = await (await conn.execute(query, (namespace, source))).fetchall()
    return {r[0] for r in rows}, {r[1] for r in rows}, len(rows)


async def _load_one(
    conn: psycopg.AsyncConnection[Any],
    schema: str,
    namespace: str,
    document: Document,
    vectors: list[list[float]] | None,
    embedding_model: str | None,
    vector_schema: str | None,
) -> Loaded:
    digest = document.sha256
    shas, models, count = await loaded_state(conn, schema, namespace, document.source)
    wanted_model = embedding_model if vectors is not None else None
    if count and shas == {digest} and (wanted_model is None or models == {wanted_model}):
        return Loaded(document.source, count, "unchanged")
    if not count:
        # The same text under another name (the file given from another directory): once is
        # enough, or every search would find it twice.
        twin = await _loaded_elsewhere(conn, schema, namespace, digest)
        if twin is not None and wanted_model is None:
            return Loaded(document.source, 0, "unchanged", [f"the same text is loaded as {twin}"])
    if count:
        await conn.execute(
            sql.SQL(
                "DELETE FROM {} WHERE namespace = %s AND kind = 'document'"
                " AND metadata->>'source' = %s"
            ).format(_table(schema)),
            (namespace, document.source),
        )
    chunks = document.chunks()
    rows: list[tuple[Any, ...]] = []
    for index, chunk in enumerate(chunks):
        metadata = {**chunk.metadata(), "sha256": digest, "chunks": len(chunks)}
        if vectors is not None and embedding_model:
            metadata["embedding_model"] = embedding_model
            rows.append((namespace, chunk.content, Jsonb(metadata), _vector_text(vectors[index])))
        else:
            rows.append((namespace, chunk.content, Jsonb(metadata)))
    if vectors is not None and vector_schema:
        insert = sql.SQL(
            "INSERT INTO {} (namespace, kind, content, metadata, embedding)"
            " VALUES (%s, 'document', %s, %s, %s::text::{}.vector)"
        ).format(_table(schema), sql.Identifier(vector_schema))
    else:
        insert = sql.SQL(
            "INSERT INTO {} (namespace, kind, content, metadata) VALUES (%s, 'document', %s, %s)"
        ).format(_table(schema))
    async with conn.cursor() as cur:
        await cur.executemany(insert, rows)
    return Loaded(document.source, len(chunks), "replaced" if count else "added")


async def _loaded_elsewhere(
    conn: psycopg.AsyncConnection[Any], schema: str, namespace: str, digest: str
) -> str | None:
    query = sql.SQL(
        "SELECT metadata->>'source' FROM {} WHERE namespace = %s AND kind = 'document'"
        " AND metadata->>'sha256' = %s LIMIT 1"
    ).format(_table(schema))
    row = await (await conn.execute(query, (namespace, digest))).fetchone()
    return str(row[0]) if row else None


def exchange_write(
    schema: str,
    *,
    session_id: str,
    run_id: str,
    question: str,
    answer: str,
    sources: list[str],
    embedding: list[float] | None = None,
    embedding_model: str | None = None,
    vector_schema: str | None = None,
) -> Write:
    """The statement that writes one question and its answer to the session's memory, for the
    answer stage to hand to the engine (Run.write): it commits with the stage's output, and only
    then. Once per run: the same run's exchange written again does nothing. The embedding is
    stored where pgvector's `vector` type is (`vector_schema`, see vector_type_schema)."""
    metadata: dict[str, Any] = {
        "source": session_namespace(session_id),
        "session_id": session_id,
        "run_id": run_id,
        "question": question,
        "cited": sources,
    }
    namespace, content = session_namespace(session_id), f"Q: {question}\nA: {answer}"
    once = (
        " ON CONFLICT ((metadata->>'run_id')) WHERE kind = 'message' AND metadata ? 'run_id'"
        " DO NOTHING"
    )
    if embedding is not None and vector_schema and embedding_model:
        metadata["embedding_model"] = embedding_model
        query = sql.SQL(
            "INSERT INTO {} (namespace, kind, content, metadata, embedding)"
            " VALUES (%s, 'message', %s, %s, %s::text::{}.vector)" + once
        ).format(_table(schema), sql.Identifier(vector_schema))
        return Write(query, (namespace, content, Jsonb(metadata), _vector_text(embedding)))
    query = sql.SQL(
        "INSERT INTO {} (namespace, kind, content, metadata) VALUES (%s, 'message', %s, %s)" + once
    ).format(_table(schema))
    return Write(query, (namespace, content, Jsonb(metadata)))


# -- reading -------------------------------------------------------------------------------------


def text_query(terms: str | Sequence[str]) -> str:
    """An OR query for websearch_to_tsquery from free text or keywords: a passage that matches
    more of the words ranks higher, one that matches only some is still found."""
    found = keywords(terms) if isinstance(terms, str) else keywords(" ".join(terms))
    return " or ".join(found)


async def search_text(
    conn: psycopg.AsyncConnection[Any],
    schema: str,
    query: str | Sequence[str],
    namespaces: Sequence[str],
    *,
    kinds: Sequence[str] | None = None,
    limit: int = 10,
    exclude_run_id: str | None = None,
) -> list[Hit]:
    """Full-text search (the GIN index on `search`), best first. exclude_run_id: a run's own
    exchange, which must not answer that run when its stage runs again."""
    terms = text_query(query)
    if not terms:
        return []
    statement = sql.SQL(
        "SELECT m.id, m.namespace, m.kind, m.content, m.metadata, ts_rank(m.search, q, 1)"
        "  FROM {} m, websearch_to_tsquery('english', %(terms)s) q"
        " WHERE m.namespace = ANY(%(namespaces)s) AND m.search @@ q"
        "   AND (%(kinds)s::text[] IS NULL OR m.kind = ANY(%(kinds)s::text[]))"
        "   AND (%(exclude)s::text IS NULL OR m.metadata->>'run_id' IS DISTINCT FROM %(exclude)s)"
        " ORDER BY 6 DESC, m.id"
        " LIMIT %(limit)s"
    ).format(_table(schema))
    params = {
        "terms": terms,
        "namespaces": list(namespaces),
        "kinds": list(kinds) if kinds else None,
        "limit": limit,
        "exclude": exclude_run_id,
    }
    rows = await (await conn.execute(statement, params)).fetchall()
    return [Hit(r[0], r[1], r[2], r[3], r[4], float(r[5])) for r in rows]


async def search_vector(
    conn: psycopg.AsyncConnection[Any],
    schema: str,
    vector_schema: str,
    embedding: Sequence[float],
    model: str,
    namespaces: Sequence[str],
    *,
    limit: int = 10,
    exclude_run_id: str | None = None,
) -> list[Hit]:
    """Nearest rows by cosine distance, among rows embedded by the same model."""
    vs = sql.Identifier(vector_schema)
    statement = sql.SQL(
        "SELECT m.id, m.namespace, m.kind, m.content, m.metadata,"
        "       1 - (m.embedding OPERATOR({vs}.<=>) %(v)s::text::{vs}.vector)"
        "  FROM {table} m"
        " WHERE m.namespace = ANY(%(namespaces)s) AND m.embedding IS NOT NULL"
        "   AND m.metadata->>'embedding_model' = %(model)s"
        "   AND {vs}.vector_dims(m.embedding) = %(dims)s"
        "   AND (%(exclude)s::text IS NULL OR m.metadata->>'run_id' IS DISTINCT FROM %(exclude)s)"
        " ORDER BY m.embedding OPERATOR({vs}.<=>) %(v)s::text::{vs}.vector, m.id"
        " LIMIT %(limit)s"
    ).format(table=_table(schema), vs=vs)
    params = {
        "v": _vector_text(embedding),
        "namespaces": list(namespaces),
        "model": model,
        "dims": len(embedding),
        "limit": limit,
        "exclude": exclude_run_id,
    }
    rows = await (await conn.execute(statement, params)).fetchall()
    return [Hit(r[0], r[1], r[2], r[3], r[4], float(r[5])) for r in rows]


async def recent_messages(
    conn: psycopg.AsyncConnection[Any],
    schema: str,
    namespace: str,
    *,
    limit: int,
    exclude_run_id: str | None = None,
) -> list[Hit]:
    """The session's latest exchanges, newest first."""
    if limit <= 0:
        return []
    statement = sql.SQL(
        "SELECT id, namespace, kind, content, metadata FROM {}"
        " WHERE namespace = %s AND kind = 'message'"
        "   AND (%s::text IS NULL OR metadata->>'run_id' IS DISTINCT FROM %s)"
        " ORDER BY created_at DESC, id DESC LIMIT %s"
    ).format(_table(schema))
    params = (namespace, exclude_run_id, exclude_run_id, limit)
    rows = await (await conn.execute(statement, params)).fetchall()
    return [Hit(r[0], r[1], r[2], r[3], r[4]) for r in rows]


async def fetch(conn: psycopg.AsyncConnection[Any], schema: str, ids: Sequence[int]) -> list[Hit]:
    """Rows by id, in the order asked."""
    if not ids:
        return []
    statement = sql.SQL(
        "SELECT id, namespace, kind, content, metadata FROM {} WHERE id = ANY(%s)"
    ).format(_table(schema))
    rows = await (await conn.execute(statement, (list(ids),))).fetchall()
    by_id = {r[0]: Hit(r[0], r[1], r[2], r[3], r[4]) for r in rows}
    return [by_id[i] for i in ids if i in by_id]


async def vector_type_schema(conn: psycopg.AsyncConnection[Any], schema: str) -> str | None:
    """The schema of pgvector's `vector` type when memory has an embedding column, else None."""
    async with conn.cursor(row_factory=dict_row) as cur:
        await cur.execute(
            "SELECT n.nspname AS vector_schema"
            "  FROM pg_attribute a"
            "  JOIN pg_type t ON t.oid = a.atttypid"
            "  JOIN pg_namespace n ON n.oid = t.typnamespace"
            " WHERE a.attrelid = to_regclass(%s) AND a.attname = 'embedding'"
            "   AND NOT a.attisdropped",
            (_table(schema).as_string(),),
        )
        row = await cur.fetchone()
    return str(row["vector_schema"]) if row else None


def _vector_text(vector: Sequence[float]) -> str:
    return "[" + ",".join(repr(float(x)) for x in vector) + "]"
