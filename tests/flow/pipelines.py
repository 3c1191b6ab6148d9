"""Pipelines for the flow-control tests: one stage that calls the loopback model server
(tests/llm_server.py) under the key `fake:model`, closing the key for everyone on a 429 with
Retry-After."""

from __future__ import annotations

import asyncio
import json
import os
import urllib.error
import urllib.request
from typing import Any

from conveyor import Limit, Pipeline, Run, Stage

KEY = "fake:model"
MODEL = "flow-model"


def _post(url: str, run_id: str) -> tuple[int, dict[str, str], dict[str, Any]]:
    body = {"model": MODEL, "messages": [{"role": "user", "content": run_id}]}
    request = urllib.request.Request(url, data=json.dumps(body).encode(), method="POST")
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, dict(response.headers), json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, dict(exc.headers), {}


async def call_model(run: Run) -> dict[str, Any]:
    url = os.environ["FLOW_MODEL_URL"]
    tokens = int(os.environ.get("FLOW_TOKEN_ESTIMATE", "0"))
    reservation = await run.acquire(KEY, tokens=tokens)
    status, headers, body = await asyncio.to_thread(_post, url, str(run.id))
    if status == 429:
        retry_after = headers.get("Retry-After")
        raise await run.close_limit(
            KEY, retry_after=float(retry_after) if retry_after else None, reason="429"
        )
    if status != 200:
        raise RuntimeError(f"model answered {status}")
    await reservation.settle(int(body["usage"]["total_tokens"]))
    return {"status": status}


pipeline = Pipeline(
    "flow",
    [Stage("call", call_model, "NEW", "DONE", concurrency=3, limits=[Limit(KEY)])],
)


async def work(run: Run) -> dict[str, Any]:
    await asyncio.sleep(0.05)
    return {"tenant": run.input.get("tenant")}


# Fair shares: runs grouped by their input's `tenant`, at most two of a tenant at once.
fair = Pipeline(
    "fair",
    [
        Stage(
            "work",
            work,
            "NEW",
            "DONE",
            concurrency=4,
            group_by="tenant",
            max_in_flight_per_group=2,
        )
    ],
)
