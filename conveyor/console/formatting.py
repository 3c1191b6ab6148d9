"""Template filters: how numbers, ages and times read on the page. Output is plain text that
Jinja escapes like everything else."""

from __future__ import annotations

import math
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

from conveyor.console.decoding import OutOfRange


def age(seconds: float | None) -> str:
    """3.2s, 4m 10s, 2h 05m, 3d 04h."""
    if seconds is None or math.isnan(seconds):
        return "–"
    if math.isinf(seconds):
        return "∞" if seconds > 0 else "–"
    seconds = max(float(seconds), 0.0)
    if seconds < 60:
        return f"{seconds:.1f}s"
    minutes, secs = divmod(int(seconds), 60)
    if minutes < 60:
        return f"{minutes}m {secs:02d}s"
    hours, minutes = divmod(minutes, 60)
    if hours < 48:
        return f"{hours}h {minutes:02d}m"
    days, hours = divmod(hours, 24)
    return f"{days}d {hours:02d}h"


def duration(seconds: float | None) -> str:
    if seconds is None:
        return ""
    if seconds < 1:
        return f"{seconds * 1000:.1f} ms"
    return f"{seconds:.2f} s" if seconds < 60 else age(seconds)


def timestamp(value: datetime | str | None) -> str:
    """UTC, to the millisecond; the page says it is UTC. A time Python cannot hold ('infinity',
    after 9999) reads as PostgreSQL wrote it."""
    if value is None:
        return ""
    if isinstance(value, OutOfRange):
        return value.shown
    if isinstance(value, str):
        try:
            at = datetime.fromisoformat(value)
        except ValueError:
            return value
    else:
        at = value
    try:
        return at.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S.%f")[:-3]
    except (OverflowError, ValueError):  # within a day of the year 1 or 10000
        return at.isoformat()


def epoch_timestamp(value: float | None) -> str:
    """A Unix time, as `timestamp` writes it."""
    if value is None:
        return ""
    try:
        return timestamp(datetime.fromtimestamp(value, UTC))
    except (OverflowError, OSError, ValueError):
        return f"{value:.0f} (Unix time)"


def number(value: int | float | None, capped: bool = False) -> str:
    if value is None:
        return "–"
    text = f"{int(value):,}" if float(value).is_integer() else f"{value:,.1f}"
    return text + "+" if capped else text


def rate(per_minute: float) -> str:
    return f"{per_minute:,.1f}/min" if per_minute < 1000 else f"{per_minute / 60:,.0f}/s"


def short_id(value: Any) -> str:
    """A run id's last 12 hex digits. Ids begin with their creation time (UUID v7): runs created
    together share their first characters, never their random tail. Pages link the full id."""
    text = str(value)
    return "…" + text[-12:] if len(text) == 36 else text


def last_line(text: str | None) -> str:
    if not text:
        return ""
    lines = [line for line in text.splitlines() if line.strip()]
    return lines[-1] if lines else ""


FILTERS: dict[str, Callable[..., str]] = {
    "age": age,
    "duration": duration,
    "timestamp": timestamp,
    "epoch_timestamp": epoch_timestamp,
    "number": number,
    "rate": rate,
    "short_id": short_id,
    "last_line": last_line,
}
