"""How the run commands print: plain tables, a run with its history, a run as JSON."""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any
from uuid import uuid4

import click

from conveyor import runs


def table(header: tuple[str, ...], rows: Sequence[tuple[Any, ...]]) -> str:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    lines = [
        "  ".join(str(v).ljust(w) for v, w in zip(r, widths, strict=True)).rstrip()
        for r in [header, *rows]
    ]
    return "\n".join(lines)


def print_workers(workers: list[dict[str, Any]]) -> None:
    """Processes whose heartbeat is fresh: one that stops beating drops out of this list."""
    click.echo("")
    if not workers:
        click.echo("no live workers")
        return
    rows = [
        (
            w["pipeline"],
            w["stage"],
            w["worker_id"],
            f"{w['hostname']}:{w['pid']}",
            f"{w['beat_age_seconds']:.1f}s ago",
            "idle" if w["waiting"] else "busy",
        )
        for w in workers
    ]
    click.echo(table(("PIPELINE", "STAGE", "WORKER", "HOST:PID", "LAST BEAT", "STATE"), rows))


def print_run(
    run: dict[str, Any],
    history: list[dict[str, Any]],
    as_json: bool,
    children: dict[str, Any] | None = None,
) -> None:
    if as_json:
        click.echo(run_json(run, history, children))
        return
    click.echo(f"run       {run['id']}  ({run['pipeline']})")
    click.echo(f"status    {run['status']}  attempt {run['attempt']}  rescues {run['rescues']}")
    if run.get("parent_id") is not None:
        click.echo(f"parent    {run['parent_id']}  (child {run['child_index']})")
    route = runs.route_of(history)
    if route:
        click.echo(f"route: {' -> '.join([*route, run['status']])}")
    if children and children["total"]:
        _print_children(run, children)
    click.echo(f"input     {json_text(run['input'])}")
    outputs = run["outputs"]
    if isinstance(outputs, runs.DeepJSON):
        click.echo(f"outputs   {outputs.text}")
    else:
        for stage, output in outputs.items():
            click.echo(f"{stage:<9} {json_text(output)}")
    if run["last_error"]:
        click.echo(f"error     {run['last_error'].splitlines()[-1]}")
    if history:
        rows = [
            (
                h["created_at"].strftime("%H:%M:%S.%f")[:-3],
                h["stage"] or "",
                f"{h['from_status'] or ''} -> {h['to_status']}",
                str(h["attempt"] or ""),
                "" if h["duration_seconds"] is None else f"{h['duration_seconds'] * 1000:.1f}ms",
                h["worker"] or "",
                (h["error"] or "").splitlines()[-1][:60] if h["error"] else "",
            )
            for h in history
        ]
        click.echo("")
        click.echo(
            table(("AT", "STAGE", "TRANSITION", "ATTEMPT", "DURATION", "WORKER", "ERROR"), rows)
        )


def _print_children(run: dict[str, Any], children: dict[str, Any]) -> None:
    counts = ", ".join(f"{status} {n}" for status, n in children["by_status"].items())
    waiting = run.get("children_pending")
    still = f"; waiting for {waiting}" if waiting and run["finished_at"] is None else ""
    click.echo(f"children  {children['total']} ({counts}){still}")
    for child in children["first"]:
        click.echo(f"  {child['index']:>6}  {child['id']}  {child['status']}")
    if children["total"] > len(children["first"]):
        click.echo(f"  ... and {children['total'] - len(children['first'])} more")


def json_text(value: Any) -> str:
    """JSON too deep for Python to write is printed as PostgreSQL wrote it."""
    return value.text if isinstance(value, runs.DeepJSON) else json.dumps(value)


def run_json(
    run: dict[str, Any], history: list[dict[str, Any]], children: dict[str, Any] | None = None
) -> str:
    """The run as one JSON document; a DeepJSON value goes in as PostgreSQL's text (json.dumps
    would recurse once per level), in place of a unique marker."""
    deep = {key: value.text for key, value in run.items() if isinstance(value, runs.DeepJSON)}
    markers = {key: f"conveyor-deep-json-{uuid4().hex}" for key in deep}
    document = {**run, **markers, "route": runs.route_of(history), "history": history}
    if children is not None:
        document["children"] = children
    text = json.dumps(document, default=str, indent=2)
    for key, marker in markers.items():
        text = text.replace(json.dumps(marker), deep[key], 1)
    return text
