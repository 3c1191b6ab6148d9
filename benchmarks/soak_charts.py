"""The soak benchmark's charts: one PNG per quantity over time, from its samples.

python -m benchmarks.soak_charts docs/soak/samples.csv    (redraws beside the CSV)
"""

from __future__ import annotations

import csv
import sys
from dataclasses import dataclass
from pathlib import Path

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

MB = 1024 * 1024


@dataclass(frozen=True)
class Chart:
    name: str  # the PNG's file name, without .png
    title: str
    unit: str
    lines: tuple[tuple[str, str], ...]  # (CSV column, legend label)
    scale: float = 1.0  # a column's value is divided by this


CHARTS = (
    Chart(
        "throughput",
        "Throughput",
        "runs/s",
        (("offered_per_s", "offered (inserted)"), ("done_per_s", "reaching DONE")),
    ),
    Chart(
        "latency",
        "End-to-end latency of the runs finished in each window",
        "ms",
        (("p50_ms", "p50"), ("p99_ms", "p99")),
    ),
    Chart("unfinished", "Unfinished runs (queued or in flight)", "runs", (("unfinished", ""),)),
    Chart(
        "pipeline_runs_size",
        "pipeline_runs size",
        "MB",
        (
            ("runs_total_bytes", "total"),
            ("runs_heap_bytes", "table"),
            ("runs_index_bytes", "indexes"),
        ),
        MB,
    ),
    Chart(
        "run_events_size",
        "run_events size",
        "MB",
        (
            ("events_total_bytes", "total"),
            ("events_heap_bytes", "table"),
            ("events_index_bytes", "indexes"),
        ),
        MB,
    ),
    Chart(
        "dead_tuples",
        "Dead tuples",
        "rows",
        (("runs_dead_tuples", "pipeline_runs"), ("events_dead_tuples", "run_events")),
    ),
    Chart(
        "autovacuum",
        "Autovacuum runs so far",
        "count",
        (("runs_autovacuums", "pipeline_runs"), ("events_autovacuums", "run_events")),
    ),
    Chart("wal", "WAL written (whole server)", "MB/s", (("wal_bytes_per_s", "WAL"),), MB),
    Chart(
        "console",
        "Console overview page, polled over HTTP",
        "ms",
        (("console_ms", "mean response time"),),
    ),
)


def draw(rows: list[dict[str, float]], out: Path) -> list[Path]:
    """One PNG per chart into `out`, time in minutes on the x axis; the paths written."""
    out.mkdir(parents=True, exist_ok=True)
    minutes = [row["elapsed_s"] / 60 for row in rows]
    written = []
    for chart in CHARTS:
        figure = Figure(figsize=(9, 4), dpi=100)
        FigureCanvasAgg(figure)  # Agg: files only, no screen and no pyplot state
        axes = figure.subplots()
        for column, label in chart.lines:
            axes.plot(minutes, [row[column] / chart.scale for row in rows], label=label or None)
        axes.set_title(chart.title)
        axes.set_xlabel("minutes")
        axes.set_ylabel(chart.unit)
        axes.set_ylim(bottom=0)
        axes.grid(alpha=0.3)
        if len(chart.lines) > 1:
            axes.legend()
        figure.tight_layout()
        path = out / f"{chart.name}.png"
        figure.savefig(path)
        written.append(path)
    return written


def read(path: Path) -> list[dict[str, float]]:
    """The samples of a soak's CSV, every value a float (a window without figures: nan)."""
    with path.open(newline="") as file:
        return [{key: float(value) for key, value in row.items()} for row in csv.DictReader(file)]


if __name__ == "__main__":
    samples = Path(sys.argv[1])
    for written in draw(read(samples), samples.parent):
        print(written)
