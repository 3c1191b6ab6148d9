"""(i) The ceiling: the worker's protocol in pure SQL, driven by pgbench.

    python -m benchmarks.ceiling

Each pgbench client plays one worker with free slots and a no-op handler: the claim of
sql/queries.sql (SKIP LOCKED + lease) and then the fenced completion with its run_events rows,
the same statements with the parameters written in as literals. The only addition is a wrapper
around the claim that hands the claimed ids to the completion (pgbench's \\gset keeps one row,
so the ids are aggregated into arrays, as a driver would hold them). Measured from a backlog on
the same schema, with the same triggers on, as the engine figures it is compared with.
"""

from __future__ import annotations

import argparse
import re
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from benchmarks import pipelines
from benchmarks.harness import (
    BenchDatabase,
    PgbenchResult,
    Scale,
    fill,
    pgbench,
    set_observer,
    settle,
)
from conveyor import queries
from conveyor.batch_arrays import NOT_ROUTED
from conveyor.pipeline import Pipeline, Stage

COMMAND = "python -m benchmarks.ceiling"
_PLACEHOLDER = re.compile(r"%\((\w+)\)s")
# What each configuration is expected to reach, to queue a backlog that outlasts the run.
_RATE_GUESS = {1: 2_500, 50: 40_000}


@dataclass(frozen=True)
class Ceiling:
    batch: int
    clients: int  # pgbench clients per stage
    stages: int
    observer: bool
    rows_per_second: float
    claim_ms: float  # average latency of the claim statement
    complete_ms: float  # ... and of the fenced completion

    @property
    def label(self) -> str:
        shape = "three stages" if self.stages == 3 else "one stage"
        return (
            f"{shape}, batch {self.batch}, {self.clients} client{'s' if self.clients > 1 else ''}"
            f"{' per stage' if self.stages == 3 else ''},"
            f" observer {'on' if self.observer else 'off'}"
        )


def literal(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    return "'" + str(value).replace("'", "''") + "'"


def script(pipeline: Pipeline, stage: Stage, batch: int, lease_seconds: float = 30.0) -> str:
    """The pgbench script of one worker of `stage`: claim, then complete what was claimed."""
    statements = queries.load("conveyor")
    fence = {
        "pipeline": pipeline.name,
        "stage": stage.name,
        "consumes": stage.consumes,
        "working": stage.working,
        "produces": stage.produces,
        "terminal": pipeline.is_terminal(stage.produces),
        "durable": pipeline.is_terminal(stage.produces),  # as the worker decides it
        "batch": batch,
        "lease_seconds": lease_seconds,
        "alone": False,  # no rescued runs here
    }
    # Each client is a worker of its own; pgbench fills in :client_id, also inside quotes.
    values = {key: literal(value) for key, value in fence.items()}
    values["worker"] = f"'ceiling-{stage.name}-:client_id'"
    # The completion's arrays come from the claim, through pgbench variables set by \gset.
    for array in ("ids", "outputs", "attempts", "started_us", "durations_us", "models"):
        values[array] = f"':{array}'"
    values["prompt_tokens"] = values["completion_tokens"] = "':tokens'"
    values.update({key: literal(value) for key, value in NOT_ROUTED.items()})  # no routes
    values["lock_ids"] = literal("{}")  # no children, no parents to lock

    def fill_in(text: str) -> str:
        return _PLACEHOLDER.sub(lambda m: values[m.group(1)], text)

    claim = fill_in(statements["claim_batch"])
    complete = fill_in(statements["complete_if_leased"])
    return (
        "WITH claimed AS (\n"
        f"{claim}\n"
        ")\n"
        "SELECT coalesce(array_agg(id), '{}')::text AS ids,\n"
        "       coalesce(array_agg('{}'::text), '{}')::text AS outputs,\n"
        "       coalesce(array_agg(attempt), '{}')::text AS attempts,\n"
        "       coalesce(array_agg((extract(epoch FROM clock_timestamp()) * 1000000)::int8),"
        " '{}')::text AS started_us,\n"
        "       coalesce(array_agg(0::int8), '{}')::text AS durations_us,\n"
        "       coalesce(array_agg(NULL::text), '{}')::text AS models,\n"
        "       coalesce(array_agg(NULL::int), '{}')::text AS tokens\n"
        "  FROM claimed \\gset\n"
        f"{complete};\n"
    )


def measure(
    db: BenchDatabase,
    scale: Scale,
    *,
    batch: int,
    clients: int = 1,
    stages: int = 1,
    observer: bool = True,
) -> Ceiling:
    pipeline = pipelines.three if stages == 3 else pipelines.single
    backlog = scale.backlog(_RATE_GUESS[batch] * (clients if stages == 1 else 1))
    with tempfile.TemporaryDirectory(prefix="conveyor-ceiling-") as tmp:
        paths = []
        for stage in pipeline.stages:
            path = Path(tmp) / f"{stage.name}.sql"
            path.write_text(script(pipeline, stage, batch))
            paths.append(path)
        for _ in range(3):  # a backlog that runs dry is doubled and measured again
            with db.connect() as conn:
                db.reset(conn)
                set_observer(conn, on=observer)
                fill(conn, pipeline.name, backlog)
                settle(conn)
            started = time.monotonic()
            with ThreadPoolExecutor(len(paths)) as pool:
                results: list[PgbenchResult] = list(
                    pool.map(
                        lambda p: pgbench(db, [p], clients=clients, seconds=scale.window), paths
                    )
                )
            elapsed = max(time.monotonic() - started, scale.window)
            with db.connect() as conn:
                done, left = conn.execute(
                    "SELECT count(*) FILTER (WHERE status = 'DONE'),"
                    " count(*) FILTER (WHERE status = 'NEW') FROM conveyor.pipeline_runs"
                ).fetchone() or (0, 0)
            if left > 0 or scale.tiny:
                break
            backlog *= 2
        else:
            raise RuntimeError("the ceiling's backlog ran dry three times")
    # Rows per second from pgbench's own clock: the share of its transactions that moved a row
    # to DONE, times its tps (pgbench excludes its connection set-up from tps).
    last = results[-1]
    rate = done / last.transactions * last.tps if last.transactions else done / elapsed
    first = results[0]
    claim_ms, complete_ms = [*first.command_ms, 0.0, 0.0][:2]
    return Ceiling(batch, clients, stages, observer, rate, claim_ms, complete_ms)


CONFIGURATIONS: list[dict[str, Any]] = [
    {"batch": 1, "clients": 1},
    {"batch": 1, "clients": 2},
    {"batch": 50, "clients": 1},
    {"batch": 50, "clients": 2},
    {"batch": 50, "clients": 1, "stages": 3},
    {"batch": 50, "clients": 1, "observer": False},
    {"batch": 50, "clients": 1, "stages": 3, "observer": False},
]


def measure_all(db: BenchDatabase, scale: Scale) -> list[Ceiling]:
    return [measure(db, scale, **config) for config in CONFIGURATIONS]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="a second per figure, for tests")
    parser.add_argument("--print-script", action="store_true", help="print one script and exit")
    args = parser.parse_args()
    if args.print_script:
        print(script(pipelines.single, pipelines.single.stages[0], 50))
        return
    scale = Scale.small() if args.tiny else Scale()
    with BenchDatabase.create() as db:
        for ceiling in measure_all(db, scale):
            print(
                f"{ceiling.label}: {ceiling.rows_per_second:,.0f} rows/s"
                f" (claim {ceiling.claim_ms:.3f} ms, complete {ceiling.complete_ms:.3f} ms)"
            )
    print(f"({COMMAND})")


if __name__ == "__main__":
    main()
