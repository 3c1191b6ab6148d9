"""The engine holds nothing of its demo: pipelines extend it through the public API
(Run.record_usage, Pipeline(text_input=...)), no engine module imports the agents, and the agents
import only what `conveyor` exports."""

from __future__ import annotations

import ast
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

import pytest

import conveyor
from conveyor import Pipeline, PipelineError, Run, Stage, Usage
from conveyor.settings import Settings

PACKAGE = Path(conveyor.__file__).parent
# Where the reference pipeline is bound to the engine (by import path, CONVEYOR_PIPELINE) and
# the application layer that registers the agents' commands; everything else is the engine.
GLUE = {"reference.py", "cli.py", "demo.py"}


def _run() -> Run:
    return Run(uuid.uuid4(), "p", "s", {}, {}, 1)


def _handler(run: Run) -> dict[str, Any]:
    return {}


def test_record_usage_adds_up_and_keeps_the_last_service() -> None:
    run = _run()
    assert run.usage is None
    run.record_usage("gpt-small", input_units=11, output_units=7)
    run.record_usage("gpt-large", 4)
    assert run.usage == Usage("gpt-large", input_units=15, output_units=7)


@pytest.mark.parametrize(
    ("service", "units"),
    [("", 1), ("a\x00b", 1), ("svc", -1), ("svc", 2**31), ("svc", 1.5), ("svc", "3")],
)
def test_record_usage_refuses_what_the_event_cannot_store(service: str, units: Any) -> None:
    run = _run()
    with pytest.raises(ValueError, match=r"Run\.record_usage"):
        run.record_usage(service, input_units=units)
    assert run.usage is None


def test_usage_that_adds_up_past_the_columns_is_refused() -> None:
    run = _run()
    run.record_usage("svc", 2**31 - 1)
    with pytest.raises(ValueError, match="add up"):
        run.record_usage("svc", 1)


def test_text_input_is_generic_by_default_and_declared_per_pipeline() -> None:
    stages = [Stage("only", _handler, consumes="NEW", produces="DONE")]
    plain = Pipeline("plain", stages)
    assert plain.text_input("hello") == {"text": "hello"}
    assert plain.text_input("hello", session="s1") == {"text": "hello", "session_id": "s1"}

    def ticket(text: str, session: str | None = None) -> dict[str, Any]:
        return {"subject": text}

    custom = Pipeline("tickets", stages, text_input=ticket)
    assert custom.text_input("printer on fire") == {"subject": "printer on fire"}
    tuned = custom.with_settings(Settings.from_env({"CONVEYOR_ONLY_CONCURRENCY": "2"}))
    assert tuned.text_input is ticket and tuned.stage("only").concurrency == 2
    with pytest.raises(PipelineError, match="text_input is not callable"):
        Pipeline("broken", stages, text_input="nope")  # type: ignore[arg-type]


def test_the_reference_pipeline_takes_a_question_and_a_session() -> None:
    from conveyor import reference

    assert reference.pipeline.name == reference.NAME
    assert reference.pipeline.text_input("Why?") == {"question": "Why?"}
    assert reference.pipeline.text_input("Why?", session="s") == {
        "question": "Why?",
        "session_id": "s",
    }


def test_the_engine_and_the_reference_name_load_without_the_agents() -> None:
    code = (
        "import sys, conveyor, conveyor.runs, conveyor.worker.runner, conveyor.protocol;"
        "from conveyor.reference import NAME;"
        "print(NAME, sorted(m for m in sys.modules if m.startswith('conveyor.agents')))"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True
    )
    assert result.stdout.split(maxsplit=1) == ["agents", "[]\n"]


def _imports(path: Path) -> list[tuple[str, list[str]]]:
    """(module, names) of every import in a file, `import x` as (x, [])."""
    found: list[tuple[str, list[str]]] = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.append((node.module, [alias.name for alias in node.names]))
        elif isinstance(node, ast.Import):
            found.extend((alias.name, []) for alias in node.names)
    return found


def test_no_engine_module_imports_an_agents_module() -> None:
    engine = [
        path
        for path in PACKAGE.rglob("*.py")
        if "agents" not in path.relative_to(PACKAGE).parts
        and str(path.relative_to(PACKAGE)) not in GLUE
        and "commands" not in path.relative_to(PACKAGE).parts  # the CLI's command modules
    ]
    assert len(engine) > 20
    for path in engine:
        for module, _names in _imports(path):
            assert not module.startswith("conveyor.agents"), (path, module)
            assert module != "conveyor.reference" or path.name == "runs.py", (path, module)


def test_the_agents_import_only_the_public_api() -> None:
    public = set(conveyor.__all__)
    agents = list((PACKAGE / "agents").rglob("*.py"))
    assert len(agents) > 5
    for path in agents:
        for module, names in _imports(path):
            if module == "conveyor":
                assert set(names) <= public, (path, set(names) - public)
            else:
                assert not module.startswith("conveyor") or module.startswith("conveyor.agents"), (
                    path,
                    module,
                )


def test_no_engine_type_carries_an_llm_field() -> None:
    from conveyor.results import Success

    for cls in (Run, Success, Usage):
        fields = {name.lower() for name in getattr(cls, "__slots__", ())} | set(
            getattr(cls, "__dataclass_fields__", {})
        )
        assert not {f for f in fields if "llm" in f or "token" in f or "model" in f}, cls
