"""What every request handler of the console shares, and the helpers they have in common."""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from datetime import date, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any
from uuid import UUID

import jinja2
from starlette.requests import Request
from starlette.responses import HTMLResponse, Response
from starlette.templating import Jinja2Templates

from conveyor.console import formatting
from conveyor.console.decoding import DeepJSON, OutOfRange
from conveyor.console.live import LiveHub
from conveyor.console.overview import OverviewCache
from conveyor.console.security import CSRF_FIELD, CsrfTokens, current_user
from conveyor.console.settings import ConsoleSettings
from conveyor.console.store import Store
from conveyor.pipeline import Pipeline

HERE = Path(__file__).resolve().parent


@dataclass
class Console:
    settings: ConsoleSettings
    pipeline: Pipeline
    store: Store
    overview: OverviewCache
    hub: LiveHub
    csrf: CsrfTokens
    templates: Jinja2Templates

    def page(
        self, request: Request, name: str, context: dict[str, Any], status_code: int = 200
    ) -> HTMLResponse:
        user = current_user(request)
        base = {
            "actions": self.settings.allow_actions,
            "user": user,
            "csrf_field": CSRF_FIELD,
            "csrf_token": self.csrf.issue(user) if self.settings.allow_actions else "",
            "pipeline": self.pipeline,
        }
        response = self.templates.TemplateResponse(
            request, name, {**base, **context}, status_code=status_code
        )
        response.headers["cache-control"] = "no-store"
        return response


def console_of(request: Request) -> Console:
    console: Console = request.app.state.console
    return console


def templates() -> Jinja2Templates:
    """Autoescape on for every template, undefined names are errors, not empty strings."""
    environment = jinja2.Environment(
        loader=jinja2.FileSystemLoader(HERE / "templates"),
        autoescape=True,
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    environment.filters.update(formatting.FILTERS)
    return Jinja2Templates(env=environment)


def to_jsonable(value: Any) -> Any:
    """JSON for the API. Stand-ins read as the database's text: 'infinity' for a timestamp,
    the document's own text (a string) for JSON nested too deeply to decode."""
    if isinstance(value, OutOfRange):
        return value.shown
    if isinstance(value, DeepJSON):
        return value.text
    if isinstance(value, float) and not math.isfinite(value):
        return str(value).replace("inf", "Infinity").replace("nan", "NaN")
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return to_jsonable(dataclasses.asdict(value))
    if isinstance(value, dict):
        return {str(k): to_jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [to_jsonable(v) for v in value]
    if isinstance(value, datetime | date):
        return value.isoformat()
    if isinstance(value, UUID | Decimal):
        return str(value)
    return value


class JSON(Response):
    media_type = "application/json"

    def render(self, content: Any) -> bytes:
        return json.dumps(to_jsonable(content), ensure_ascii=False, separators=(",", ":")).encode()
