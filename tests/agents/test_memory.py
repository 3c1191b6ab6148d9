"""Memory on a real PostgreSQL: loading documents, full-text and vector search, write-back."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
from psycopg import conninfo, sql

from conveyor import Usage, migrate
from conveyor.agents import build_pipeline, documents, memory
from conveyor.agents.config import AgentConfig, EmbeddingsConfig, Route
from conveyor.agents.documents import Document
from conveyor.agents.ingest import bundled_corpus, ingest
from conveyor.reference import NAME
from tests.agents.conftest import run_async, run_stages
from tests.helpers import PgServer, fetch_all, scalar
from tests.llm_server import EMBEDDING_DIMENSIONS, FakeLLM, embed

LEASES = Document(
    "docs/leases.md",
    "# Leases\n\nA lease expires after thirty seconds unless a heartbeat extends it.\n\n"
    "## Rescue\n\nA run whose lease expired is rescued by another worker.\n",
)
CLAIMS = Document(
    "docs/claims.md",
    "# Claims\n\nA worker claims runs with SKIP LOCKED, so two workers never take the same run.\n",
)
OFFLINE = AgentConfig()


def load(url: str, documents: list[Document], **kwargs: str) -> list[memory.Loaded]:
    loaded, _ = run_async(lambda: ingest(url, "conveyor", documents, OFFLINE, **kwargs))
    return loaded


def search(url: str, query: str, namespaces: list[str] | None = None) -> list[memory.Hit]:
    async def go() -> list[memory.Hit]:
        async with await psycopg.AsyncConnection.connect(url, autocommit=True) as conn:
            return await memory.search_text(conn, "conveyor", query, namespaces or ["default"])

    return run_async(go)


def test_documents_are_chunked_with_source_and_position_and_loaded_once(
    database_url: str,
) -> None:
    loaded = load(database_url, [LEASES, CLAIMS])
    assert [(i.source, i.chunks, i.status) for i in loaded] == [
        ("docs/leases.md", 2, "added"),
        ("docs/claims.md", 1, "added"),
    ]
    rows = fetch_all(
        database_url,
        "SELECT namespace, kind, metadata->>'source', (metadata->>'position')::int,"
        " metadata->>'heading', metadata->>'sha256' = %s FROM conveyor.memory ORDER BY id",
        (LEASES.sha256,),
    )
    assert rows == [
        ("default", "document", "docs/leases.md", 0, "Leases", True),
        ("default", "document", "docs/leases.md", 1, "Leases > Rescue", True),
        ("default", "document", "docs/claims.md", 0, "Claims", False),
    ]
    ids = fetch_all(database_url, "SELECT id FROM conveyor.memory ORDER BY id")
    again = load(database_url, [LEASES, CLAIMS])
    assert [i.status for i in again] == ["unchanged", "unchanged"]
    assert fetch_all(database_url, "SELECT id FROM conveyor.memory ORDER BY id") == ids


def test_a_changed_document_replaces_its_old_chunks(database_url: str) -> None:
    load(database_url, [LEASES, CLAIMS])
    changed = Document(LEASES.source, "# Leases\n\nLeases now last a minute.\n")
    assert [i.status for i in load(database_url, [changed])] == ["replaced"]
    rows = fetch_all(
        database_url,
        "SELECT content FROM conveyor.memory WHERE metadata->>'source' = 'docs/leases.md'",
    )
    assert rows == [("# Leases\n\nLeases now last a minute.",)]
    assert scalar(database_url, "SELECT count(*) FROM conveyor.memory") == 2


def test_full_text_search_ranks_by_matching_words_within_namespaces(database_url: str) -> None:
    load(database_url, [LEASES, CLAIMS])
    load(database_url, [Document("other.md", "Workers claim runs elsewhere.")],
         namespace="team-b")  # fmt: skip
    hits = search(database_url, "Which worker claims a run?")
    assert [h.source for h in hits] == ["docs/claims.md", "docs/leases.md"]
    assert hits[0].score > hits[1].score
    assert hits[1].metadata["heading"] == "Leases > Rescue"  # only the chunk that matches
    assert [h.source for h in search(database_url, "claims", ["team-b"])] == ["other.md"]
    assert search(database_url, "what is the") == []  # nothing but stopwords: no search at all


def test_the_bundled_corpus_loads_idempotently(database_url: str) -> None:
    corpus = bundled_corpus()
    assert len(corpus) >= 8 and all(d.source.startswith("corpus/") for d in corpus)
    first = load(database_url, corpus)
    count = scalar(database_url, "SELECT count(*) FROM conveyor.memory")
    assert count == sum(i.chunks for i in first) > len(corpus)
    assert {i.status for i in load(database_url, corpus)} == {"unchanged"}
    assert scalar(database_url, "SELECT count(*) FROM conveyor.memory") == count


def test_unreadable_files_stop_the_whole_load_before_anything_is_written(tmp_path: Path) -> None:
    good = tmp_path / "good.md"
    good.write_text("# Good\n\nFine text.\n")
    latin = tmp_path / "latin.txt"
    latin.write_bytes("Caf\xe9 au lait\n".encode("latin-1"))
    binary = tmp_path / "blob.md"
    binary.write_bytes(b"\x00\x01\x02")
    empty = tmp_path / "empty.md"
    empty.write_text("  \n")
    with pytest.raises(documents.MemoryInputError, match=r"latin\.txt: not UTF-8 text \(byte 0xe9"):
        documents.read_documents([good, latin])
    with pytest.raises(documents.MemoryInputError, match=r"blob\.md: a binary file"):
        documents.read_documents([binary])
    with pytest.raises(documents.MemoryInputError, match=r"empty\.md: the file is empty"):
        documents.read_documents([empty])
    with pytest.raises(documents.MemoryInputError, match="no such file or directory"):
        documents.read_documents([tmp_path / "missing.md"])
    assert [d.source for d in documents.read_documents([good])] == [good.resolve().as_posix()]


def embeddings_config(server: FakeLLM) -> AgentConfig:
    return AgentConfig(embeddings=EmbeddingsConfig(Route("embeddings", server.url), "embed-16"))


def test_with_embeddings_vector_search_is_fused_with_full_text(
    agents_db: str, fake_llm: FakeLLM
) -> None:
    config = embeddings_config(fake_llm)
    run_async(lambda: ingest(agents_db, "conveyor", [LEASES, CLAIMS], config))
    dims = fetch_all(
        agents_db,
        "SELECT vector_dims(embedding), metadata->>'embedding_model' FROM conveyor.memory",
    )
    assert dims == [(EMBEDDING_DIMENSIONS, "embed-16")] * 3

    async def nearest() -> list[memory.Hit]:
        async with await psycopg.AsyncConnection.connect(agents_db, autocommit=True) as conn:
            vector_schema = await memory.vector_type_schema(conn, "conveyor")
            assert vector_schema is not None
            query = embed("two workers never take the same run")
            return await memory.search_vector(
                conn, "conveyor", vector_schema, query, "embed-16", ["default"]
            )

    assert run_async(nearest)[0].source == "docs/claims.md"
    pipeline = build_pipeline(config, NAME)
    outputs, runs = run_async(
        lambda: run_stages(pipeline, {"question": "Which worker claims runs?"}, until="assemble")
    )
    assembled = outputs["assemble"]
    assert assembled["retrieval"] == "full-text + vector (RRF)"
    assert assembled["context"][0]["source"] == "docs/claims.md"
    assert runs[1].usage == Usage("embed-16", input_units=5)
    # one call per document loaded, one for the question
    assert [r.path for r in fake_llm.requests] == ["/v1/embeddings"] * 3


def test_with_embeddings_the_exchange_is_stored_with_its_vector(
    agents_db: str, fake_llm: FakeLLM
) -> None:
    config = embeddings_config(fake_llm)
    run_async(lambda: ingest(agents_db, "conveyor", [LEASES, CLAIMS], config))
    question = {"question": "Which worker claims runs?", "session_id": "v"}
    outputs, runs = run_async(lambda: run_stages(build_pipeline(config, NAME), question))
    assert outputs["answer"]["remembered"] is True
    assert (
        runs[2].usage is not None and runs[2].usage.service == "embed-16"
    )  # the answer stage embedded the exchange
    stored = fetch_all(
        agents_db,
        "SELECT vector_dims(embedding), metadata->>'embedding_model' FROM conveyor.memory"
        " WHERE kind = 'message'",
    )
    assert stored == [(EMBEDDING_DIMENSIONS, "embed-16")]


@pytest.fixture
def database_without_pgvector(pg_server: PgServer) -> Iterator[str]:
    """A database whose owner may not create the pgvector extension (it is not trusted)."""
    name = f"conveyor_novector_{uuid.uuid4().hex[:8]}"
    role = f"conveyor_plain_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(pg_server.admin_url, autocommit=True) as conn:
        conn.execute(
            sql.SQL("CREATE ROLE {} LOGIN PASSWORD 'plain' NOSUPERUSER").format(
                sql.Identifier(role)
            )
        )
        conn.execute(
            sql.SQL("CREATE DATABASE {} OWNER {}").format(
                sql.Identifier(name), sql.Identifier(role)
            )
        )
    url = conninfo.make_conninfo(pg_server.url_for(name), user=role, password="plain")
    with psycopg.connect(url, autocommit=True) as conn:
        migrate.migrate(conn, "conveyor")
    yield url
    with psycopg.connect(pg_server.admin_url, autocommit=True) as conn:
        conn.execute(sql.SQL("DROP DATABASE {} WITH (FORCE)").format(sql.Identifier(name)))
        conn.execute(sql.SQL("DROP ROLE {}").format(sql.Identifier(role)))


def test_without_pgvector_the_migration_applies_and_full_text_still_works(
    database_without_pgvector: str, fake_llm: FakeLLM, monkeypatch: pytest.MonkeyPatch
) -> None:
    url = database_without_pgvector
    assert scalar(url, "SELECT count(*) FROM pg_extension WHERE extname = 'vector'") == 0
    columns = fetch_all(
        url,
        "SELECT column_name FROM information_schema.columns"
        " WHERE table_schema = 'conveyor' AND table_name = 'memory' AND column_name = 'embedding'",
    )
    assert columns == []
    config = embeddings_config(fake_llm)
    loaded, notes = run_async(lambda: ingest(url, "conveyor", [LEASES, CLAIMS], config))
    assert [i.status for i in loaded] == ["added", "added"]
    assert notes == [
        "embeddings are configured but the pgvector extension is not installed in this "
        "database: documents are stored for full-text search only"
    ]
    monkeypatch.setenv("CONVEYOR_DATABASE_URL", url)
    outputs, _ = run_async(
        lambda: run_stages(
            build_pipeline(config, NAME),
            {"question": "Which worker claims runs?"},
            until="assemble",
        )
    )
    assert outputs["assemble"]["retrieval"].startswith("full-text (vector search off: the pgvector")
    assert outputs["assemble"]["context"][0]["source"] == "docs/claims.md"
