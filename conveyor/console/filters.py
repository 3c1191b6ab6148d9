"""The runs list's filter and keyset cursor, parsed from a query string. No I/O."""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import urlencode
from uuid import UUID

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
    before_id: UUID | None = None  # the keyset cursor: runs listed after this one
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
        before_id = decode_cursor(value("cursor"))
        return cls(
            pipeline=pipeline,
            stage=value("stage"),
            status=status.upper() if status else None,
            since=since,
            key=value("key"),
            before_id=before_id,
        )

    def after(self, run_id: UUID) -> RunFilter:
        return dataclasses.replace(self, before_id=run_id)

    def first_page(self) -> RunFilter:
        return dataclasses.replace(self, before_id=None)

    def restricted_to(self, statuses: tuple[str, ...]) -> RunFilter:
        return dataclasses.replace(self, only_statuses=statuses)

    @property
    def is_first_page(self) -> bool:
        return self.before_id is None

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
            "since_id": first_id_at(since) if since else None,
            "before_id": self.before_id,
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


def encode_cursor(run_id: UUID) -> str:
    return str(run_id)


def decode_cursor(text: str | None) -> UUID | None:
    if text is None:
        return None
    try:
        return UUID(text)
    except ValueError:
        raise FilterError("cursor is not one this console issued") from None


def first_id_at(at: datetime) -> UUID:
    """The smallest time-ordered id (uuid_v7) a run created at `at` or later can have: its first
    48 bits are the milliseconds since the epoch, the rest zero (the nil id before 1970)."""
    milliseconds = (at - _EPOCH) // timedelta(milliseconds=1)
    return UUID(int=max(0, milliseconds) << 80)


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
