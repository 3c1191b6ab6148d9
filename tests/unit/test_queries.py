from __future__ import annotations

from conveyor import queries
from conveyor.urls import redact


def test_every_protocol_statement_is_named_and_schema_qualified() -> None:
    statements = queries.load("jobs")
    for name in (
        "claim_batch",
        "complete_if_leased",
        "fail_if_leased",
        "release_if_leased",
        "extend_leases",
        "rescue_expired",
        "beat_worker",
        "cancel_run",
        "retry_run",
        "submit_run",
        "status_counts",
    ):
        assert name in statements
        assert '"jobs".' in statements[name]
        assert "@schema@" not in statements[name]
        assert not statements[name].startswith("--")


def test_fence_is_in_every_statement_a_worker_sends_about_its_own_runs() -> None:
    statements = queries.load("conveyor")
    for name in ("complete_if_leased", "fail_if_leased", "release_if_leased", "extend_leases"):
        assert "status = %(working)s AND" in statements[name]
        assert "lease_owner = %(worker)s" in statements[name]
    assert "FOR UPDATE SKIP LOCKED" in statements["claim_batch"]


def test_passwords_are_redacted() -> None:
    assert redact("postgresql://ops:s3cret@db:5432/x") == "postgresql://ops:***@db:5432/x"
    assert "s3cret" not in redact("host=db password=s3cret user=ops")
    assert "s3cret" not in redact("host=db password='s3cret' user=ops")


def test_statements_are_short_enough_for_psycopg_to_keep_what_it_parsed() -> None:
    """psycopg parses a statement once and keeps the result, up to a length; a longer one is
    parsed at every execution. Every statement fits, with a schema name of 20 characters."""
    from psycopg import _queries

    assert queries.PSYCOPG_CACHED_LENGTH == _queries.MAX_CACHED_STATEMENT_LENGTH
    for schema in ("conveyor", "conveyor_eu_west_prd"):
        for name, statement in queries.load(schema).items():
            assert len(statement.encode()) <= queries.PSYCOPG_CACHED_LENGTH, name


def test_compacting_keeps_literals_and_line_breaks_between_them() -> None:
    text = "SELECT  'a  -- b',\n   \"x  y\"  -- gone\n  FROM t WHERE s = 'one '\n  'line'"
    assert queries.compact(text) == "SELECT 'a  -- b',\n\"x  y\"\nFROM t WHERE s = 'one '\n'line'"
