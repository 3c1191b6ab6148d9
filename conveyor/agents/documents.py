"""Documents to load into memory: files read and checked (UTF-8 text, a size limit) before
anything is written, and cut into chunks that know their source and position."""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from conveyor.agents.chunking import Chunk, chunk_document

MAX_FILE_BYTES = 5_000_000
TEXT_SUFFIXES = (".md", ".markdown", ".txt", ".rst", ".text")


class MemoryInputError(ValueError):
    """A file that cannot be loaded; nothing was written. The message names the file."""


@dataclass(frozen=True)
class Document:
    source: str
    text: str

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.text.encode()).hexdigest()

    def chunks(self) -> list[Chunk]:
        return chunk_document(self.text, self.source)


def read_documents(paths: Iterable[str | Path]) -> list[Document]:
    """Every file named, and the text files under every directory named, checked before anything
    is written: one bad file stops the whole load with a message naming it."""
    documents: list[Document] = []
    for given in paths:
        path = Path(given)
        if path.is_dir():
            files = sorted(
                p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in TEXT_SUFFIXES
            )
            if not files:
                raise MemoryInputError(
                    f"{given}: no text files ({', '.join(TEXT_SUFFIXES)}) in this directory"
                )
        elif path.is_file():
            files = [path]
        else:
            raise MemoryInputError(f"{given}: no such file or directory")
        for file in files:
            documents.append(Document(_source_name(file), read_text_file(file)))
    sources = [d.source for d in documents]
    duplicates = sorted({s for s in sources if sources.count(s) > 1})
    if duplicates:
        raise MemoryInputError(f"{duplicates[0]}: named twice")
    return documents


def read_text_file(path: Path) -> str:
    try:
        size = path.stat().st_size
        if size > MAX_FILE_BYTES:
            raise MemoryInputError(
                f"{path}: {size} bytes; the limit for one file is {MAX_FILE_BYTES}"
            )
        data = path.read_bytes()
    except OSError as exc:
        raise MemoryInputError(f"{path}: cannot be read: {exc.strerror or exc}") from None
    if b"\x00" in data:
        raise MemoryInputError(f"{path}: a binary file, not text (it contains NUL bytes)")
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise MemoryInputError(
            f"{path}: not UTF-8 text (byte 0x{data[exc.start]:02x} at offset {exc.start}, "
            f"line {line}); convert it first, e.g. iconv -f latin1 -t utf-8"
        ) from None
    if not text.strip():
        raise MemoryInputError(f"{path}: the file is empty")
    return text


def _source_name(path: Path) -> str:
    """A path as a citation shows it: relative to the working directory when it is below it."""
    resolved = path.resolve()
    try:
        return resolved.relative_to(Path.cwd()).as_posix()
    except ValueError:
        return resolved.as_posix()
