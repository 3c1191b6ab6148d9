"""The reference pipeline under flow control: answer processes of two `conveyor run`
supervisors share one cap on their model's key, and a 429 closes the key for all of them."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from tests.helpers import ConveyorProcess, fetch_all, scalar
from tests.llm_server import FakeLLM, Reply

Start = Callable[..., ConveyorProcess]


def _supervisors(start_conveyor: Start, fake_llm: FakeLLM, **env: str) -> None:
    settings = {
        "CONVEYOR_STAGES": "analyze=1,assemble=1,answer=3",
        "CONVEYOR_LLM_BASE_URL": fake_llm.url,
        "CONVEYOR_LLM_API_KEY": "sk-flow-test",
        "CONVEYOR_ANSWER_MODEL": "answer-model",
        "CONVEYOR_SWEEP_INTERVAL": "1",
        "CONVEYOR_LOG_LEVEL": "warning",
        **env,
    }
    start_conveyor("run", **settings)
    start_conveyor("run", **settings)


def _submit(url: str, questions: int) -> None:
    fetch_all(
        url,
        "INSERT INTO conveyor.pipeline_runs (input)"
        " SELECT jsonb_build_object('question', 'How long is lease ' || n || '?')"
        "   FROM generate_series(1, %s) n RETURNING id",
        (questions,),
    )


def _all_done(url: str, runs: int, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        done = scalar(url, "SELECT count(*) FROM conveyor.pipeline_runs WHERE status = 'DONE'")
        if done == runs:
            return
        time.sleep(0.2)
    statuses = fetch_all(url, "SELECT status, count(*) FROM conveyor.pipeline_runs GROUP BY 1")
    raise AssertionError(f"not every run DONE after {timeout:g}s: {statuses}")


def test_answer_processes_of_two_supervisors_share_a_cap_of_four(
    database_url: str, start_conveyor: Start, fake_llm: FakeLLM
) -> None:
    """Six answer processes, ten runs each at most: the model never sees more than 4 calls at
    once, and every run is DONE on its first attempt."""
    fake_llm.delay = 0.2
    _supervisors(start_conveyor, fake_llm, CONVEYOR_LIMIT_PRIMARY_ANSWER_MODEL_MAX_IN_FLIGHT="4")
    _submit(database_url, 40)
    _all_done(database_url, 40)
    assert len(fake_llm.for_model("answer-model")) == 40
    assert fake_llm.most_in_flight == 4
    limit = fetch_all(
        database_url,
        "SELECT max_in_flight FROM conveyor.limits WHERE key = 'primary:answer-model'",
    )
    assert limit == [(4,)]
    attempts = fetch_all(
        database_url,
        "SELECT attempt, count(*) FROM conveyor.run_events WHERE stage = 'answer' GROUP BY 1",
    )
    assert attempts == [(1, 40)]


def test_a_429_closes_the_models_key_for_every_answer_process(
    database_url: str, start_conveyor: Start, fake_llm: FakeLLM
) -> None:
    """A 429 with Retry-After: 2 on the first answer: no process of either supervisor calls
    the model for 2 s; then they resume, and no run spent an attempt on it."""
    fake_llm.push(
        "answer-model", Reply(status=429, body={"error": "slow down"}, headers={"Retry-After": "2"})
    )
    _supervisors(
        start_conveyor,
        fake_llm,
        CONVEYOR_LIMIT_PRIMARY_ANSWER_MODEL_MAX_IN_FLIGHT="1",
        CONVEYOR_LLM_MAX_RETRY_AFTER_SECONDS="1",  # longer waits go back in line
    )
    _submit(database_url, 6)
    _all_done(database_url, 6)
    calls = [request.at for request in fake_llm.for_model("answer-model")]
    assert len(calls) == 7  # the 429, then one call per run
    assert 2.0 <= calls[1] - calls[0] < 4.0
    throttled: list[Any] = fetch_all(
        database_url,
        "SELECT to_status, attempt, error FROM conveyor.run_events"
        " WHERE stage = 'answer' AND error IS NOT NULL",
    )
    [(to_status, attempt, error)] = throttled
    assert (to_status, attempt) == ("CONTEXT_READY", 1)
    assert error.startswith("throttled: primary:answer-model until ")
    done = fetch_all(
        database_url,
        "SELECT attempt, count(*) FROM conveyor.run_events"
        " WHERE stage = 'answer' AND to_status = 'DONE' GROUP BY 1",
    )
    assert done == [(1, 6)]


def test_a_run_whose_token_budget_is_spent_fails_before_the_call(
    database_url: str, start_conveyor: Start, fake_llm: FakeLLM
) -> None:
    """A question with a budget of 100 tokens: its answer would need more, so the router
    refuses the call before making it; the run is FAILED at once with an error naming the
    budget, and the model never sees that call. A run with room in its budget is answered."""
    _supervisors(start_conveyor, fake_llm)
    fetch_all(
        database_url,
        "INSERT INTO conveyor.pipeline_runs (input) VALUES"
        ' (\'{"question": "How long is a lease?", "token_budget": 100}\'),'
        ' (\'{"question": "How long is a rescue?", "token_budget": 100000}\') RETURNING id',
    )
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        finished = fetch_all(
            database_url,
            "SELECT input->>'token_budget', status, last_error FROM conveyor.pipeline_runs"
            " WHERE finished_at IS NOT NULL ORDER BY 1",
        )
        if len(finished) == 2:
            break
        time.sleep(0.2)
    [(small, failed, error), (large, done, _)] = finished
    assert (small, failed, large, done) == ("100", "FAILED", "100000", "DONE")
    assert "BudgetExceeded: run token budget 100: 0 spent, and this call needs about" in error
    assert len(fake_llm.for_model("answer-model")) == 1  # the answered run's call alone
    attempts = scalar(
        database_url,
        "SELECT count(*) FROM conveyor.run_events WHERE stage = 'answer' AND to_status = 'FAILED'",
    )
    assert attempts == 1  # failed at once: no retry can fit the budget
