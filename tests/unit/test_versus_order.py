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
