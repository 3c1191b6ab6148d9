"""Template filters: how numbers, ages and times read on the page. Output is plain text that
Jinja escapes like everything else."""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any


def age(seconds: float | None) -> str:
    """3.2s, 4m 10s, 2h 05m, 3d 04h."""
    if seconds is None:
        return "–"
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
    """UTC, to the millisecond; the page says it is UTC."""
    if value is None:
        return ""
    if isinstance(value, str):
        value = datetime.fromisoformat(value)
    return value.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S.%f")[:-3]


def number(value: int | float | None, capped: bool = False) -> str:
    if value is None:
        return "–"
    text = f"{int(value):,}" if float(value).is_integer() else f"{value:,.1f}"
    return text + "+" if capped else text


def rate(per_minute: float) -> str:
    return f"{per_minute:,.1f}/min" if per_minute < 1000 else f"{per_minute / 60:,.0f}/s"


def short_id(value: Any) -> str:
    return str(value)[:8]


def last_line(text: str | None) -> str:
    if not text:
        return ""
    lines = [line for line in text.splitlines() if line.strip()]
    return lines[-1] if lines else ""


FILTERS: dict[str, Callable[..., str]] = {
    "age": age,
    "duration": duration,
    "timestamp": timestamp,
    "number": number,
    "rate": rate,
    "short_id": short_id,
    "last_line": last_line,
}
