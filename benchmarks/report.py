"""The table of figures: what was measured, the target, the ceiling, how to reproduce it. The
peers are measured beside conveyor by benchmarks.peers (`make bench-peers`)."""

from __future__ import annotations

import math
from dataclasses import dataclass

HEADER = ("figure", "measured", "target", "vs pure-SQL ceiling", "command")


@dataclass(frozen=True)
class Row:
    figure: str
    measured: str
    target: str = ""
    ceiling: str = ""
    command: str = ""

    def cells(self) -> tuple[str, ...]:
        return (self.figure, self.measured, self.target, self.ceiling, self.command)


def table(rows: list[Row]) -> str:
    """A Markdown table, aligned so that it also reads as plain text (and pastes into README)."""
    return grid(HEADER, [row.cells() for row in rows])


def grid(header: tuple[str, ...], cells: list[tuple[str, ...]]) -> str:
    """`table` with any columns."""
    lines = [header, *cells]
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    rendered = [
        "| " + " | ".join(c.ljust(w) for c, w in zip(line, widths, strict=True)) + " |"
        for line in lines
    ]
    rendered.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(rendered)


def rate(value: float, unit: str = "runs/s") -> str:
    return f"{value:,.0f} {unit}"


def ratio(value: float, reference: float) -> str:
    """value / reference, or n/a when nothing was counted (a tiny run's backlog ran dry)."""
    if not (reference and math.isfinite(value) and math.isfinite(reference)):
        return "n/a"
    return f"{value / reference:.2f}"


def share(value: float, ceiling: float, what: str) -> str:
    """A throughput as a fraction of the ceiling it is compared with."""
    return f"{value / ceiling:.2f} of {ceiling:,.0f} ({what})" if ceiling else "n/a"


def floor_share(floor_ms: float, measured_ms: float, what: str) -> str:
    """A latency against its pure-SQL floor: 1.00 would be as fast as the bare statements."""
    return (
        f"{floor_ms / measured_ms:.2f} (floor {floor_ms:.2f} ms: {what})" if measured_ms else "n/a"
    )
