"""Loading documents into memory from outside a pipeline: `conveyor memory add` and the demo."""

from __future__ import annotations

from importlib import resources
from typing import Any

import psycopg

from conveyor.agents import memory
from conveyor.agents.config import AgentConfig
from conveyor.agents.documents import Document
from conveyor.agents.llm import Embedder, Labels

CORPUS_PACKAGE = "conveyor.agents.corpus"
_EMBED_BATCH = 64


def bundled_corpus() -> list[Document]:
    """The documentation of conveyor that ships with it, cited as corpus/<file>.md."""
    files = sorted(
        (f for f in resources.files(CORPUS_PACKAGE).iterdir() if f.name.endswith(".md")),
        key=lambda f: f.name,
    )
    return [Document(f"corpus/{f.name}", f.read_text(encoding="utf-8")) for f in files]


async def ingest(
    url: str,
    schema: str,
    documents: list[Document],
    config: AgentConfig,
    *,
    namespace: str | None = None,
) -> tuple[list[memory.Loaded], list[str]]:
    """Load documents (embedded first when an embeddings model is configured and the database
    can store vectors). Returns what happened per document, and notes for the operator."""
    namespace = namespace or config.documents_namespace
    notes: list[str] = []
    embeddings: dict[str, list[list[float]]] | None = None
    async with await psycopg.AsyncConnection.connect(url, autocommit=True) as conn:
        if config.embeddings is not None:
            if await memory.vector_type_schema(conn, schema) is None:
                notes.append(
                    f"embeddings are configured but {memory.VECTOR_UNAVAILABLE}: "
                    "documents are stored for full-text search only"
                )
            else:
                embeddings = await _embed(conn, schema, documents, config, namespace)
        loaded = await memory.add_documents(
            conn,
            schema,
            documents,
            namespace=namespace,
            embeddings=embeddings,
            embedding_model=config.embeddings.model if config.embeddings else None,
        )
    return loaded, notes


async def _embed(
    conn: psycopg.AsyncConnection[Any],
    schema: str,
    documents: list[Document],
    config: AgentConfig,
    namespace: str,
) -> dict[str, list[list[float]]]:
    """Vectors for the chunks of every document not already loaded with this model."""
    assert config.embeddings is not None
    embedder = Embedder(config.embeddings, config.llm)
    found: dict[str, list[list[float]]] = {}
    try:
        for document in documents:
            shas, models, count = await memory.loaded_state(
                conn, schema, namespace, document.source
            )
            if count and shas == {document.sha256} and models == {config.embeddings.model}:
                continue
            texts = [chunk.content for chunk in document.chunks()]
            vectors: list[list[float]] = []
            for start in range(0, len(texts), _EMBED_BATCH):
                vectors += await embedder.embed(
                    texts[start : start + _EMBED_BATCH], labels=Labels("", "memory")
                )
            found[document.source] = vectors
    finally:
        await embedder.aclose()
    return found
