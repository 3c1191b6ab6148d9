"""The offline agents' pure parts: chunking, ranking, the token budget, the extractive answer,
the built-in analyzer and the validation of a model's analysis. No database, no network."""

from __future__ import annotations

import pytest

from conveyor.agents.analyze import (
    AnalysisFormatError,
    InvalidQuestion,
    builtin_analysis,
    parse_analysis,
    read_question,
)
from conveyor.agents.answer import cited_refs, extractive_answer
from conveyor.agents.assemble import Ranked, fuse, pack
from conveyor.agents.chunking import chunk_document
from conveyor.agents.memory import Hit
from conveyor.agents.text import estimate_tokens, keywords, stem_word

DOC = """# Leases

A claimed run carries a lease.

## Heartbeats

While a handler runs, its worker extends the leases of all its in-flight runs.

```
UPDATE pipeline_runs SET lease_expires_at = now() + interval '30 seconds';
```

## Rescue

When a worker process is killed, its runs stay in their working status until their leases expire.
"""


def test_chunks_follow_sections_and_know_where_they_came_from() -> None:
    chunks = chunk_document(DOC, "docs/leases.md")
    assert [c.heading for c in chunks] == ["Leases", "Leases > Heartbeats", "Leases > Rescue"]
    assert [c.position for c in chunks] == [0, 1, 2]
    assert [c.line for c in chunks] == [3, 7, 15]
    assert chunks[1].content.startswith("## Heartbeats\n\n")
    assert "UPDATE pipeline_runs" in chunks[1].content  # the code block stays with its section
    assert chunks[2].metadata() == {
        "source": "docs/leases.md",
        "position": 2,
        "line": 15,
        "heading": "Leases > Rescue",
    }


def test_a_long_paragraph_is_cut_between_sentences_within_the_limit() -> None:
    sentence = "The sweep claims runs that a lost notification left behind. "
    chunks = chunk_document("# Sweep\n\n" + sentence * 60, "s.md", max_chars=400)
    assert len(chunks) > 5
    for chunk in chunks:
        body = chunk.content.removeprefix("# Sweep\n\n")
        assert len(body) <= 400
        assert body.endswith("behind.")
    text = " ".join(c.content.removeprefix("# Sweep\n\n") for c in chunks)
    assert text.count("The sweep claims") == 60


def test_plain_text_without_headings() -> None:
    chunks = chunk_document("first paragraph\n\nsecond paragraph\n", "notes.txt")
    assert len(chunks) == 1
    assert chunks[0].content == "first paragraph\n\nsecond paragraph"
    assert chunks[0].heading == ""


def test_keywords_and_stems() -> None:
    assert keywords("How does a worker claim runs without two workers taking the same one?") == [
        "worker",
        "claim",
        "runs",
        "two",
        "taking",
    ]
    assert {stem_word(w) for w in ("claims", "claimed", "claiming", "claim")} == {"claim"}
    assert stem_word("retries") == stem_word("retried") == stem_word("retry")
    assert stem_word("process") == stem_word("processes")


def _hit(i: int, content: str = "", **meta: object) -> Hit:
    return Hit(i, "default", "document", content or f"passage {i}", {"source": f"s{i}.md", **meta})


def test_rank_fusion_rewards_agreement_and_removes_duplicates() -> None:
    a, b, c, d = _hit(1), _hit(2), _hit(3), _hit(4, content="passage 1")  # d repeats a's text
    fused = fuse([[a, b, c], [c, d, a]])
    assert [r.hit.id for r in fused] == [1, 3, 2]  # found by both lists first; 4 is a's twin
    assert fused[0].score == pytest.approx(1 / 61 + 1 / 63)


def test_context_fits_the_token_budget_in_rank_order() -> None:
    big = _hit(1, "x" * 800)  # 200 tokens
    small = [_hit(i, "y" * 200) for i in (2, 3, 4)]  # 50 tokens each
    ranked = [Ranked(h, 1.0 / n) for n, h in enumerate([small[0], big, small[1], small[2]], 1)]
    context = pack(ranked, budget=160)
    assert [c["memory_id"] for c in context] == [2, 3, 4]  # the big one did not fit, the rest did
    assert [c["ref"] for c in context] == [1, 2, 3]
    assert sum(c["tokens"] for c in context) <= 160
    assert context[0]["source"] == "s2.md"


def test_the_best_passage_alone_is_cut_to_the_budget() -> None:
    text = "A sentence about leases. " * 100
    context = pack([Ranked(_hit(1, text), 1.0)], budget=100)
    assert len(context) == 1
    assert context[0]["tokens"] <= 100
    assert context[0]["content"].endswith("leases.")
    assert estimate_tokens(context[0]["content"]) == context[0]["tokens"]


CONTEXT = [
    {
        "ref": 1,
        "kind": "document",
        "heading": "Retries",
        "content": "## Retries\n\nA failed attempt is retried after a backoff. The backoff doubles "
        "with every attempt, up to 300 seconds.\n\nSomething else entirely is said here.",
    },
    {
        "ref": 2,
        "kind": "document",
        "heading": "Leases",
        "content": "## Leases\n\nWhen a worker is killed, its leases expire and its runs are "
        "rescued by another worker.",
    },
]


def test_extractive_answer_quotes_the_matching_passage_and_cites_it() -> None:
    text, refs = extractive_answer(["worker", "killed"], CONTEXT)
    assert text == (
        "When a worker is killed, its leases expire and its runs are rescued by another worker. [2]"
    )
    assert refs == [2]
    text, refs = extractive_answer(["failed", "attempt", "retried"], CONTEXT)
    assert text.startswith("A failed attempt is retried after a backoff. The backoff doubles")
    assert "Something else" not in text
    assert text.endswith("[1]") and refs == [1]


def test_extractive_answer_is_empty_when_nothing_matches() -> None:
    assert extractive_answer(["kubernetes"], CONTEXT) == ("", [])
    assert extractive_answer(["worker"], []) == ("", [])


def test_cited_refs_are_the_known_ones() -> None:
    assert cited_refs("Yes [2]. Also [1, 2] and [9].", CONTEXT) == [1, 2]


def test_builtin_analysis_of_a_question_and_of_a_follow_up() -> None:
    first = builtin_analysis("What happens to a run when its worker is killed?", [])
    assert first == {
        "intent": "explanation",
        "keywords": ["happens", "run", "worker", "killed"],
        "topic": [],
        "queries": ["happens run worker killed"],
        "follow_up": False,
    }
    history = [{"question": "What happens to a run when its worker is killed?", "answer": "..."}]
    follow = builtin_analysis("And what if it keeps dying?", history)
    assert follow["follow_up"] is True
    assert follow["keywords"] == ["keeps", "dying"]
    assert follow["topic"] == ["happens", "run", "worker", "killed"]
    assert follow["queries"] == ["keeps dying", "keeps dying happens run worker killed"]
    # A question that stands on its own is not a follow-up, even in a session.
    alone = builtin_analysis("How is a failing handler retried?", history)
    assert alone["follow_up"] is False and alone["intent"] == "how-to"


def test_model_analysis_is_validated() -> None:
    good = '```json\n{"intent": "how-to", "keywords": ["lease"], "queries": ["lease expiry"]}\n```'
    assert parse_analysis(good) == {
        "intent": "how-to",
        "keywords": ["lease"],
        "queries": ["lease expiry"],
    }
    for bad, reason in [
        ("Sure! Here you go", "not JSON"),
        ("[1, 2]", "not an object"),
        ('{"keywords": ["a"], "queries": ["a"]}', "'intent'"),
        ('{"intent": "x", "keywords": [], "queries": ["a"]}', "'keywords'"),
        ('{"intent": "x", "keywords": ["a", 3], "queries": ["a"]}', "'keywords'"),
        ('{"intent": "x", "keywords": ["a"], "queries": "a"}', "'queries'"),
    ]:
        with pytest.raises(AnalysisFormatError, match=reason):
            parse_analysis(bad)


@pytest.mark.parametrize(
    ("run_input", "message"),
    [
        ({}, "the input has no 'question'"),
        ({"question": "   "}, "the question is empty"),
        ({"question": 42}, "'question' must be a string"),
        ({"question": "x" * 2001}, "the question is 2001 characters; the limit is 2000"),
        ({"question": "ok?", "session_id": ""}, "'session_id' must be 1 to 200 characters"),
        ({"question": "ok?", "session_id": ["a"]}, "'session_id' must be a string"),
    ],
)
def test_bad_input_is_a_permanent_error_with_one_clear_message(
    run_input: dict[str, object], message: str
) -> None:
    with pytest.raises(InvalidQuestion, match=message):
        read_question(run_input, max_chars=2000)


def test_a_valid_question_and_session() -> None:
    question = read_question({"question": "  What is a lease? ", "session_id": 7}, 2000)
    assert (question.text, question.session_id) == ("What is a lease?", "7")
