"""A pipeline for the console's tests: stage "check" fails (once, with max_attempts=1) until the
file named by the run's input "gate" exists, so a test can fail a run, open the gate, and retry."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from conveyor import Backoff, Pipeline, Run, Stage


def check(run: Run) -> dict[str, Any]:
    gate = Path(str(run.input.get("gate", "")))
    if not gate.is_file():
        raise RuntimeError(f"gate {gate} is closed")
    return {"gate": "open", "attempt": run.attempt}


def finish(run: Run) -> dict[str, Any]:
    return {"finished": True, "checked": run.outputs["check"]["gate"]}


gated = Pipeline(
    "gated",
    [
        Stage(
            "check",
            check,
            consumes="NEW",
            working="CHECKING",
            produces="CHECKED",
            max_attempts=1,
            backoff=Backoff(base=0.05, cap=0.1),
        ),
        Stage("finish", finish, consumes="CHECKED", working="FINISHING", produces="DONE"),
    ],
)
