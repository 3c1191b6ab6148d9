"""(a)-(h) measured for another commit's code and for this tree's, interleaved in one run.

    python -m benchmarks.versus REF [--rounds 1] [--only a,b,c,d,e,f,h] [--tiny]

REF (a commit, tag or branch) is checked out into a temporary git worktree. Each figure is
measured by each tree's own benchmark code, in a process of its own, in ABBA order (REF, this
tree, this tree, REF) for each round, so that a shared machine's drift falls on both alike;
each process migrates its own database with its own tree's migrations, on the same embedded
server. Both trees run on this interpreter and its packages: a REF that needs others fails
with its own error. Throughput figures are the best of each tree's runs, latencies and idle
figures their median. The last column is this tree's figure over REF's.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from benchmarks.harness import ROOT
from benchmarks.report import grid, ratio

COMMAND = "python -m benchmarks.versus"

# Run in each tree, with that tree's benchmark code: one figure, printed as JSON. The calls are
# the same in every tree since the figures' functions took these arguments.
_MEASURE = """
import dataclasses, json, sys
from benchmarks import idle, ingest, latency, throughput
from benchmarks.harness import BenchDatabase, Scale

scale = Scale.small() if sys.argv[2] == "tiny" else Scale()
with BenchDatabase.create() as db:
    calls = {
        "a": lambda: throughput.single(db, scale),
        "a_off": lambda: throughput.single(db, scale, observer=False),
        "b": lambda: throughput.three(db, scale),
        "b_off": lambda: throughput.three(db, scale, observer=False),
        "c": lambda: latency.commit_to_start(db, scale),
        "d": lambda: latency.end_to_end(db, scale),
        "e": lambda: throughput.single(db, scale, history=scale.million),
        "f": lambda: idle.measure(db, scale, load_runs=500 if scale.tiny else 20_000),
        "h": lambda: ingest.measure_all(db, scale),
    }
    result = calls[sys.argv[1]]()
as_dicts = [dataclasses.asdict(r) for r in result] if isinstance(result, list) else (
    dataclasses.asdict(result))
print(json.dumps(as_dicts))
"""


@dataclass(frozen=True)
class Figure:
    key: str  # the name _MEASURE knows it by
    name: str
    command: str  # the command that measures it alone
    # its figures from one tree's measurements: (what, value, higher is better)
    read: Callable[[list[Any]], list[tuple[str, float, bool]]]


def _throughput(results: list[Any]) -> list[tuple[str, float, bool]]:
    fastest = max(results, key=lambda r: r["runs_per_second"])
    return [
        ("runs/s", fastest["runs_per_second"], True),
        ("worker CPU us/run", fastest["cpu_us_per_run"], False),
        ("backends CPU us/run", fastest["db_cpu_us_per_run"], False),
    ]


def _latency(results: list[Any]) -> list[tuple[str, float, bool]]:
    return [
        ("p50 ms", statistics.median(r["p50_ms"] for r in results), False),
        ("p99 ms", statistics.median(r["p99_ms"] for r in results), False),
    ]


def _idle(results: list[Any]) -> list[tuple[str, float, bool]]:
    return [
        ("(f) idle CPU %", statistics.median(r["cpu_percent"] for r in results), False),
        ("(f) queries/min", statistics.median(r["queries_per_minute"] for r in results), False),
        ("(g) RSS idle MB", statistics.median(r["rss_idle_mb"] for r in results), False),
        ("(g) RSS loaded MB", statistics.median(r["rss_loaded_mb"] for r in results), False),
    ]


def _ingest(results: list[Any]) -> list[tuple[str, float, bool]]:
    def rows(observer: bool) -> float:
        return max(
            float(r["rows_per_second"])
            for run in results
            for r in run
            if r["wake"] and r["observer"] == observer and not r["waiting_worker"]
        )

    return [("rows/s, observer on", rows(True), True), ("rows/s, observer off", rows(False), True)]


FIGURES = [
    Figure("a", "(a) one worker, one stage", "throughput --single", _throughput),
    Figure("a_off", "(a), observer off", "throughput --single --observer-off", _throughput),
    Figure("b", "(b) three stages, supervisor", "throughput --three", _throughput),
    Figure("b_off", "(b), observer off", "throughput --three --observer-off", _throughput),
    Figure("c", "(c) commit -> handler start", "latency", _latency),
    Figure("d", "(d) end to end, three stages", "latency --three", _latency),
    Figure("e", "(e) (a) beside 1,000,000 finished runs", "throughput --million", _throughput),
    Figure("f", "(f), (g) an idle worker", "idle", _idle),
    Figure("h", "(h) ingest, one run per INSERT", "ingest", _ingest),
]
_LETTERS = {"a": ["a", "a_off"], "b": ["b", "b_off"], "c": ["c"], "d": ["d"], "e": ["e"]}
_LETTERS |= {"f": ["f"], "g": ["f"], "h": ["h"]}


@contextmanager
def worktree(ref: str) -> Iterator[tuple[Path, str]]:
    """REF checked out in a temporary worktree of this repository: its path and commit."""
    found = subprocess.run(
        ["git", "rev-parse", "--verify", "--quiet", f"{ref}^{{commit}}"],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    if found.returncode != 0:
        raise SystemExit(f"no commit named {ref!r} in {ROOT}: {found.stderr.strip()}".strip(": "))
    commit = found.stdout.strip()
    with tempfile.TemporaryDirectory(prefix="conveyor-versus-") as parent:
        path = Path(parent) / "tree"
        _git("worktree", "add", "--detach", "--quiet", str(path), commit)
        try:
            yield path, commit
        finally:
            _git("worktree", "remove", "--force", str(path))


def _git(*args: str) -> str:
    done = subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"git {' '.join(args)}: {done.stderr.strip() or 'failed'}")
    return done.stdout.strip()


def measure(tree: Path, key: str, tiny: bool) -> Any:
    """One figure measured by `tree`'s benchmark code in a process of its own."""
    done = subprocess.run(
        [sys.executable, "-c", _MEASURE, key, "tiny" if tiny else "full"],
        cwd=tree,
        env={**os.environ, "PYTHONPATH": str(tree)},
        stdout=subprocess.PIPE,
        text=True,
    )
    lines = done.stdout.strip().splitlines()
    if done.returncode != 0 or not lines:
        raise SystemExit(f"{key} from {tree} failed (exit {done.returncode})")
    return json.loads(lines[-1])


def compare(
    before: Path, after: Path, keys: list[str], rounds: int, tiny: bool
) -> dict[str, tuple[list[Any], list[Any]]]:
    """Every figure of `keys` from both trees, ABBA per round: (before's, after's) results."""
    found: dict[str, tuple[list[Any], list[Any]]] = {key: ([], []) for key in keys}
    for key in keys:
        for _ in range(rounds):
            for tree in (before, after, after, before):
                print(f"measuring {key} from {tree} ...", file=sys.stderr, flush=True)
                found[key][tree == after].append(measure(tree, key, tiny))
    return found


HEADER = ("figure", "before", "after", "after / before", "command")


def rows(found: dict[str, tuple[list[Any], list[Any]]]) -> list[tuple[str, ...]]:
    out: list[tuple[str, ...]] = []
    for figure in FIGURES:
        if figure.key not in found:
            continue
        before, after = (figure.read(results) for results in found[figure.key])
        for (what, old, better_higher), (_, new, _) in zip(before, after, strict=True):
            note = "higher is better" if better_higher else "lower is better"
            out.append(
                (
                    f"{figure.name}: {what}",
                    _number(old),
                    _number(new),
                    f"{ratio(new, old)} ({note})",
                    f"python -m benchmarks.{figure.command}",
                )
            )
    return out


def _number(value: float) -> str:
    return f"{value:,.2f}" if abs(value) < 100 else f"{value:,.0f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("ref", help="the commit to compare this tree with, e.g. v0.1 or HEAD~5")
    parser.add_argument("--rounds", type=int, default=1, help="ABBA rounds (2 runs each)")
    parser.add_argument("--only", default="a,b,c,d,e,f,h", help="letters, comma-separated")
    parser.add_argument("--tiny", action="store_true", help="a second per figure, for tests")
    args = parser.parse_args()
    letters = [letter.strip() for letter in args.only.split(",") if letter.strip()]
    unknown = [letter for letter in letters if letter not in _LETTERS]
    if unknown or not letters:
        parser.error(f"--only takes letters among {', '.join(_LETTERS)}: not {unknown or ''}")
    if args.rounds < 1:
        parser.error("--rounds is at least 1")
    keys = [f.key for f in FIGURES if any(f.key in _LETTERS[letter] for letter in letters)]
    with worktree(args.ref) as (before, commit):
        found = compare(before, ROOT, keys, args.rounds, args.tiny)
    print(f"before: {args.ref} ({commit[:10]}); after: this tree ({ROOT})")
    print(grid(HEADER, rows(found)))
    print(f"\n{args.rounds} ABBA round(s); {COMMAND} {args.ref} --only {args.only}")


if __name__ == "__main__":
    main()
