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
