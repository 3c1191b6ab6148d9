"""Cutting a text or markdown document into chunks that fit a context, each knowing where it was.

A chunk never spans two sections: it starts with its heading, so that it reads on its own and the
heading's words count in search. Paragraphs are packed up to a size; a paragraph that is too long
is cut between sentences. Fenced code blocks stay whole unless they alone are too long.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

MAX_CHUNK_CHARS = 1200
_HEADING = re.compile(r"^(#{1,6})\s+(.+?)\s*#*\s*$")
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")


@dataclass(frozen=True)
class Chunk:
    content: str
    source: str
    position: int  # 0-based order within the document
    line: int  # 1-based line where the chunk's text starts
    heading: str = ""  # "Section > Subsection"
    extra: dict[str, Any] = field(default_factory=dict)

    def metadata(self) -> dict[str, Any]:
        found: dict[str, Any] = {
            "source": self.source,
            "position": self.position,
            "line": self.line,
        }
        if self.heading:
            found["heading"] = self.heading
        return {**found, **self.extra}


@dataclass
class _Block:
    text: str
    line: int
    headings: tuple[str, ...]


def chunk_document(text: str, source: str, *, max_chars: int = MAX_CHUNK_CHARS) -> list[Chunk]:
    blocks = _blocks(text)
    chunks: list[Chunk] = []
    pending: list[_Block] = []

    def flush() -> None:
        if not pending:
            return
        headings = pending[0].headings
        title = f"{'#' * len(headings)} {headings[-1]}\n\n" if headings else ""
        body = "\n\n".join(b.text for b in pending)
        chunks.append(
            Chunk(
                content=title + body,
                source=source,
                position=len(chunks),
                line=pending[0].line,
                heading=" > ".join(headings),
            )
        )
        pending.clear()

    for block in blocks:
        for piece in _split_long(block, max_chars):
            size = sum(len(b.text) + 2 for b in pending) + len(piece.text)
            if pending and (piece.headings != pending[0].headings or size > max_chars):
                flush()
            pending.append(piece)
    flush()
    return chunks


def _blocks(text: str) -> list[_Block]:
    """Paragraphs and code blocks with the line they start on and the headings above them."""
    blocks: list[_Block] = []
    headings: list[tuple[int, str]] = []
    current: list[str] = []
    start = 0
    in_code = False

    def end_block() -> None:
        if current and any(line.strip() for line in current):
            blocks.append(
                _Block("\n".join(current).strip("\n"), start, tuple(t for _, t in headings))
            )
        current.clear()

    for number, line in enumerate(text.splitlines(), start=1):
        if line.lstrip().startswith(("```", "~~~")):
            if not in_code:
                end_block()
                start = number
            current.append(line)
            in_code = not in_code
            if not in_code:
                end_block()
            continue
        if in_code:
            current.append(line)
            continue
        heading = _HEADING.match(line)
        if heading:
            end_block()
            level = len(heading.group(1))
            headings = [(lv, t) for lv, t in headings if lv < level] + [(level, heading.group(2))]
            continue
        if not line.strip():
            end_block()
            continue
        if not current:
            start = number
        current.append(line.rstrip())
    end_block()
    return blocks


def _split_long(block: _Block, max_chars: int) -> list[_Block]:
    if len(block.text) <= max_chars:
        return [block]
    pieces: list[_Block] = []
    current = ""
    for sentence in _SENTENCE_END.split(block.text):
        while len(sentence) > max_chars:  # one enormous "sentence": cut at a space
            cut = sentence.rfind(" ", 0, max_chars)
            cut = cut if cut > max_chars // 2 else max_chars
            if current:
                pieces.append(_Block(current, block.line, block.headings))
                current = ""
            pieces.append(_Block(sentence[:cut].strip(), block.line, block.headings))
            sentence = sentence[cut:].strip()
        if current and len(current) + 1 + len(sentence) > max_chars:
            pieces.append(_Block(current, block.line, block.headings))
            current = ""
        current = f"{current} {sentence}".strip()
    if current:
        pieces.append(_Block(current, block.line, block.headings))
    return pieces
