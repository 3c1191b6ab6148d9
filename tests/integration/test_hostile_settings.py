"""Hostile values at the edges, through the real `conveyor` command.

Every CLI option and environment variable gets what a typo, a script with an unset variable or an
attacker would give it: inf, NaN, negatives, huge numbers, empty and non-UTF-8 text, malformed
database and LLM URLs. Each must end in exit code 2 and one last line naming the option or
variable, with no traceback and no password. A handler's output that cannot be a JSON object fails
its run at once with a one-line error, and the worker lives on; a run whose JSON is too deep for
Python's json still shows.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import psycopg

from tests.helpers import ROOT, ConveyorProcess, conveyor_env, fetch_all, scalar, wait_until
from tests.unit.test_hostile_settings import AGENT_VALUES, BAD_UTF8, ENGINE_VALUES, LLM, SECRET

WORKER = ("worker", "--stage", "analyze")
DEEP_JSON = "[" * 1500 + "]" * 1500


@dataclass(frozen=True)
class Case:
    args: tuple[str, ...]
    names: str  # what the last line of output must name: the option, variable or line
    env: dict[str, str | None] = field(default_factory=dict)  # None removes the variable
    stdin: bytes | None = None


def _option_cases() -> list[Case]:
    cases = [
        Case(("submit", "x", "--delay", value), "--delay")
        for value in ("inf", "nan", "-1", "1e308", "-inf")
    ]
    cases += [
        Case(("submit", "x", "--wait", "--timeout", value), "--timeout")
        for value in ("inf", "nan", "-1", "1e308")
    ]
    cases += [
        Case(("submit", "x", "--priority", value), "--priority")
        for value in ("99999999999999999999", "-40000")
    ]
    cases += [
        Case(("submit", "", "--wait"), "TEXT"),
        Case(("submit", "   "), "TEXT"),
        Case(("submit", f"x{BAD_UTF8}y"), "TEXT"),
        Case(("submit", "x", "--session", f"a{BAD_UTF8}"), "--session"),
        Case(("submit", "x", "--key", ""), "--key"),
        Case(("submit", "x", "--key", f"k{BAD_UTF8}"), "--key"),
        Case(("submit-many", "-", "--priority", "99999999"), "--priority", stdin=b"{}\n"),
    ]
    cases += [
        Case(("status", "--watch", "--interval", value), "--interval")
        for value in ("-1", "0", "nan", "inf", "1e308")
    ]
    cases += [
        Case((command, value), "RUN_ID")
        for command in ("show", "cancel", "retry")
        for value in ("not-a-uuid", "", "1" * 40)
    ]
    cases += [
        Case(("prune", "--older-than", value), "--older-than")
        for value in ("99999999999999w", "1" * 400, "1e308", "inf", "nan", "-1d", "0", "")
    ]
    cases += [
        Case(("demo", "--questions", value), "--questions")
        for value in ("-1", "99999999999999999999")
    ]
    cases += [
        Case(("retry", "--failed", "--stage", "nope"), "no stage 'nope'"),
        Case(("worker", "--stage", ""), "no stage ''"),
        Case(("memory", "search", "x", "--limit", "0"), "--limit"),
        Case(("memory", "search", f"q{BAD_UTF8}"), "QUERY"),
        Case(("memory", "search", "x", "--namespace", ""), "--namespace"),
        Case(("memory", "search", "x", "--namespace", "n" * 201), "--namespace"),
        Case(("memory", "add", "README.md", "--namespace", f"n{BAD_UTF8}"), "--namespace"),
    ]
    return cases


def _submit_many_cases() -> list[Case]:
    lines = [
        b"[1, 2]",
        b'"text"',
        b'{"a": NaN}',
        b'{"a": 1e999}',
        b'{"a": "\\udcff"}',
        b'{"a": "\xff"}',
        b'{"a": ' + DEEP_JSON.encode() + b"}",
        b"{",
        b"",
    ]
    cases = [
        Case(("submit-many", "-"), "run 2", stdin=b'{"ok": 1}\n' + line + b"\n") for line in lines
    ]
    # What only the server refuses (a NUL): its context names the line.
    cases.append(Case(("submit-many", "-"), "line 2", stdin=b'{"ok": 1}\n{"a": "\\u0000"}\n'))
    return cases


def _environment_cases() -> list[Case]:
    """Every database URL through the real command (its output must not show the password), and
    for every other variable its first hostile value (tests/unit tries them all in process)."""
    cases = [
        Case(WORKER, name, {name: value})
        for name in ("CONVEYOR_DATABASE_URL", "CONVEYOR_LISTEN_DATABASE_URL")
        for value in ENGINE_VALUES[name]
    ]
    cases.append(
        Case(
            ("status",),
            "DATABASE_URL",
            {"CONVEYOR_DATABASE_URL": None, "DATABASE_URL": ENGINE_VALUES["DATABASE_URL"][0]},
        )
    )
    cases += [
        Case(WORKER, name, {name: values[0]})
        for name, values in ENGINE_VALUES.items()
        if not name.endswith("DATABASE_URL")
    ]
    cases += [Case(WORKER, name, {**LLM, name: values[0]}) for name, values in AGENT_VALUES.items()]
    cases += [
        Case(WORKER, "CONVEYOR_LLM_BASE_URL", {**LLM, "CONVEYOR_LLM_BASE_URL": value})
        for value in AGENT_VALUES["CONVEYOR_LLM_BASE_URL"][1:5]  # every form of userinfo
    ]
    cases += [
        Case(
            WORKER,
            "CONVEYOR_EMBEDDINGS_BASE_URL",
            {
                **LLM,
                "CONVEYOR_EMBEDDINGS_BASE_URL": f"https://u:{SECRET}@api.example.com/v1",
                "CONVEYOR_EMBEDDINGS_MODEL": "e",
            },
        ),
        # Found when the pipeline is loaded, not when the settings are read.
        Case(WORKER, "CONVEYOR_PIPELINE", {"CONVEYOR_PIPELINE": "nope_module:pipeline"}),
        Case(WORKER, "CONVEYOR_PIPELINE", {"CONVEYOR_PIPELINE": "conveyor.reference:nothing"}),
        Case(WORKER, "CONVEYOR_NOPE_", {"CONVEYOR_NOPE_CONCURRENCY": "2"}),
        Case(("run",), "CONVEYOR_STAGES", {"CONVEYOR_STAGES": "nope=1"}),
        # Well-formed but unreachable: the connection's error, with the password hidden.
        Case(
            ("status",),
            "cannot connect",
            {"CONVEYOR_DATABASE_URL": f"postgresql://u:{SECRET}@127.0.0.1:1/db"},
        ),
        Case(
            ("status",),
            "cannot connect",
            {"CONVEYOR_DATABASE_URL": f"host=127.0.0.1 port=1 password='{SECRET} x'"},
        ),
    ]
    return cases


def _run(case: Case, database_url: str, cwd: Path) -> tuple[int, str]:
    env = conveyor_env(database_url)
    for name, value in case.env.items():
        if value is None:
            env.pop(name, None)
        else:
            env[name] = value
    try:
        done = subprocess.run(
            [sys.executable, "-m", "conveyor", *case.args],
            env=env,
            cwd=cwd,
            input=case.stdin,
            capture_output=True,
            timeout=60,
        )
    except subprocess.TimeoutExpired:  # a worker that started: the value was accepted
        return -1, "(still running after 60 s)"
    return done.returncode, (done.stdout + done.stderr).decode("utf-8", "replace")


def _why_not_held(case: Case, code: int, output: str) -> str | None:
    """None when the case held: exit 2, one last line naming what was wrong, nothing else."""
    lines = [line for line in output.splitlines() if line.strip()]
    last = lines[-1] if lines else ""
    if code != 2:
        return f"exit code {code}: {last}"
    if "Traceback" in output:
        return f"a traceback: {last}"
    if SECRET in output:
        return f"the password is shown: {last}"
    if case.names not in last:
        return f"the last line does not name {case.names!r}: {last}"
    return None


def test_every_hostile_value_ends_in_one_clear_line(database_url: str, tmp_path: Path) -> None:
    # A file name that is not UTF-8: it can be read, but not stored as a source.
    odd_name = tmp_path / os.fsdecode(b"notes-\xff.md")
    odd_name.write_text("Some notes.\n")
    cases = [
        *_option_cases(),
        *_submit_many_cases(),
        *_environment_cases(),
        Case(("memory", "add", str(odd_name)), "file name is not UTF-8"),
    ]

    def attempt(case: Case) -> str | None:
        code, output = _run(case, database_url, ROOT)
        return _why_not_held(case, code, output)

    with ThreadPoolExecutor(max_workers=6) as pool:
        outcomes = list(pool.map(attempt, cases))
    failures = [
        f"{case.args} {case.env}: {why}" for case, why in zip(cases, outcomes, strict=True) if why
    ]
    tried, held = len(cases), len(cases) - len(failures)
    print(f"hostile settings: {tried} tried, {held} held")
    assert held == tried, "\n".join(failures)


def test_accepted_extremes_make_a_worker_that_works(database_url: str, tmp_path: Path) -> None:
    """The largest values accepted still run the pipeline: bounds, not crashes later."""
    extremes = {
        "CONVEYOR_LEASE": "604800",
        "CONVEYOR_SWEEP_INTERVAL": "86400",
        "CONVEYOR_DRAIN_TIMEOUT": "86400",
        "CONVEYOR_LISTENER_CHECK_INTERVAL": "86400",
        "CONVEYOR_LISTENER_CHECK_TIMEOUT": "86400",
        "CONVEYOR_MAX_RESCUES": "1000",
        "CONVEYOR_RETENTION": "36500d",
        "CONVEYOR_ANALYZE_CONCURRENCY": "10000",
        "CONVEYOR_ANALYZE_BATCH": "10000",
        "CONVEYOR_ASSEMBLE_TIMEOUT": "604800",
        "CONVEYOR_ANSWER_MAX_ATTEMPTS": "1000",
    }
    env = conveyor_env(database_url, **extremes)
    supervisor = ConveyorProcess(["run"], env, tmp_path / "run.log")
    try:
        submitted = subprocess.run(
            [sys.executable, "-m", "conveyor", "submit", "How are leases extended?", "--json"],
            env=env,
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=60,
            check=True,
        )
        run_id = json.loads(submitted.stdout)["id"]
        wait_until(
            lambda: (
                scalar(
                    database_url,
                    "SELECT status FROM conveyor.pipeline_runs WHERE id = %s",
                    (run_id,),
                )
                == "DONE"
            ),
            60,
            "the run reached DONE",
        )
        assert supervisor.process.poll() is None
    finally:
        supervisor.stop(timeout=60)
    assert "Traceback" not in supervisor.log()


def test_outputs_that_are_not_json_objects_fail_their_run_at_once(
    database_url: str, tmp_path: Path
) -> None:
    from tests.integration.hostile_pipelines import BAD_OUTPUTS

    env = conveyor_env(
        database_url, CONVEYOR_PIPELINE="tests.integration.hostile_pipelines:pipeline"
    )
    worker = ConveyorProcess(["run"], env, tmp_path / "run.log")
    inputs = [{"bad": kind, "sync": sync} for kind in BAD_OUTPUTS for sync in (False, True)]
    try:
        with psycopg.connect(database_url, autocommit=True) as conn:
            for run_input in [*inputs, {"fine": True}]:
                conn.execute(
                    "INSERT INTO conveyor.pipeline_runs (pipeline, input) VALUES ('hostile', %s)",
                    (json.dumps(run_input),),
                )
        wait_until(
            lambda: (
                scalar(
                    database_url,
                    "SELECT count(*) FROM conveyor.pipeline_runs WHERE finished_at IS NOT NULL",
                )
                == len(inputs) + 1
            ),
            90,
            "every run finished",
        )
        assert worker.process.poll() is None, "the worker died"
    finally:
        worker.stop(timeout=60)
    rows = fetch_all(
        database_url,
        "SELECT input, status, attempt, last_error FROM conveyor.pipeline_runs",
    )
    for run_input, status, attempt, error in rows:
        if run_input.get("fine"):
            assert status == "DONE"
            continue
        stage = "emit_sync" if run_input["sync"] else "emit"
        assert status == "FAILED", run_input
        assert attempt == 1, f"{run_input}: a bad output is not retried"
        assert error.startswith(f"OutputError: stage {stage!r} returned "), error
        assert "\n" not in error and "Traceback" not in error, error
    assert "Traceback" not in worker.log()


def test_a_run_too_deep_for_python_json_still_shows(database_url: str) -> None:
    with psycopg.connect(database_url, autocommit=True) as conn:
        row = conn.execute(
            "INSERT INTO conveyor.pipeline_runs (pipeline, input, run_after)"
            " VALUES ('agents', %s::jsonb, 'infinity') RETURNING id",
            (f'{{"q": {DEEP_JSON}}}',),
        ).fetchone()
        assert row is not None
        run_id = str(row[0])
        conn.execute(
            "UPDATE conveyor.pipeline_runs SET outputs = jsonb_build_object('analyze', input)"
            " WHERE id = %s",
            (run_id,),
        )
    env = conveyor_env(database_url)
    for extra in ([], ["--json"]):
        shown = subprocess.run(
            [sys.executable, "-m", "conveyor", "show", run_id, *extra],
            env=env,
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert shown.returncode == 0, shown.stderr
        assert "Traceback" not in shown.stdout + shown.stderr
        assert DEEP_JSON in shown.stdout
    document = shown.stdout
    assert document.startswith("{") and f'"id": "{run_id}"' in document
    assert '"run_after": "infinity"' in document
