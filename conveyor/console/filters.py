"""The runs list's filter and keyset cursor, parsed from a query string. No I/O."""

from __future__ import annotations

import base64
import dataclasses
import re
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import urlencode
from uuid import UUID

from conveyor.console.decoding import OutOfRange, sql_timestamp, timestamp_text
from conveyor.pipeline import Pipeline
from conveyor.settings import parse_duration

_PIPELINE = re.compile(r"^[a-z][a-z0-9_]{0,30}$")
_STATUS = re.compile(r"^[A-Z][A-Z0-9_]{0,30}$")
SINCE_CHOICES = ("15m", "1h", "24h", "7d", "30d")
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


class FilterError(ValueError):
    """A query string the runs list cannot use; the message says which part."""


@dataclass(frozen=True)
class RunFilter:
    pipeline: str | None = None
    stage: str | None = None
    status: str | None = None
    since: str | None = None  # a duration ("1h") or an ISO timestamp
    key: str | None = None  # idempotency key
    # The keyset cursor: the runs listed after this one (its listed_at and id; console_runs)
    before_at: datetime | None = None
    before_id: UUID | None = None
    # Set by bulk actions: only these statuses, whatever the filter says.
    only_statuses: tuple[str, ...] | None = None

    @classmethod
    def from_query(cls, query: Mapping[str, str]) -> RunFilter:
        def value(name: str) -> str | None:
            raw = (query.get(name) or "").strip()
            if "\x00" in raw:  # PostgreSQL text cannot hold it: no run could match
                raise FilterError(f"{name} holds a NUL character")
            return raw or None

        pipeline, status = value("pipeline"), value("status")
        if pipeline is not None and not _PIPELINE.match(pipeline):
            raise FilterError(f"pipeline {pipeline!r} is not a pipeline name")
        if status is not None and not _STATUS.match(status.upper()):
            raise FilterError(f"status {status!r} is not a status")
        since = value("since")
        if since is not None:
            _since_timestamp(since)  # validate now, not at query time
        before_at, before_id = decode_cursor(value("cursor"))
        return cls(
            pipeline=pipeline,
            stage=value("stage"),
            status=status.upper() if status else None,
            since=since,
            key=value("key"),
            before_at=before_at,
            before_id=before_id,
        )

    def after(self, listed_at: datetime, run_id: UUID) -> RunFilter:
        return dataclasses.replace(self, before_at=listed_at, before_id=run_id)

    def first_page(self) -> RunFilter:
        return dataclasses.replace(self, before_at=None, before_id=None)

    def restricted_to(self, statuses: tuple[str, ...]) -> RunFilter:
        return dataclasses.replace(self, only_statuses=statuses)

    @property
    def is_first_page(self) -> bool:
        return self.before_at is None

    def parameters(self, pipeline: Pipeline) -> dict[str, Any]:
        """The named parameters of `console_runs`."""
        statuses: list[str] | None = [self.status] if self.status else None
        failed_stage = None
        run_pipeline = self.pipeline
        if self.stage is not None:
            stage = pipeline.stage(self.stage)  # PipelineError for an unknown stage
            run_pipeline = run_pipeline or pipeline.name
            if self.status == "FAILED":
                failed_stage = stage.name
            elif self.status is None:
                statuses = [stage.consumes, stage.working]
            elif self.status not in (stage.consumes, stage.working):
                statuses = []  # a status the stage never holds: nothing matches
        if self.key is not None:
            # The idempotency key is unique per pipeline: look it up through that index.
            run_pipeline = run_pipeline or pipeline.name
        if self.only_statuses is not None:
            # An empty intersection (a stage and a status it never holds) matches nothing.
            statuses = (
                list(self.only_statuses)
                if statuses is None
                else [s for s in statuses if s in self.only_statuses]
            )
        since = _since_timestamp(self.since) if self.since else None
        return {
            "pipeline": run_pipeline,
            "statuses": statuses,
            "idempotency_key": self.key,
            "since": since,
            "id_from": first_id_at(since) if since else None,
            "before_at": sql_timestamp(self.before_at) if self.before_at else None,
            "before_id": self.before_id,
            "id_below": _ids_below(self.before_at),
            "failed_stage": failed_stage,
        }

    def query(self, **changes: str | None) -> str:
        """This filter (without the cursor) as a query string, with `changes` applied."""
        fields = {
            "pipeline": self.pipeline,
            "stage": self.stage,
            "status": self.status,
            "since": self.since,
            "key": self.key,
        }
        fields.update(changes)
        return urlencode({k: v for k, v in fields.items() if v})

    def as_dict(self) -> dict[str, str | None]:
        return {
            "pipeline": self.pipeline,
            "stage": self.stage,
            "status": self.status,
            "since": self.since,
            "key": self.key,
        }


def encode_cursor(listed_at: datetime, run_id: UUID) -> str:
    at = listed_at.shown if isinstance(listed_at, OutOfRange) else listed_at.isoformat()
    raw = f"{at}|{run_id}".encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_cursor(text: str | None) -> tuple[datetime | None, UUID | None]:
    if text is None:
        return None, None
    try:
        raw = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4)).decode()
        at, _, run_id = raw.partition("|")
        return _cursor_time(at), UUID(run_id)
    except ValueError:
        raise FilterError("cursor is not one this console issued") from None


def _cursor_time(text: str) -> datetime:
    try:
        at = datetime.fromisoformat(text)
    except ValueError:
        beyond = timestamp_text(text)  # 'infinity', after 9999: as PostgreSQL wrote it
        if beyond is None:
            raise
        return beyond
    if at.tzinfo is None:
        raise ValueError("naive timestamp")
    return at


def first_id_at(at: datetime) -> UUID:
    """The smallest id uuid_v7() can give a run made at `at` or later: the milliseconds since
    the epoch in its first 48 bits, the rest zero (the nil id before 1970)."""
    milliseconds = (at - _EPOCH) // timedelta(milliseconds=1)
    return UUID(int=max(0, milliseconds) << 80)


def _ids_below(before_at: datetime | None) -> UUID | None:
    """The primary key's bound for the runs listed after a cursor at `before_at`: every id
    whose time is at most `before_at` is below it (None: no bound, the cursor is at the end of
    time or there is none)."""
    if before_at is None:
        return None
    if isinstance(before_at, OutOfRange):
        return UUID(int=0) if before_at.year == 1 else None  # -infinity, BC: nothing before
    try:
        return first_id_at(before_at + timedelta(milliseconds=1))
    except OverflowError:  # the last millisecond of 9999
        return None


def _since_timestamp(text: str) -> datetime:
    try:
        seconds = parse_duration(text)
    except ValueError:
        pass
    else:
        try:
            return datetime.now(UTC) - timedelta(seconds=seconds)
        except OverflowError:
            raise FilterError(f"since {text!r} reaches back before the year 1") from None
    try:
        at = datetime.fromisoformat(text)
    except ValueError:
        raise FilterError(
            f"since {text!r} is neither a duration (15m, 1h, 7d) nor an ISO timestamp"
        ) from None
    return at if at.tzinfo else at.replace(tzinfo=UTC)
