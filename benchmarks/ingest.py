"""(h) ingest: 8 clients inserting one run per transaction, with and without the triggers.

    python -m benchmarks.ingest

pgbench, 8 clients, each transaction one plain `INSERT INTO conveyor.pipeline_runs (pipeline)
VALUES ('bench1')` (what any outside service writes). No worker runs, as under load: every
worker is busy and none is waiting, so the gated wake-up trigger checks and sends nothing.
Measured with the wake-up trigger on and off (the ratio is the figure), each with the
`pipeline_events` observer on and off; and once more with a worker registered as waiting that
never claims, the worst case of the gate: every insert then notifies.

Beside it, bulk submission: one COPY of 100,000 runs in one transaction (runs.submit_many,
`conveyor submit-many`), observer on and off, no worker waiting.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from benchmarks.harness import (
    OBSERVER_TRIGGERS,
    WAKE_TRIGGER,
    BenchDatabase,
    Scale,
    pgbench,
    set_triggers,
    settle,
)
from benchmarks.report import ratio
from conveyor import runs
from conveyor.listening import wake_channel

COMMAND = "python -m benchmarks.ingest"
CLIENTS = 8
BULK_RUNS = 100_000
_INSERT = "INSERT INTO conveyor.pipeline_runs (pipeline) VALUES ('bench1');\n"


@dataclass(frozen=True)
class Ingest:
    wake: bool
    observer: bool
    waiting_worker: bool
    rows_per_second: float

    @property
    def label(self) -> str:
        return (
            f"wake-up trigger {'on' if self.wake else 'off'}, observer"
            f" {'on' if self.observer else 'off'}"
            f"{', a worker waiting that never claims' if self.waiting_worker else ''}"
        )


def measure(
    db: BenchDatabase, scale: Scale, *, wake: bool, observer: bool, waiting_worker: bool = False
) -> Ingest:
    with db.connect() as conn:
        db.reset(conn)
        set_triggers(conn, (WAKE_TRIGGER,), enabled=wake)
        set_triggers(conn, OBSERVER_TRIGGERS, enabled=observer)
        if waiting_worker:
            conn.execute(
                "INSERT INTO conveyor.workers (worker_id, pipeline, stage, consumes, channel,"
                " hostname, pid, expires_at, waiting) VALUES ('bench-waiting', 'bench1', 'only',"
                " 'NEW', %s, 'bench', 0, now() + interval '1 hour', true)",
                (wake_channel("conveyor", "bench1", "NEW"),),
            )
        settle(conn)
    with tempfile.TemporaryDirectory(prefix="conveyor-ingest-") as tmp:
        script = Path(tmp) / "insert.sql"
        script.write_text(_INSERT)
        result = pgbench(db, [script], clients=CLIENTS, seconds=scale.window)
    return Ingest(wake, observer, waiting_worker, result.tps)


def measure_all(db: BenchDatabase, scale: Scale) -> list[Ingest]:
    return [
        measure(db, scale, wake=wake, observer=observer)
        for observer in (False, True)
        for wake in (True, False)
    ] + [measure(db, scale, wake=True, observer=False, waiting_worker=True)]


def bulk(db: BenchDatabase, scale: Scale, *, observer: bool) -> float:
    """Runs per second of one bulk submission: COPY of BULK_RUNS runs, one transaction."""
    count = 2_000 if scale.tiny else BULK_RUNS
    with db.connect() as conn:
        db.reset(conn)
        set_triggers(conn, (WAKE_TRIGGER,), enabled=True)
        set_triggers(conn, OBSERVER_TRIGGERS, enabled=observer)
        settle(conn)
        started = time.perf_counter()
        submitted = runs.submit_many(conn, ({"n": n} for n in range(count)), pipeline="bench1")
        seconds = time.perf_counter() - started
    assert submitted == count
    return count / seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="a second per figure, for tests")
    args = parser.parse_args()
    scale = Scale.small() if args.tiny else Scale()
    with BenchDatabase.create() as db:
        results = measure_all(db, scale)
        bulk_on, bulk_off = (bulk(db, scale, observer=observer) for observer in (True, False))
    for result in results:
        print(f"{result.label}: {result.rows_per_second:,.0f} rows/s")
    by = {(r.wake, r.observer, r.waiting_worker): r.rows_per_second for r in results}
    print(
        f"(h) wake-up trigger on/off: {ratio(by[True, False, False], by[False, False, False])}"
        f" with the observer off, {ratio(by[True, True, False], by[False, True, False])} with it on"
        f" ({CLIENTS} clients, one run per transaction; {COMMAND})"
    )
    print(
        f"bulk submit, COPY of {2_000 if scale.tiny else BULK_RUNS:,} runs in one transaction:"
        f" {bulk_on:,.0f} runs/s with the observer on, {bulk_off:,.0f} with it off ({COMMAND})"
    )


if __name__ == "__main__":
    main()
