"""The limits' arithmetic in PostgreSQL, statement by statement (sql/012_flow_control.sql)."""

from __future__ import annotations

import time

from tests.helpers import fetch_all, scalar


def test_429s_met_while_a_key_is_closed_add_no_closure(database_url: str) -> None:
    """The calls in flight when a provider closes a key all meet its 429: the shared backoff
    climbs once (1 s), not once per call (which would reach 60 s)."""
    for _ in range(6):
        scalar(database_url, "SELECT conveyor.limit_close('k', NULL, '429')")
    closures, seconds = fetch_all(
        database_url,
        "SELECT closures, extract(epoch FROM closed_until - now()) FROM conveyor.limits",
    )[0]
    assert closures == 1 and 0 < seconds <= 1.5
    # a Retry-After further out extends it; one sooner never shortens it
    scalar(database_url, "SELECT conveyor.limit_close('k', now() + interval '30 seconds', '429')")
    scalar(database_url, "SELECT conveyor.limit_close('k', now() + interval '5 seconds', '429')")
    opens = scalar(
        database_url, "SELECT extract(epoch FROM closed_until - now()) FROM conveyor.limits"
    )
    assert 29 < opens <= 30


def test_an_acquire_larger_than_the_bucket_waits_for_a_full_one_not_for_ever(
    database_url: str,
) -> None:
    """At 60 requests a minute the bucket holds one: three requests at once are taken from a
    full bucket (into deficit), and the next call waits the deficit out, a few seconds."""
    fetch_all(
        database_url,
        "INSERT INTO conveyor.limits (key, requests_per_minute) VALUES ('k', 60) RETURNING key",
    )
    assert scalar(database_url, "SELECT conveyor.limit_acquire('k', 3, 0)") is None
    wait = scalar(
        database_url,
        "SELECT extract(epoch FROM conveyor.limit_acquire('k', 3, 0) - clock_timestamp())",
    )
    assert 2 < wait <= 3.1


def test_a_rate_that_bounds_a_claim_says_when_its_next_request_is_due(database_url: str) -> None:
    fetch_all(
        database_url,
        "INSERT INTO conveyor.limits (key, requests_per_minute) VALUES ('k', 600) RETURNING key",
    )
    room, due_in, key = fetch_all(
        database_url,
        "SELECT room, extract(epoch FROM throttled_until - clock_timestamp()), throttled_by"
        "  FROM conveyor.limit_room(ARRAY['k'], 50)",
    )[0]
    assert (room, key) == (10, "k")  # a bucket of one second: 10 of the 50 asked
    assert 0 < due_in <= 1.1  # once those 10 are taken, the next is due within a second
    room, due_in, key = fetch_all(database_url, "SELECT * FROM conveyor.limit_room(ARRAY['k'], 5)")[
        0
    ]
    assert (room, due_in, key) == (5, None, None)  # not bound by the rate: no hint


def _lease(database_url: str, stage_status: str, runs: int) -> None:
    fetch_all(
        database_url,
        "INSERT INTO conveyor.pipeline_runs (pipeline, status, lease_owner, lease_expires_at)"
        " SELECT 'p', %s, 'w', now() + interval '1 hour' FROM generate_series(1, %s)"
        " RETURNING id",
        (stage_status, runs),
    )


def test_a_cap_counts_what_every_stage_under_its_key_holds_when_it_may_bind(
    database_url: str,
) -> None:
    """Claims under a cap far from full take their room from a bound kept since the last
    count; a stage that joins the key with runs already leased, a cap set again, or a count a
    second old makes the next claim count them."""
    fetch_all(
        database_url,
        "INSERT INTO conveyor.limits (key, max_in_flight) VALUES ('k', 100) RETURNING key",
    )
    fetch_all(
        database_url,
        "INSERT INTO conveyor.limit_stages VALUES ('k', 'p', 'a', 'A_WORKING', 'c') RETURNING key",
    )
    _lease(database_url, "A_WORKING", 5)
    room = "SELECT room FROM conveyor.limit_room(ARRAY['k'], 10)"
    assert scalar(database_url, room) == 10
    assert scalar(database_url, "SELECT bound FROM conveyor.limit_places") == 15
    # a second stage joins the key with 80 runs leased: counted, not taken from the bound
    _lease(database_url, "B_WORKING", 80)
    fetch_all(
        database_url,
        "INSERT INTO conveyor.limit_stages VALUES ('k', 'p', 'b', 'B_WORKING', 'c') RETURNING key",
    )
    assert scalar(database_url, room) == 10
    assert scalar(database_url, "SELECT bound FROM conveyor.limit_places") == 95
    # the cap lowered below what is held: nothing more
    scalar(database_url, "UPDATE conveyor.limits SET max_in_flight = 50 RETURNING key")
    assert fetch_all(database_url, "SELECT * FROM conveyor.limit_room(ARRAY['k'], 10)") == [
        (0, None, "k")
    ]
    # without a cap, claims keep no bound: a cap set again counts what was leased meanwhile
    scalar(database_url, "UPDATE conveyor.limits SET max_in_flight = NULL RETURNING key")
    assert scalar(database_url, room) == 10
    _lease(database_url, "A_WORKING", 20)
    scalar(database_url, "UPDATE conveyor.limits SET max_in_flight = 110 RETURNING key")
    assert scalar(database_url, room) == 5  # 105 held
    # runs leased some other way than through a claim are counted within a second
    _lease(database_url, "A_WORKING", 3)
    time.sleep(1.1)
    assert scalar(database_url, room) == 2


def test_a_claim_within_fresh_bounds_still_meets_a_closed_key_or_an_emptied_bucket(
    database_url: str,
) -> None:
    """The claims that fit every limit (a fresh bound with room, full buckets) are answered
    from one read of the keys; a key closed, or a bucket emptied, since the last claim still
    holds the next one back, and its cap's bound stays what it was."""
    fetch_all(
        database_url,
        "INSERT INTO conveyor.limits (key, max_in_flight, requests_per_minute)"
        " VALUES ('cap', 1000, NULL), ('rate', NULL, 600) RETURNING key",
    )
    room = "SELECT room, throttled_by FROM conveyor.limit_room(ARRAY['rate', 'cap'], 10)"
    bound = "SELECT bound FROM conveyor.limit_places WHERE key = 'cap'"
    assert fetch_all(database_url, room) == [(10, None)]
    assert scalar(database_url, bound) == 10
    assert fetch_all(database_url, room) == [(10, None)]  # within the fresh bound: it grows
    assert scalar(database_url, bound) == 20
    # the bucket holds a second of the rate, 10: 5 taken leave room for 5 (one more comes back
    # every 100 ms), and say when more are due
    scalar(database_url, "SELECT conveyor.limit_take(ARRAY['rate'], 5, 0)")
    assert fetch_all(database_url, room) == [(5, "rate")]
    assert scalar(database_url, bound) == 25
    scalar(database_url, "SELECT conveyor.limit_close('cap', now() + interval '30 seconds', '429')")
    assert fetch_all(database_url, room) == [(0, "cap")]
    assert scalar(database_url, bound) == 25
