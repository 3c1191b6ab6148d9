"""The console's Starlette application: pages, their live fragments, JSON, the event stream."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from uuid import UUID

import psycopg
import structlog
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import PlainTextResponse, RedirectResponse, Response, StreamingResponse
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from conveyor import event_loop
from conveyor.console import actions
from conveyor.console.context import HERE, JSON, Console, console_of, templates
from conveyor.console.filters import SINCE_CHOICES, FilterError, RunFilter, encode_cursor
from conveyor.console.formatting import short_id
from conveyor.console.live import LiveHub
from conveyor.console.overview import Overview, OverviewCache, finished_statuses
from conveyor.console.runview import build_run_view
from conveyor.console.security import ConsoleSecurity, CsrfTokens
from conveyor.console.settings import ConsoleSettings
from conveyor.console.store import Store
from conveyor.pipeline import TERMINAL_STATUSES, Pipeline, PipelineError

log = structlog.get_logger("conveyor.console")

PAGE_SIZE = 50
# However many browsers are open, the overview statement runs at most once per this interval.
OVERVIEW_MAX_AGE_SECONDS = 2.0


def create_app(
    settings: ConsoleSettings, pipeline: Pipeline, url: str, listen_url: str, schema: str
) -> Starlette:
    store = Store(url, schema, pipeline, read_only=not settings.allow_actions)

    async def load_overview() -> Overview:
        return await run_in_threadpool(store.overview)

    cache = OverviewCache(load_overview, OVERVIEW_MAX_AGE_SECONDS)
    console = Console(
        settings=settings,
        pipeline=pipeline,
        store=store,
        overview=cache,
        hub=LiveHub(listen_url, cache),
        csrf=CsrfTokens(),
        templates=templates(),
    )

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        store.open()
        console.hub.start()
        log.info("console serving", event_loop=event_loop.running_loop_name())
        try:
            yield
        finally:
            await console.hub.stop()
            await run_in_threadpool(store.close)

    app = Starlette(
        routes=[
            Route("/", overview_page),
            Route("/fragments/overview", overview_fragment),
            Route("/runs", runs_page),
            Route("/fragments/runs", runs_fragment),
            Route("/runs/{run_id:uuid}", run_page),
            Route("/fragments/runs/{run_id:uuid}", run_fragment),
            Route("/runs/{run_id:uuid}/retry", actions.retry_one, methods=["POST"]),
            Route("/runs/{run_id:uuid}/cancel", actions.cancel_one, methods=["POST"]),
            Route("/actions/retry", actions.retry_filtered, methods=["POST"]),
            Route("/actions/cancel", actions.cancel_filtered, methods=["POST"]),
            Route("/api/overview", api_overview),
            Route("/api/runs", api_runs),
            Route("/api/runs/{run_id:uuid}", api_run),
            Route("/events", events),
            Route("/healthz", healthz),
            Mount("/static", StaticFiles(directory=HERE / "static"), name="static"),
        ],
        exception_handlers={
            FilterError: bad_request,
            PipelineError: bad_request,
            psycopg.DataError: refused_value,
            psycopg.OperationalError: database_unavailable,
            HTTPException: http_error,
        },
        lifespan=lifespan,
    )
    app.state.console = console
    app.add_middleware(
        ConsoleSecurity,
        user=settings.user,
        password=settings.password,
        hosts=settings.accepted_hosts,
    )
    return app


# -- overview -----------------------------------------------------------------------------------


async def overview_page(request: Request) -> Response:
    return await _overview(request, "overview.html")


async def overview_fragment(request: Request) -> Response:
    return await _overview(request, "_overview.html")


async def _overview(request: Request, template: str) -> Response:
    console = console_of(request)
    overview = await console.overview.get()
    return console.page(
        request,
        template,
        {"overview": overview, "finished_statuses": finished_statuses, "title": "Overview"},
    )


async def api_overview(request: Request) -> Response:
    return JSON(await console_of(request).overview.get())


# -- runs list ----------------------------------------------------------------------------------


async def runs_page(request: Request) -> Response:
    found = _find(request)
    if found is not None:
        return RedirectResponse(f"/runs/{found}", status_code=303)
    return await _runs(request, "runs.html")


async def runs_fragment(request: Request) -> Response:
    return await _runs(request, "_runs.html")


def _find(request: Request) -> UUID | None:
    """The search box takes a run id (goes to the run) or an idempotency key (filters)."""
    text = (request.query_params.get("q") or "").strip()
    try:
        return UUID(text) if text else None
    except ValueError:
        return None


def _filter(request: Request) -> RunFilter:
    query = dict(request.query_params)
    text = (query.pop("q", "") or "").strip()
    if text and not query.get("key"):
        query["key"] = text
    return RunFilter.from_query(query)


async def _page_of_runs(request: Request) -> tuple[RunFilter, list[dict[str, object]], str | None]:
    console = console_of(request)
    run_filter = _filter(request)
    rows = await run_in_threadpool(console.store.runs, run_filter, PAGE_SIZE + 1)
    next_cursor = None
    if len(rows) > PAGE_SIZE:
        rows = rows[:PAGE_SIZE]
        last = rows[-1]
        next_cursor = encode_cursor(last["listed_at"], last["id"])  # type: ignore[arg-type]
    return run_filter, rows, next_cursor


async def _runs(request: Request, template: str) -> Response:
    console = console_of(request)
    run_filter, rows, next_cursor = await _page_of_runs(request)
    notice = request.query_params.get("notice")
    return console.page(
        request,
        template,
        {
            "title": "Runs",
            "runs": rows,
            "filter": run_filter,
            "next_cursor": next_cursor,
            "since_choices": SINCE_CHOICES,
            "statuses": _known_statuses(console.pipeline),
            "terminal": TERMINAL_STATUSES,
            "notice": actions.NOTICES.get(notice or "", ""),
            "notice_count": request.query_params.get("count", ""),
        },
    )


async def api_runs(request: Request) -> Response:
    _, rows, next_cursor = await _page_of_runs(request)
    return JSON({"runs": rows, "next_cursor": next_cursor})


def _known_statuses(pipeline: Pipeline) -> list[str]:
    statuses: list[str] = []
    for stage in pipeline.stages:
        for status in (stage.consumes, stage.working):
            if status not in statuses:
                statuses.append(status)
    return [*statuses, pipeline.final_status, "FAILED", "CANCELLED"]


# -- one run ------------------------------------------------------------------------------------


async def run_page(request: Request) -> Response:
    return await _run(request, "run.html")


async def run_fragment(request: Request) -> Response:
    return await _run(request, "_run.html")


async def _run(request: Request, template: str) -> Response:
    console = console_of(request)
    run_id: UUID = request.path_params["run_id"]
    run, history = await run_in_threadpool(console.store.run, run_id)
    if run is None:
        raise HTTPException(404, f"no run {run_id}")
    children = await run_in_threadpool(console.store.children, run_id)
    view = build_run_view(run, history, console.pipeline, datetime.now(UTC), children)
    notice = request.query_params.get("notice")
    return console.page(
        request,
        template,
        {
            "title": f"Run {short_id(run_id)}",
            "view": view,
            "notice": actions.NOTICES.get(notice or "", ""),
            "notice_count": "",
        },
    )


async def api_run(request: Request) -> Response:
    console = console_of(request)
    run_id: UUID = request.path_params["run_id"]
    run, history = await run_in_threadpool(console.store.run, run_id)
    if run is None:
        return JSON({"error": f"no run {run_id}"}, status_code=404)
    children = await run_in_threadpool(console.store.children, run_id)
    return JSON({"run": run, "history": history, "children": children})


# -- live updates and probes --------------------------------------------------------------------


async def events(request: Request) -> Response:
    return StreamingResponse(
        console_of(request).hub.stream(),
        media_type="text/event-stream",
        headers={"cache-control": "no-store", "x-accel-buffering": "no"},
    )


async def healthz(request: Request) -> Response:
    return PlainTextResponse("ok\n")


# -- errors -------------------------------------------------------------------------------------


async def bad_request(request: Request, exc: Exception) -> Response:
    return _error(request, 400, str(exc))


async def refused_value(request: Request, exc: Exception) -> Response:
    """The server refused a value this request sent (class 22, data exception): the request's
    fault. Anything else of the class (no SQLSTATE: a value psycopg could not load) is not."""
    assert isinstance(exc, psycopg.DataError)
    if not (exc.sqlstate or "").startswith("22"):
        raise exc
    primary = exc.diag.message_primary or "invalid value"
    return _error(request, 400, f"the database refused a value of this request: {primary}")


async def database_unavailable(request: Request, exc: Exception) -> Response:
    lines = [line for line in str(exc).splitlines() if line.strip()]
    log.warning("console query failed", path=request.url.path, error=lines[-1] if lines else "")
    return _error(request, 503, "the database is unavailable; the page will recover on reload")


async def http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    return _error(request, exc.status_code, str(exc.detail))


def _error(request: Request, status: int, message: str) -> Response:
    if request.url.path.startswith("/api/"):
        return JSON({"error": message}, status_code=status)
    return console_of(request).page(
        request, "error.html", {"title": "Error", "message": message}, status_code=status
    )
