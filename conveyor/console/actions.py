"""Retry and cancel from the page: off unless enabled, same-origin and token-checked, logged.

Each goes through `conveyor.runs.retry` / `conveyor.runs.cancel`, the functions the CLI's
`retry` and `cancel` call, with the console user as the actor recorded in run_events.worker.
"""

from __future__ import annotations

from typing import Any
from uuid import UUID

import structlog
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import RedirectResponse, Response

from conveyor.console.context import console_of
from conveyor.console.filters import FilterError, RunFilter
from conveyor.console.security import CSRF_FIELD, current_user, same_origin

log = structlog.get_logger("conveyor.console")

BULK_LIMIT = 10_000  # per click: a filter that matches more says so and is clicked again
NOTICES = {
    "retried": "Run sent back in line.",
    "cancelled": "Run cancelled.",
    "not-retried": "Not retried: the run is no longer FAILED or CANCELLED.",
    "not-cancelled": "Not cancelled: the run has already finished.",
    "bulk-retried": "FAILED runs matching the filter sent back in line:",
    "bulk-cancelled": "Waiting runs matching the filter cancelled:",
    "bulk-more": "Runs matching the filter handled (more remain: run it again):",
}


async def retry_one(request: Request) -> Response:
    form, actor = await _authorized_form(request)
    run_id: UUID = request.path_params["run_id"]
    stage_field = form.get("stage") or ""
    if not isinstance(stage_field, str):
        raise FilterError("stage must be a text field")
    stage = stage_field.strip() or None
    console = console_of(request)
    if stage is not None:
        console.pipeline.stage(stage)  # an unknown stage is a 400, not a silent default
    done = await run_in_threadpool(console.store.retry, run_id, actor, stage)
    _log(request, "retry", actor, run_id=str(run_id), stage=stage, applied=done)
    return RedirectResponse(f"/runs/{run_id}?notice={'retried' if done else 'not-retried'}", 303)


async def cancel_one(request: Request) -> Response:
    _, actor = await _authorized_form(request)
    run_id: UUID = request.path_params["run_id"]
    done = await run_in_threadpool(console_of(request).store.cancel, run_id, actor)
    _log(request, "cancel", actor, run_id=str(run_id), applied=done)
    notice = "cancelled" if done else "not-cancelled"
    return RedirectResponse(f"/runs/{run_id}?notice={notice}", 303)


async def retry_filtered(request: Request) -> Response:
    """Every FAILED run the current filter selects, each through `runs.retry`."""
    form, actor = await _authorized_form(request)
    run_filter = RunFilter.from_query(_filter_fields(form)).restricted_to(("FAILED",))
    return await _bulk(request, "retry", run_filter, actor)


async def cancel_filtered(request: Request) -> Response:
    """Every waiting run (at a stage's input status) the current filter selects."""
    form, actor = await _authorized_form(request)
    waiting = tuple(stage.consumes for stage in console_of(request).pipeline.stages)
    run_filter = RunFilter.from_query(_filter_fields(form)).restricted_to(waiting)
    return await _bulk(request, "cancel", run_filter, actor)


async def _bulk(request: Request, action: str, run_filter: RunFilter, actor: str) -> Response:
    console = console_of(request)
    applied, more = await run_in_threadpool(
        console.store.bulk, action, run_filter, actor, BULK_LIMIT
    )
    _log(request, f"bulk {action}", actor, filter=run_filter.as_dict(), applied=applied, more=more)
    notice = "bulk-more" if more else ("bulk-retried" if action == "retry" else "bulk-cancelled")
    query = run_filter.query(notice=notice, count=str(applied))
    return RedirectResponse(f"/runs?{query}", 303)


async def _authorized_form(request: Request) -> tuple[Any, str]:
    """The form of an allowed action and who asks; 403 for everything else."""
    console = console_of(request)
    if not console.settings.allow_actions:
        _log(request, "refused", "", reason="actions disabled")
        raise HTTPException(
            403, "actions are disabled (start with --allow-actions or CONVEYOR_CONSOLE_ACTIONS=1)"
        )
    user = current_user(request)
    form = await request.form()
    token = form.get(CSRF_FIELD)
    if (
        not same_origin(request)
        or not isinstance(token, str)
        or not console.csrf.verify(user, token)
    ):
        _log(request, "refused", user or "", reason="cross-site request or missing token")
        raise HTTPException(403, "refused: this request did not come from a console page")
    return form, f"console:{user or 'anonymous'}"


def _filter_fields(form: Any) -> dict[str, str]:
    fields = {}
    for name in ("pipeline", "stage", "status", "since", "key"):
        value = form.get(name) or ""
        if not isinstance(value, str):  # a file part of a multipart form
            raise FilterError(f"{name} must be a text field")
        fields[name] = value
    return fields


def _log(request: Request, action: str, actor: str, **fields: Any) -> None:
    # The socket's peer, or what a proxy named in CONVEYOR_CONSOLE_TRUSTED_PROXIES says
    # (uvicorn rewrites the client only then): never a header any client can set.
    client = request.client.host if request.client else None
    log.info("console action", action=action, actor=actor, client=client, **fields)
