"""`conveyor memory add|search`: load documents into the agents' memory and look into it.

Added to the `conveyor` group by conveyor/cli.py; it reads the settings and database from the
group's context object when there is one, else from the environment.
"""

from __future__ import annotations

import asyncio
import json

import click

from conveyor.agents import config_from_env, memory
from conveyor.agents.config import AgentConfig
from conveyor.agents.documents import Document, MemoryInputError, read_documents
from conveyor.agents.ingest import ingest
from conveyor.agents.llm import Embedder, Labels, LLMUnavailable
from conveyor.commands.context import App, checked_text, ensure_schema, one_line_errors
from conveyor.db import connect_async
from conveyor.settings import Settings

# A known problem is one line on stderr and exit code 2, never a traceback.
_clear_errors = one_line_errors(MemoryInputError, LLMUnavailable)


def _target(ctx: click.Context) -> tuple[Settings, str]:
    """The settings and database URL: the CLI group's, or read here when used on its own."""
    app = ctx.find_root().obj
    if not isinstance(app, App):
        app = App(Settings.from_env())
    ensure_schema(app)
    return app.settings, app.url


@click.group("memory")
def memory_group() -> None:
    """The agents' memory: documents, session exchanges, facts."""


@memory_group.command("add")
@click.argument("paths", nargs=-1, required=True, type=click.Path(path_type=str))
@click.option(
    "--namespace",
    callback=checked_text(blank=False, max_chars=200),
    default=None,
    help="Namespace (default CONVEYOR_MEMORY_NAMESPACE).",
)
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.pass_context
@_clear_errors
def add_command(
    ctx: click.Context, paths: tuple[str, ...], namespace: str | None, as_json: bool
) -> None:
    """Load text or markdown files (or the text files under directories) into memory.

    Every file is checked before anything is written: a file that is not UTF-8 text stops the
    whole load. A file loaded before with the same text is left as it is; a changed file
    replaces its old chunks."""
    config = config_from_env()
    documents = read_documents(paths)
    _check_names(documents)
    settings, url = _target(ctx)
    loaded, notes = asyncio.run(
        ingest(url, settings.schema, documents, config, namespace=namespace)
    )
    target = namespace or config.documents_namespace
    if as_json:
        payload = [
            {"source": i.source, "chunks": i.chunks, "status": i.status, "notes": i.notes}
            for i in loaded
        ]
        click.echo(json.dumps({"namespace": target, "documents": payload, "notes": notes}))
        return
    for note in notes:
        click.echo(f"note: {note}", err=True)
    width = max(len(i.source) for i in loaded)
    for item in loaded:
        notes_text = f" ({'; '.join(item.notes)})" if item.notes else ""
        click.echo(
            f"{item.source.ljust(width)}  {item.chunks:>4} chunks  {item.status}{notes_text}"
        )
    click.echo(f"{len(loaded)} documents in namespace {target!r}")


def _check_names(documents: list[Document]) -> None:
    """A file name that is not UTF-8 (a lone surrogate in Python) cannot be stored as a source."""
    for document in documents:
        try:
            document.source.encode("utf-8")
        except UnicodeEncodeError:
            name = document.source.encode("utf-8", "backslashreplace").decode()
            raise MemoryInputError(f"{name}: the file name is not UTF-8; rename it") from None


@memory_group.command("search")
@click.argument("query", callback=checked_text())
@click.option(
    "--namespace",
    "namespaces",
    callback=checked_text(blank=False, max_chars=200),
    multiple=True,
    help="Namespace to search; repeat for several (default CONVEYOR_MEMORY_NAMESPACE).",
)
@click.option("--limit", default=5, show_default=True, type=click.IntRange(1, 100))
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.pass_context
@_clear_errors
def search_command(
    ctx: click.Context, query: str, namespaces: tuple[str, ...], limit: int, as_json: bool
) -> None:
    """Full-text search of memory (fused with vector similarity when embeddings are set)."""
    config = config_from_env()
    settings, url = _target(ctx)
    wanted = list(namespaces) or [config.documents_namespace]
    hits, note = asyncio.run(_search(url, settings.schema, query, wanted, limit, config))
    if note:
        click.echo(f"note: {note}", err=True)
    if as_json:
        rows = [
            {
                "id": h.id,
                "namespace": h.namespace,
                "kind": h.kind,
                "score": h.score,
                "source": h.source,
                "metadata": h.metadata,
                "content": h.content,
            }
            for h in hits
        ]
        click.echo(json.dumps(rows, default=str))
        return
    if not hits:
        terms = memory.text_query(query) or "(no searchable words)"
        click.echo(f"nothing in {', '.join(wanted)} matches {terms}")
        return
    for rank, hit in enumerate(hits, start=1):
        where = hit.source
        if hit.metadata.get("position") is not None:
            where += f"#{hit.metadata['position']}"
        if hit.metadata.get("heading"):
            where += f"  {hit.metadata['heading']}"
        click.echo(f"{rank:>2}. {hit.score:.4f}  {hit.kind:<8} {where}")
        snippet = " ".join(hit.content.split())
        click.echo(f"    {snippet[:160]}{'...' if len(snippet) > 160 else ''}")


async def _search(
    url: str, schema: str, query: str, namespaces: list[str], limit: int, config: AgentConfig
) -> tuple[list[memory.Hit], str | None]:
    from conveyor.agents.assemble import fuse

    async with await connect_async(url, "conveyor-memory-search") as conn:
        text_hits = await memory.search_text(conn, schema, query, namespaces, limit=limit)
        if config.embeddings is None:
            return text_hits, None
        vector_schema = await memory.vector_type_schema(conn, schema)
        if vector_schema is None:
            return text_hits, f"full-text only: {memory.VECTOR_UNAVAILABLE}"
        embedder = Embedder(config.embeddings, config.llm)
        try:
            (vector,) = await embedder.embed([query], labels=Labels("", "memory"))
        finally:
            await embedder.aclose()
        vector_hits = await memory.search_vector(
            conn, schema, vector_schema, vector, embedder.model, namespaces, limit=limit
        )
    fused = fuse([text_hits, vector_hits])[:limit]
    return [
        memory.Hit(r.hit.id, r.hit.namespace, r.hit.kind, r.hit.content, r.hit.metadata, r.score)
        for r in fused
    ], None
