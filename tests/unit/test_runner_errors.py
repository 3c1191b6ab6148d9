"""The error text run_handler keeps for a failed attempt (worker/runner.py's describe)."""

from __future__ import annotations

from conveyor.worker.runner import describe


def _raised(message: str) -> BaseException:
    try:
        raise ConnectionError(message)
    except ConnectionError as exc:
        return exc


def test_passwords_in_the_error_are_masked() -> None:
    text = describe(_raised("no route to postgresql://app:pa55@db/x; dsn: password='a b' host=h"))
    assert (
        "ConnectionError: no route to postgresql://app:***@db/x; dsn: password=*** host=h" in text
    )
    assert "pa55" not in text and "a b" not in text


def test_a_long_error_is_masked_before_it_is_cut() -> None:
    # Cut first, the kept tail would start inside the URL, with nothing left to recognise it by.
    text = describe(_raised("x" * 3990 + " postgresql://app:pa55@db/x tail"))
    assert len(text) <= 4000
    assert "pa55" not in text
