"""The offline pipeline's handlers over the bundled corpus: cited answers, the exchange written
back to the session, and a follow-up question that finds it."""

from __future__ import annotations

import uuid

import psycopg
import pytest

from conveyor import migrate
from conveyor.agents import build_pipeline
from conveyor.agents.analyze import InvalidQuestion
from conveyor.agents.config import AgentConfig
from conveyor.agents.ingest import bundled_corpus, ingest
from conveyor.reference import NAME
from tests.agents.conftest import run_async, run_stages
from tests.helpers import fetch_all, scalar

OFFLINE = AgentConfig()


@pytest.fixture
def corpus_db(agents_db: str) -> str:
    run_async(lambda: ingest(agents_db, "conveyor", bundled_corpus(), OFFLINE))
    return agents_db


def test_an_offline_answer_quotes_the_corpus_and_cites_it(corpus_db: str) -> None:
    pipeline = build_pipeline(OFFLINE, NAME)
    question = {"question": "How does a worker claim runs without two workers taking the same one?"}
    outputs, runs = run_async(lambda: run_stages(pipeline, question))
    analysis, assembled, answered = outputs["analyze"], outputs["assemble"], outputs["answer"]
    assert analysis["analyzer"] == "builtin" and analysis["intent"] == "how-to"
    assert assembled["retrieval"] == "full-text"
    assert assembled["context"][0]["source"] == "corpus/claims.md"
    assert 0 < assembled["tokens"] <= assembled["budget_tokens"] == 1000
    assert answered["answerer"] == "extractive"
    assert "SKIP LOCKED" in answered["answer"]
    assert answered["answer"].endswith("[1]")
    assert answered["sources"][0]["source"] == "corpus/claims.md"
    assert answered["sources"][0]["heading"] == "Claiming runs > How a worker claims runs"
    assert answered["remembered"] is False  # no session: nothing to remember for
    assert all(run.usage is None for run in runs)
    assert scalar(corpus_db, "SELECT count(*) FROM conveyor.memory WHERE kind = 'message'") == 0


def test_the_context_budget_is_kept(corpus_db: str) -> None:
    pipeline = build_pipeline(AgentConfig(context_tokens=200), NAME)
    question = {"question": "What happens to a run when its worker is killed?"}
    outputs, _ = run_async(lambda: run_stages(pipeline, question, until="assemble"))
    context = outputs["assemble"]["context"]
    assert 0 < sum(c["tokens"] for c in context) <= 200
    assert outputs["assemble"]["candidates"] > len(context)


def test_a_follow_up_in_the_same_session_uses_the_earlier_exchange(corpus_db: str) -> None:
    pipeline = build_pipeline(OFFLINE, NAME)
    first_id = uuid.uuid4()
    first = {"question": "What happens to a run when its worker is killed?", "session_id": "s-1"}
    outputs, _ = run_async(lambda: run_stages(pipeline, first, run_id=first_id))
    assert outputs["answer"]["remembered"] is True
    stored = fetch_all(
        corpus_db,
        "SELECT namespace, content, metadata->>'run_id', metadata->'cited' FROM conveyor.memory"
        " WHERE kind = 'message'",
    )
    assert len(stored) == 1
    namespace, content, run_id, cited = stored[0]
    assert (namespace, run_id, cited) == ("session:s-1", str(first_id), ["corpus/leases.md"])
    assert content.startswith("Q: What happens to a run when its worker is killed?\nA: When a")
    assert "[1]" not in content  # stored as prose; citations belong to that answer's context

    follow = {"question": "And what if it keeps dying?", "session_id": "s-1"}
    outputs, _ = run_async(lambda: run_stages(pipeline, follow))
    analysis = outputs["analyze"]
    assert analysis["follow_up"] is True
    assert [h["run_id"] for h in analysis["history"]] == [str(first_id)]
    assert analysis["topic"] == ["happens", "run", "worker", "killed"]
    earlier = [c for c in outputs["assemble"]["context"] if c["kind"] == "message"]
    assert [c["run_id"] for c in earlier] == [str(first_id)]
    assert earlier[0]["source"] == "session:s-1"
    assert "keeps dying" in outputs["answer"]["answer"]
    assert "CONVEYOR_MAX_RESCUES" in outputs["answer"]["answer"]

    # The same words in another session have no history to lean on.
    other = {"question": "And what if it keeps dying?", "session_id": "s-2"}
    outputs, _ = run_async(lambda: run_stages(pipeline, other))
    assert outputs["analyze"]["history"] == [] and outputs["analyze"]["follow_up"] is False
    assert all(c["kind"] == "document" for c in outputs["assemble"]["context"])


def test_the_exchange_is_written_once_when_the_answer_stage_runs_twice(corpus_db: str) -> None:
    pipeline = build_pipeline(OFFLINE, NAME)
    run_id = uuid.uuid4()
    question = {"question": "What does the sweep do?", "session_id": "again"}
    first, _ = run_async(lambda: run_stages(pipeline, question, run_id=run_id))
    second, _ = run_async(lambda: run_stages(pipeline, question, run_id=run_id))
    assert first["answer"]["answer"] == second["answer"]["answer"]  # deterministic
    count = "SELECT count(*) FROM conveyor.memory WHERE kind = 'message'"
    assert scalar(corpus_db, count) == 1


def test_nothing_in_memory_is_said_plainly(agents_db: str) -> None:
    outputs, _ = run_async(
        lambda: run_stages(build_pipeline(OFFLINE, NAME), {"question": "How do leases work?"})
    )
    assert outputs["assemble"]["context"] == []
    assert (
        outputs["answer"]["answer"]
        == "Nothing in memory answers this: no passage matches leases, work."
    )
    assert outputs["answer"]["sources"] == []


def test_bad_questions_fail_before_anything_is_written(agents_db: str) -> None:
    pipeline = build_pipeline(AgentConfig(max_question_chars=50), NAME)
    for bad in ({"question": ""}, {"question": "why? " * 20, "session_id": "s"}):
        with pytest.raises(InvalidQuestion):
            run_async(lambda bad=bad: run_stages(pipeline, bad))
    assert scalar(agents_db, "SELECT count(*) FROM conveyor.memory") == 0


def test_the_configured_schema_is_used(agents_db: str, monkeypatch: pytest.MonkeyPatch) -> None:
    with psycopg.connect(agents_db, autocommit=True) as conn:
        migrate.migrate(conn, "agents_b")
    monkeypatch.setenv("CONVEYOR_SCHEMA", "agents_b")
    run_async(lambda: ingest(agents_db, "agents_b", bundled_corpus(), OFFLINE))
    question = {"question": "What does the sweep do?", "session_id": "b"}
    outputs, _ = run_async(lambda: run_stages(build_pipeline(OFFLINE, NAME), question))
    assert outputs["answer"]["sources"][0]["source"] == "corpus/notifications.md"
    assert scalar(agents_db, "SELECT count(*) FROM agents_b.memory WHERE kind = 'message'") == 1
    assert scalar(agents_db, "SELECT count(*) FROM conveyor.memory") == 0


def test_a_follow_up_with_nothing_to_search_for_skips_retrieval(corpus_db: str) -> None:
    pipeline = build_pipeline(OFFLINE, NAME)
    first = {"question": "What happens to a run when its worker is killed?", "session_id": "s-2"}
    outputs, _ = run_async(lambda: run_stages(pipeline, first))
    earlier = outputs["answer"]["answer"]

    again = {"question": "What was that again?", "session_id": "s-2"}
    outputs, runs = run_async(lambda: run_stages(pipeline, again))
    assert [run.stage for run in runs] == ["analyze", "answer"]  # routed past assemble
    assert outputs["analyze"]["keywords"] == []
    assert outputs["analyze"]["retrieval"] == "skipped: nothing to search"
    answer = outputs["answer"]["answer"]
    assert answer.startswith("As answered earlier in this session: When a")
    assert earlier.replace(" [1]", "")[:60] in answer
