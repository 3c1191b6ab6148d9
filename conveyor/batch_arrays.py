"""The batched statements' columns as PostgreSQL array literals (they unnest them). Written here
in one pass: adapting a list element by element costs several times more per run."""

from __future__ import annotations

from uuid import UUID

from conveyor.handler_run import Usage
from conveyor.routes import Destination

# complete_if_leased's routing arrays for a stage without routes or loops.
NOT_ROUTED = {
    "targets": "{}",
    "ends": "{}",
    "loop_stages": "{}",
    "loop_limits": "{}",
    "loop_errors": "{}",
    "counts_visits": False,
}


def routing_arrays(
    found: list[Destination], *, stage: str, counts_visits: bool
) -> dict[str, object]:
    """complete_if_leased's routing arrays: where each run of the batch goes (`found`) from
    `stage`, and whether that stage counts its own visits (it is on a loop)."""
    return {
        "targets": text_array([d.status for d in found]),
        "ends": bool_array([d.ends for d in found]),
        "loop_stages": text_array([d.loop_stage for d in found]),
        # the visits already counted at which a route into the loop stage ends the run
        "loop_limits": number_array(
            [
                None if d.max_visits is None else d.max_visits - (d.loop_stage == stage)
                for d in found
            ]
        ),
        "loop_errors": text_array([_loop_error(d, stage) for d in found]),
        "counts_visits": counts_visits,
    }


def _loop_error(found: Destination, stage: str) -> str | None:
    """The error of a run whose loop ends on this route: a format() string, %s its visits."""
    if found.loop_stage is None:
        return None
    loop, sender, target = (
        name.replace("%", "%%") for name in (found.loop_stage, stage, found.status)
    )
    return (
        f"loop ended: stage {loop} has run %s times for this run (max_visits {found.max_visits}),"
        f" and stage {sender} sent it back to {target}"
    )


# unnest() pads shorter arrays with NULLs: a batch in which no handler recorded usage sends
# empty arrays, and its events get NULL usage, as they would from arrays of NULLs.
_NO_USAGE = {"models": "{}", "prompt_tokens": "{}", "completion_tokens": "{}"}


def usage_arrays(usages: list[Usage | None]) -> dict[str, str]:
    """complete_if_leased's usage arrays, one element per run (NULL where none), named after the
    run_events columns they fill."""
    if not any(usages):
        return _NO_USAGE
    return {
        "models": text_array([u.service if u else None for u in usages]),
        "prompt_tokens": number_array([u.input_units if u else None for u in usages]),
        "completion_tokens": number_array([u.output_units if u else None for u in usages]),
    }


def uuid_array(values: list[UUID]) -> str:
    return "{" + ",".join([value.hex for value in values]) + "}"


def number_array(values: list[int] | list[float] | list[int | None] | list[float | None]) -> str:
    if None not in values:  # the common case, without a Python-level loop
        return "{" + ",".join(map(repr, values)) + "}"
    return "{" + ",".join(["NULL" if v is None else repr(v) for v in values]) + "}"


def microseconds_array(seconds: list[float]) -> str:
    """Times in whole microseconds (truncated): writing a float's shortest repr costs ~1.2-1.6 us
    on the 2-core machine, two per run; an integer's costs a quarter of that."""
    return "{" + ",".join([str(int(value * 1_000_000)) for value in seconds]) + "}"


def bool_array(values: list[bool]) -> str:
    return "{" + ",".join(["t" if value else "f" for value in values]) + "}"


def text_array(values: list[str] | list[str | None]) -> str:
    """Every element quoted, with backslash and double quote escaped: any text survives."""
    return (
        "{"
        + ",".join(
            "NULL" if v is None else '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'
            for v in values
        )
        + "}"
    )
