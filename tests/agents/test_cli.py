"""`conveyor memory add|search` and `conveyor demo` as a user runs them, on the test database."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import pytest

from tests.helpers import ROOT, conveyor_command, fetch_all, scalar


def conveyor(
    url: str, *args: str, cwd: Path = ROOT, **env: str
) -> subprocess.CompletedProcess[str]:
    return conveyor_command(url, *args, cwd=cwd, timeout=240, **env)


def docs(tmp_path: Path) -> Path:
    folder = tmp_path / "docs"
    folder.mkdir()
    (folder / "leases.md").write_text(
        "# Leases\n\nA lease expires after thirty seconds.\n\n## Heartbeat\n\n"
        "A heartbeat extends the lease of every run in flight.\n"
    )
    (folder / "claims.txt").write_text("Workers claim runs with SKIP LOCKED.\n")
    (folder / "image.png").write_bytes(b"\x89PNG\x00")  # not a text suffix: skipped
    return folder


def test_memory_add_then_search(database_url: str, tmp_path: Path) -> None:
    folder = docs(tmp_path)
    added = conveyor(database_url, "memory", "add", "docs", cwd=tmp_path)
    assert added.returncode == 0, added.stderr
    assert added.stdout.splitlines() == [
        "docs/claims.txt     1 chunks  added",
        "docs/leases.md      2 chunks  added",
        "2 documents in namespace 'default'",
    ]
    again = conveyor(database_url, "memory", "add", "docs/leases.md", "--json", cwd=tmp_path)
    assert json.loads(again.stdout)["documents"][0]["status"] == "unchanged"
    # The same file named from elsewhere is recognised by its text, not loaded twice.
    elsewhere = conveyor(database_url, "memory", "add", str(folder / "leases.md"))
    assert elsewhere.stdout.splitlines()[0] == (
        f"{folder / 'leases.md'}     0 chunks  unchanged"
        " (the same text is loaded as docs/leases.md)"
    )
    assert scalar(database_url, "SELECT count(*) FROM conveyor.memory") == 3

    found = conveyor(database_url, "memory", "search", "how is a lease extended?")
    assert found.returncode == 0, found.stderr
    lines = found.stdout.splitlines()
    assert re.match(r" 1\. \d\.\d{4}  document docs/leases\.md#1  Leases > Heartbeat$", lines[0])
    assert lines[1] == "    ## Heartbeat A heartbeat extends the lease of every run in flight."
    hits = json.loads(conveyor(database_url, "memory", "search", "lease", "--json").stdout)
    assert [(h["source"], h["metadata"]["position"]) for h in hits] == [
        ("docs/leases.md", 0),
        ("docs/leases.md", 1),
    ]
    elsewhere = conveyor(database_url, "memory", "search", "lease", "--namespace", "team-b")
    assert elsewhere.stdout.strip() == "nothing in team-b matches lease"


def test_memory_add_namespace(database_url: str, tmp_path: Path) -> None:
    docs(tmp_path)
    added = conveyor(database_url, "memory", "add", "docs", "--namespace", "team-b", cwd=tmp_path)
    assert added.returncode == 0, added.stderr
    assert scalar(database_url, "SELECT array_agg(DISTINCT namespace) FROM conveyor.memory") == [
        "team-b"
    ]
    found = conveyor(database_url, "memory", "search", "lease", "--namespace", "team-b", "--json")
    assert len(json.loads(found.stdout)) == 2


def test_a_bad_file_is_one_clear_message_and_nothing_is_written(
    database_url: str, tmp_path: Path
) -> None:
    folder = docs(tmp_path)
    bad = folder / "notes.txt"
    bad.write_bytes("r\xe9sum\xe9 of the design\n".encode("latin-1"))
    result = conveyor(database_url, "memory", "add", str(folder / "leases.md"), str(bad))
    assert result.returncode == 2
    assert result.stdout == ""
    assert result.stderr == (
        f"conveyor: error: {bad}: not UTF-8 text (byte 0xe9 at offset 1, line 1); "
        "convert it first, e.g. iconv -f latin1 -t utf-8\n"
    )
    assert scalar(database_url, "SELECT count(*) FROM conveyor.memory") == 0
    missing = conveyor(database_url, "memory", "add", str(tmp_path / "nope.md"))
    assert missing.returncode == 2
    assert missing.stderr.endswith("nope.md: no such file or directory\n")


def test_demo_prints_cited_answers_from_the_bundled_corpus(database_url: str) -> None:
    result = conveyor(database_url, "demo")
    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout
    assert out.startswith("memory: 9 documents of the bundled corpus")
    assert out.rstrip().endswith("8/8 answered")
    blocks = out.split("\nQ: ")[1:]
    assert len(blocks) == 8
    for block in blocks[:-1]:
        assert "\nA: " in block
        assert re.search(r"\n   \[\d\] corpus/\w+\.md > ", block), block
        assert re.search(r"analyze [\d.]+ms \| assemble [\d.]+ms \| answer [\d.]+ms", block)
        assert "route:" not in block
    assert "SKIP LOCKED" in blocks[1]
    # Nothing to search for: the analyzer routed it straight to the answer stage.
    again = blocks[-1]
    assert again.startswith("What was that again?   (session demo-")
    assert "\nA: As answered earlier in this session: " in again
    assert "\n   route: analyze -> answer\n" in again
    assert re.search(r"analyze [\d.]+ms \| answer [\d.]+ms", again)
    follow_up = blocks[-2]
    assert follow_up.startswith("And what if it keeps dying?   (session demo-")
    assert "CONVEYOR_MAX_RESCUES" in follow_up
    # The follow-up's context held the first exchange, read back from the session's memory.
    rows = fetch_all(
        database_url,
        "SELECT r.outputs->'assemble'->'context' FROM conveyor.pipeline_runs r"
        " WHERE r.input->>'question' = 'And what if it keeps dying?'",
    )
    kinds = [(c["kind"], c["source"]) for c in rows[0][0]]
    assert any(kind == "message" and source.startswith("session:demo-") for kind, source in kinds)
    # Run again: the corpus is not loaded twice.
    chunks = scalar(database_url, "SELECT count(*) FROM conveyor.memory WHERE kind = 'document'")
    again = conveyor(database_url, "demo", "--questions", "1")
    assert again.returncode == 0, again.stdout + again.stderr
    assert "(0 loaded now, 9 already there)" in again.stdout
    assert (
        scalar(database_url, "SELECT count(*) FROM conveyor.memory WHERE kind = 'document'")
        == chunks
    )


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({"CONVEYOR_CONTEXT_TOKENS": "many"}, "CONVEYOR_CONTEXT_TOKENS='many' is invalid"),
        ({"CONVEYOR_LLM_TIMEOUT_SECONDS": "inf"}, "CONVEYOR_LLM_TIMEOUT_SECONDS='inf' is invalid"),
        ({"CONVEYOR_LLM_MODEL": "m"}, "CONVEYOR_LLM_MODEL='m' is invalid: a model needs a route"),
        (
            {"CONVEYOR_DATABASE_URL": "postgresql://ops:s3cret@127.0.0.1:9/nowhere"},
            "cannot connect to the database at postgresql://ops:***@127.0.0.1:9/nowhere",
        ),
    ],
)
def test_memory_problems_are_one_line_naming_the_cause_and_exit_2(
    database_url: str, env: dict[str, str], expected: str
) -> None:
    result = conveyor(database_url, "memory", "search", "leases", **env)
    assert result.returncode == 2, result.stdout + result.stderr
    assert result.stderr.startswith("conveyor: error: ") and expected in result.stderr
    assert len(result.stderr.splitlines()) == 1 and "s3cret" not in result.stderr
