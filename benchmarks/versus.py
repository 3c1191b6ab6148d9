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
import math
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

# Run in each tree, with that tree's benchmark code: one figure, printed as JSON. argv: the
# module, its function, keyword arguments as JSON ("scale.<name>": that field of the Scale).
# A tree whose results lack a field shows n/a for it (CPU per run in the backends came later).
_MEASURE = """
import dataclasses, importlib, json, sys
from benchmarks.harness import BenchDatabase, Scale

module, function, arguments, size = sys.argv[1:]
scale = Scale.small() if size == "tiny" else Scale()
kwargs = {
    name: getattr(scale, value[6:]) if str(value).startswith("scale.") else value
    for name, value in json.loads(arguments).items()
}
call = getattr(importlib.import_module(f"benchmarks.{module}"), function)
with BenchDatabase.create() as db:
    result = call(db, scale, **kwargs)
as_dicts = [dataclasses.asdict(r) for r in result] if isinstance(result, list) else (
    dataclasses.asdict(result))
print(json.dumps(as_dicts))
"""


@dataclass(frozen=True)
class Figure:
    key: str
    name: str
    command: str  # the command that measures it alone
    call: tuple[str, str, dict[str, Any]]  # what _MEASURE calls: module, function, arguments
    # its figures from one tree's measurements: (what, value, higher is better)
    read: Callable[[list[Any]], list[tuple[str, float, bool]]]


NA = math.nan  # a figure a tree's results do not hold, or that none of its runs gave


def _field(result: Any, name: str) -> float:
    value = result.get(name)
    return float(value) if isinstance(value, int | float) else NA


def _median(results: list[Any], name: str) -> float:
    values = [_field(r, name) for r in results]
    return statistics.median(values) if values else NA


def _throughput(results: list[Any]) -> list[tuple[str, float, bool]]:
    fastest: Any = max(results, key=lambda r: _field(r, "runs_per_second"), default={})
    return [
        ("runs/s", _field(fastest, "runs_per_second"), True),
        ("worker CPU us/run", _field(fastest, "cpu_us_per_run"), False),
        ("backends CPU us/run", _field(fastest, "db_cpu_us_per_run"), False),
    ]


def _latency(results: list[Any]) -> list[tuple[str, float, bool]]:
    return [
        ("p50 ms", _median(results, "p50_ms"), False),
        ("p99 ms", _median(results, "p99_ms"), False),
    ]


def _idle(results: list[Any]) -> list[tuple[str, float, bool]]:
    return [
        ("(f) idle CPU %", _median(results, "cpu_percent"), False),
        ("(f) queries/min", _median(results, "queries_per_minute"), False),
        ("(g) RSS idle MB", _median(results, "rss_idle_mb"), False),
        ("(g) RSS loaded MB", _median(results, "rss_loaded_mb"), False),
    ]


def _ingest(results: list[Any]) -> list[tuple[str, float, bool]]:
    def fastest(observer: bool) -> float:
        return max(
            (
                _field(r, "rows_per_second")
                for run in results
                for r in run
                if r.get("wake") and r.get("observer") == observer and not r.get("waiting_worker")
            ),
            default=NA,
        )

    return [
        ("rows/s, observer on", fastest(True), True),
        ("rows/s, observer off", fastest(False), True),
    ]


_OFF: dict[str, Any] = {"observer": False}
FIGURES = [
    Figure(
        "a",
        "(a) one worker, one stage",
        "throughput --single",
        ("throughput", "single", {}),
        _throughput,
    ),
    Figure(
        "a_off",
        "(a), observer off",
        "throughput --single --observer-off",
        ("throughput", "single", _OFF),
        _throughput,
    ),
    Figure(
        "b",
        "(b) three stages, supervisor",
        "throughput --three",
        ("throughput", "three", {}),
        _throughput,
    ),
    Figure(
        "b_off",
        "(b), observer off",
        "throughput --three --observer-off",
        ("throughput", "three", _OFF),
        _throughput,
    ),
    Figure(
        "c", "(c) commit -> handler start", "latency", ("latency", "commit_to_start", {}), _latency
    ),
    Figure(
        "d",
        "(d) end to end, three stages",
        "latency --three",
        ("latency", "end_to_end", {}),
        _latency,
    ),
    Figure(
        "e",
        "(e) (a) beside 1,000,000 finished runs",
        "throughput --million",
        ("throughput", "single", {"history": "scale.million"}),
        _throughput,
    ),
    Figure(
        "f", "(f), (g) an idle worker", "idle", ("idle", "measure", {"load_runs": 20_000}), _idle
    ),
    Figure("h", "(h) ingest, one run per INSERT", "ingest", ("ingest", "measure_all", {}), _ingest),
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
        # An editable install maps conveyor.sql to the sql/ of the tree it was installed from;
        # the worktree's conveyor (first on PYTHONPATH) must find its own statements first.
        own_sql = path / "conveyor" / "sql"
        if (path / "sql" / "__init__.py").exists() and not own_sql.exists():
            own_sql.symlink_to(Path("..") / "sql", target_is_directory=True)
        try:
            yield path, commit
        finally:
            removed = subprocess.run(
                ["git", "worktree", "remove", "--force", str(path)],
                cwd=ROOT,
                capture_output=True,
                text=True,
            )
            if removed.returncode != 0:
                print(
                    f"could not remove the worktree {path} ({removed.stderr.strip()}):"
                    " `git worktree prune` forgets it",
                    file=sys.stderr,
                )


def _git(*args: str) -> str:
    done = subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"git {' '.join(args)}: {done.stderr.strip() or 'failed'}")
    return done.stdout.strip()


def measure(tree: Path, figure: Figure, tiny: bool) -> Any:
    """One figure measured by `tree`'s benchmark code in a process of its own: its results, or
    None when that process failed (its error is on stderr) or its output does not end in them."""
    module, function, arguments = figure.call
    if tiny and "load_runs" in arguments:
        arguments = {**arguments, "load_runs": 500}
    child = subprocess.Popen(
        [
            sys.executable,
            "-c",
            _MEASURE,
            module,
            function,
            json.dumps(arguments),
            "tiny" if tiny else "full",
        ],
        cwd=tree,
        env={**os.environ, "PYTHONPATH": str(tree)},
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        out, _ = child.communicate()
    except KeyboardInterrupt:
        # Ctrl-C reached the child too: let it stop its processes and drop its database.
        child.wait(60)
        raise
    lines = out.strip().splitlines()
    if child.returncode != 0 or not lines:
        return None
    try:
        return json.loads(lines[-1])
    except ValueError:  # something else printed last (at exit, say): no figure to read
        print(f"unreadable output: {lines[-1][:200]!r}", file=sys.stderr, flush=True)
        return None


def compare(
    before: tuple[str, Path], after: tuple[str, Path], keys: list[str], rounds: int, tiny: bool
) -> dict[str, tuple[list[Any], list[Any]]]:
    """Every figure of `keys` from both trees (each a name and a path), ABBA per round:
    (before's, after's) results. A measurement that fails is said and left out."""
    figures = {figure.key: figure for figure in FIGURES}
    found: dict[str, tuple[list[Any], list[Any]]] = {key: ([], []) for key in keys}
    for key in keys:
        for _ in range(rounds):
            for side, (name, tree) in ((0, before), (1, after), (1, after), (0, before)):
                print(f"measuring {key} from {name} ...", file=sys.stderr, flush=True)
                result = measure(tree, figures[key], tiny)
                if result is None:
                    print(f"{key} from {name} failed: left out", file=sys.stderr, flush=True)
                else:
                    found[key][side].append(result)
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
    if not math.isfinite(value):
        return "n/a"
    return f"{value:,.2f}" if abs(value) < 100 else f"{value:,.0f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("ref", help="the commit to compare this tree with, e.g. v0.1 or HEAD~5")
    parser.add_argument(
        "--rounds", type=int, default=1, help="ABBA rounds: 4 runs of each figure, 2 per tree"
    )
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
        found = compare((args.ref, before), ("this tree", ROOT), keys, args.rounds, args.tiny)
    print(f"before: {args.ref} ({commit[:10]}); after: this tree ({ROOT})")
    print(grid(HEADER, rows(found)))
    flags = f" --rounds {args.rounds}" if args.rounds != 1 else ""
    flags += " --tiny" if args.tiny else ""
    print(f"\n{args.rounds} ABBA round(s); {COMMAND} {args.ref} --only {args.only}{flags}")


if __name__ == "__main__":
    main()
