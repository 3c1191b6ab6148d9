"""Small, deterministic text tools shared by the offline agents: words, stems, sentences, tokens."""

from __future__ import annotations

import math
import re

_WORD = re.compile(r"[A-Za-z][A-Za-z0-9_]*(?:[-'][A-Za-z0-9_]+)*")
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z`\"'(\[*_])")
_CITATION = re.compile(r"\s*\[\d+\]")
_INLINE_MARKUP = re.compile(r"(\*\*|__|\*(?=\S)|(?<=\S)\*)")
_LIST_MARK = re.compile(r"^\s*(?:[-*+]|\d+[.)])\s+")

STOPWORDS = frozenset(
    """
    a about above after again all also am an and any are as at be because been before being
    both but by can could did do does doing done during each either else ever few for from get
    gets got had has have having he her here hers him his how i if in into is it its itself just
    let lets like may me might more most much must my no nor not now of off on once one only or
    other our ours out over own please same shall she should so some such tell than that the
    their them then there these they this those through to too under until up upon us use used
    using very via want was we were what whats when where whether which while who whom whose why
    will with within without would you your yours
    """.split()  # noqa: SIM905 - a word list reads better as text
)

# Words that make a question lean on the one before it ("what happens to *them*?").
REFERRING_WORDS = frozenset(
    "it its it's they them their those these that this he she there such same".split()  # noqa: SIM905
)


def words(text: str) -> list[str]:
    """Lower-case words, in order, as written."""
    return [w.lower() for w in _WORD.findall(text)]


def keywords(text: str) -> list[str]:
    """Content words in order of first appearance, without stopwords or repeats."""
    seen: set[str] = set()
    found = []
    for word in words(text):
        if word in STOPWORDS or len(word) < 2 or word.isdigit():
            continue
        stem = stem_word(word)
        if stem not in seen:
            seen.add(stem)
            found.append(word)
    return found


def stem_word(word: str) -> str:
    """A light suffix stripper, so that 'claims', 'claimed' and 'claiming' meet. Not Porter:
    it only needs to agree with itself."""
    w = word.lower().replace("'", "")
    if len(w) <= 3:
        return w
    if w.endswith(("ies", "ied")) and len(w) > 4:
        w = w[:-3] + "y"
    elif w.endswith("s") and not w.endswith(("ss", "us", "is")):
        w = w[:-1]
    for suffix in ("ation", "ing", "ed", "er", "ly"):
        if w.endswith(suffix) and len(w) - len(suffix) >= 3:
            w = w[: -len(suffix)]
            break
    if w.endswith("e") and len(w) > 3:
        w = w[:-1]
    if len(w) > 3 and w[-1] == w[-2] and w[-1] not in "lsz":
        w = w[:-1]  # 'running' -> 'runn' -> 'run'
    return w


def stems(text: str) -> set[str]:
    """Stems of the content words; an identifier (CONVEYOR_LLM_MODEL) also counts its parts."""
    found = set()
    for word in words(text):
        for part in (word, *word.split("_")) if "_" in word else (word,):
            if part and part not in STOPWORDS:
                found.add(stem_word(part))
    return found


def estimate_tokens(text: str) -> int:
    """About four characters per token for English text: the budget only needs to be safe and
    deterministic, not exact for any one model's tokenizer."""
    return max(1, math.ceil(len(text) / 4))


def plain(text: str) -> str:
    """Markdown down to readable prose: list marks, emphasis and citation marks removed."""
    lines = [_LIST_MARK.sub("", line) for line in text.splitlines()]
    text = " ".join(line.strip() for line in lines if line.strip())
    text = _CITATION.sub("", text)
    return _INLINE_MARKUP.sub("", text)


def paragraphs(text: str) -> list[list[str]]:
    """The sentences of each paragraph of a passage (after `plain`). A period inside a name
    (conveyor.pipeline_runs) or before a lower-case word does not end a sentence."""
    found = []
    for paragraph in re.split(r"\n\s*\n", text):
        if paragraph.lstrip().startswith("#"):
            continue  # a heading is a label, not a statement
        parts = [s.strip() for s in _SENTENCE_END.split(plain(paragraph))]
        if any(parts):
            found.append([s for s in parts if s])
    return found


def sentences(text: str) -> list[str]:
    return [sentence for paragraph in paragraphs(text) for sentence in paragraph]


def truncate_to_tokens(text: str, tokens: int) -> str:
    """The longest prefix ending at a sentence (else word) boundary within the budget."""
    limit = tokens * 4
    if len(text) <= limit:
        return text
    cut = text[:limit]
    end = max(cut.rfind(". "), cut.rfind(".\n"))
    if end > limit // 2:
        return cut[: end + 1]
    space = cut.rfind(" ")
    return (cut[:space] if space > 0 else cut).rstrip() + " ..."
