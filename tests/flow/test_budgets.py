"""Token budgets, read from the tokens already recorded in run_events: a run's own, and a
group's per day."""

from __future__ import annotations

import asyncio
import uuid

import pytest
from psycopg_pool import AsyncConnectionPool

from conveyor import BudgetExceeded, Pipeline, Run, Stage
from conveyor.flow_control import FlowControl
from conveyor.settings import Settings
from tests.helpers import fetch_all


async def _noop(run: Run) -> dict[str, object]:
    return {}


PIPELINE = Pipeline(
    "budgets",
    [Stage("call", _noop, "NEW", "DONE", group_by="tenant", group_tokens_per_day=1000)],
)


def _record(url: str, tenant: str, tokens: int, when: str = "now()") -> uuid.UUID:
    [(run_id,)] = fetch_all(
        url,
        "INSERT INTO conveyor.pipeline_runs (pipeline, input) VALUES ('budgets', %s::jsonb)"
        " RETURNING id",
        (f'{{"tenant": "{tenant}"}}',),
    )
    fetch_all(
        url,
        "INSERT INTO conveyor.run_events (run_id, pipeline, stage, to_status, prompt_tokens,"
        f" completion_tokens, created_at) VALUES (%s, 'budgets', 'call', 'DONE', %s, 0, {when})"
        " RETURNING id",
        (run_id, tokens),
    )
    return run_id  # type: ignore[no-any-return]


def test_a_groups_daily_budget_counts_todays_tokens_of_its_runs(database_url: str) -> None:
    _record(database_url, "acme", 600)
    _record(database_url, "acme", 300)
    _record(database_url, "acme", 5000, when="now() - interval '1 day 1 hour'")  # yesterday
    _record(database_url, "other", 5000)
    spent_run = _record(database_url, "solo", 50)

    async def scenario() -> list[str]:
        refused = []
        async with AsyncConnectionPool(
            database_url, kwargs={"autocommit": True}, open=False
        ) as pool:
            flow = FlowControl(
                pool,
                settings=Settings(),
                pipeline=PIPELINE,
                stage=PIPELINE.stages[0],
                channel="c",
            )
            await flow.check_budget(uuid.uuid4(), {"tenant": "acme"}, 90, recorded=0)
            for run_id, run_input, tokens, recorded in (
                (uuid.uuid4(), {"tenant": "acme"}, 90, 20),  # 900 + 20 + 90 > 1000
                (spent_run, {"tenant": "solo", "token_budget": 100}, 60, 0),  # 50 + 60 > 100
                (uuid.uuid4(), {"token_budget": True}, 1, 0),
            ):
                with pytest.raises(BudgetExceeded) as raised:
                    await flow.check_budget(run_id, run_input, tokens, recorded)
                refused.append(str(raised.value))
            await flow.check_budget(spent_run, {"tenant": "solo", "token_budget": 100}, 50, 0)
        return refused

    refused = asyncio.run(scenario())
    assert refused == [
        "daily token budget of tenant 'acme', 1,000: 920 spent today (UTC), and this call"
        " needs about 90",
        "run token budget 100: 50 spent, and this call needs about 60",
        "token_budget must be a whole number >= 0, not True",
    ]
