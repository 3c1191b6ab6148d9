"""benchmarks.versus measures each figure from the two trees in ABBA order and files each
result under the tree that measured it; a failed measurement is left out, not a reason to lose
the others."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from benchmarks import versus


def test_each_result_is_filed_under_its_tree_in_abba_order(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    calls: list[tuple[str, str]] = []

    def measure(tree: Path, figure: versus.Figure, tiny: bool) -> Any:
        calls.append((tree.name, figure.key))
        if (tree.name, figure.key, len(calls)) == ("old", "c", 8):
            return None  # the second "old" run of c fails
        return {"runs_per_second": len(calls), "tree": tree.name}

    monkeypatch.setattr(versus, "measure", measure)
    found = versus.compare(("REF", Path("old")), ("this tree", Path("new")), ["a", "c"], 1, True)

    assert calls == [
        ("old", "a"), ("new", "a"), ("new", "a"), ("old", "a"),
        ("old", "c"), ("new", "c"), ("new", "c"), ("old", "c"),
    ]  # fmt: skip
    assert [r["tree"] for r in found["a"][0]] == ["old", "old"]
    assert [r["tree"] for r in found["a"][1]] == ["new", "new"]
    assert [r["runs_per_second"] for r in found["c"][0]] == [5]  # the failed run left out
    assert [r["runs_per_second"] for r in found["c"][1]] == [6, 7]


def test_a_figure_a_tree_does_not_give_reads_as_not_available() -> None:
    found = {
        "a": ([{"runs_per_second": 100.0, "cpu_us_per_run": 10.0}], []),  # old: no backends field
    }
    rows = versus.rows(found)
    by_what = {row[0]: row for row in rows}
    runs = by_what["(a) one worker, one stage: runs/s"]
    assert (runs[1], runs[2], runs[3].split()[0]) == ("100", "n/a", "n/a")
    backends = by_what["(a) one worker, one stage: backends CPU us/run"]
    assert (backends[1], backends[2]) == ("n/a", "n/a")


def test_a_figure_whose_output_does_not_end_in_its_result_is_left_out(tmp_path: Path) -> None:
    """A tree whose benchmark prints something else last (at exit, here) gives no figure: the
    run goes on without it, never ends in a traceback."""
    package = tmp_path / "benchmarks"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "harness.py").write_text(
        "import contextlib\n"
        "class Scale:\n"
        "    @classmethod\n"
        "    def small(cls): return cls()\n"
        "class BenchDatabase:\n"
        "    @classmethod\n"
        "    @contextlib.contextmanager\n"
        "    def create(cls): yield None\n"
    )
    (package / "noisy.py").write_text(
        "import atexit, dataclasses\n"
        "@dataclasses.dataclass\n"
        "class Result:\n"
        "    runs_per_second: float\n"
        "def measure(db, scale):\n"
        "    atexit.register(print, 'bye')\n"
        "    return Result(1.0)\n"
        "def quiet(db, scale):\n"
        "    return Result(2.0)\n"
    )
    noisy = versus.Figure("x", "noisy", "noisy", ("noisy", "measure", {}), lambda results: [])
    quiet = versus.Figure("y", "quiet", "noisy", ("noisy", "quiet", {}), lambda results: [])
    assert versus.measure(tmp_path, noisy, False) is None
    assert versus.measure(tmp_path, quiet, False) == {"runs_per_second": 2.0}
