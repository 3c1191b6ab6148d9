"""The wake-up hands a run to a waiting worker at commit (migration 007): the trigger on a real
server, and real workers that take hand-offs, give back the ones they cannot take, and release
the ones they never heard."""

from __future__ import annotations

import hashlib
import json
import re
import time
from collections.abc import Callable
from typing import Any

import psycopg
import pytest

import tests.pipelines
from conveyor import runs
from tests.helpers import ConveyorProcess, fetch_all, leased_run, scalar, wait_until

CHANNEL = "conveyor.agents.NEW"
SECRET = bytes(range(32))
_SIGNED = re.compile(r"run:(?P<worker>.*?):(?P<signature>[0-9a-f]{64}):(?P<body>\{.*)", re.S)
CHAIN = {"CONVEYOR_PIPELINE": "tests.pipelines:chain"}
Start = Callable[..., ConveyorProcess]


def _register(
    conn: psycopg.Connection[Any], worker: str, *, working: str | None, free: int = 2
) -> None:
    conn.execute(
        "INSERT INTO conveyor.workers (worker_id, pipeline, stage, consumes, channel, hostname,"
        " pid, expires_at, waiting, working, lease_seconds, free_slots, secret)"
        " VALUES (%s, 'agents', 'analyze', 'NEW', %s, 'h', 1, now() + interval '1 min', true,"
        " %s, 30, %s, %s)",
        (worker, CHANNEL, working, free, SECRET),
    )


def _handed(payload: str) -> dict[str, Any]:
    """A hand-off's content, once its signature checks out with the worker's secret."""
    match = _SIGNED.fullmatch(payload)
    assert match, payload
    body = match["body"]
    inner = hashlib.sha256(SECRET + body.encode()).digest()
    assert match["signature"] == hashlib.sha256(SECRET + inner).hexdigest()
    return {"worker": match["worker"], **json.loads(body)}


def _heard(listener: psycopg.Connection[Any]) -> list[str]:
    return [n.payload for n in listener.notifies(timeout=0.5)]


@pytest.fixture
def listener(database_url: str) -> Any:
    with psycopg.connect(database_url, autocommit=True) as conn:
        conn.execute(f'LISTEN "{CHANNEL}"')
        yield conn


def test_a_run_is_leased_to_the_waiting_worker_at_commit_and_sent_to_it(
    conn: psycopg.Connection[Any], listener: psycopg.Connection[Any]
) -> None:
    _register(conn, "w1", working="ANALYZING")
    run_id = conn.execute(
        'INSERT INTO conveyor.pipeline_runs (input) VALUES (\'{"q": "x"}\') RETURNING id'
    ).fetchone()[0]  # type: ignore[index]

    status, owner, attempt, lease_left = conn.execute(
        "SELECT status, lease_owner, attempt, extract(epoch FROM lease_expires_at - now())"
        " FROM conveyor.pipeline_runs WHERE id = %s",
        (run_id,),
    ).fetchone()  # type: ignore[misc]
    assert (status, owner, attempt) == ("ANALYZING", "w1", 1)
    assert 25 < lease_left <= 30
    # Each hand-off takes one of the slots the worker said it had.
    assert conn.execute("SELECT waiting, free_slots FROM conveyor.workers").fetchone() == (True, 1)

    [payload] = _heard(listener)
    assert payload.startswith("run:")
    handed = _handed(payload)
    assert handed["worker"] == "w1" and handed["id"] == str(run_id) and handed["free"] == 1
    assert handed["attempt"] == 1 and handed["input"] == {"q": "x"} and handed["outputs"] == {}
    assert 0 <= handed["waited"] < 5

    # The last slot takes the worker off the waiting list (until it says otherwise).
    conn.execute("INSERT INTO conveyor.pipeline_runs DEFAULT VALUES")
    [payload] = _heard(listener)
    assert _handed(payload)["free"] == 0
    assert conn.execute("SELECT waiting, free_slots FROM conveyor.workers").fetchone() == (False, 0)

    # Nobody waits now: the next run stays NEW, and nothing is sent.
    conn.execute("INSERT INTO conveyor.pipeline_runs DEFAULT VALUES")
    assert _heard(listener) == []
    assert conn.execute(
        "SELECT count(*) FROM conveyor.pipeline_runs WHERE status = 'NEW'"
    ).fetchone() == (1,)


@pytest.mark.parametrize(
    ("case", "insert"),
    [
        ("an older worker", "INSERT INTO conveyor.pipeline_runs DEFAULT VALUES"),
        (
            "too big for a notification",
            "INSERT INTO conveyor.pipeline_runs (input)"
            " VALUES (jsonb_build_object('text', repeat('x', 7100)))",
        ),
        (
            "not due yet",
            "INSERT INTO conveyor.pipeline_runs (run_after) VALUES (now() + interval '1 hour')",
        ),
        ("a rescued run runs alone", "INSERT INTO conveyor.pipeline_runs (rescues) VALUES (1)"),
    ],
)
def test_runs_that_cannot_be_handed_off_wake_the_worker_as_before(
    conn: psycopg.Connection[Any], listener: psycopg.Connection[Any], case: str, insert: str
) -> None:
    _register(conn, "w1", working=None if case == "an older worker" else "ANALYZING")
    conn.execute(insert)
    assert _heard(listener) == [""], case
    assert conn.execute("SELECT status, lease_owner FROM conveyor.pipeline_runs").fetchone() == (
        "NEW",
        None,
    )
    assert conn.execute("SELECT waiting FROM conveyor.workers").fetchone() == (True,)


def test_above_read_committed_the_insert_only_wakes_and_never_fails(
    database_url: str, listener: psycopg.Connection[Any]
) -> None:
    with psycopg.connect(database_url, autocommit=True) as conn:
        _register(conn, "w1", working="ANALYZING")
    with psycopg.connect(database_url) as conn:
        conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")
        # The registry row changes after this transaction's snapshot (a heartbeat): locking
        # it here would fail the user's commit with a serialization error.
        conn.execute("SELECT count(*) FROM conveyor.pipeline_runs")
        with psycopg.connect(database_url, autocommit=True) as other:
            other.execute("UPDATE conveyor.workers SET heartbeat_at = now()")
        conn.execute("INSERT INTO conveyor.pipeline_runs DEFAULT VALUES")
        conn.commit()
    assert _heard(listener) == [""]
    assert scalar(database_url, "SELECT status FROM conveyor.pipeline_runs") == "NEW"


def test_a_submitter_without_rights_on_the_registry_can_still_hand_off(
    database_url: str, listener: psycopg.Connection[Any]
) -> None:
    with psycopg.connect(database_url, autocommit=True) as conn:
        _register(conn, "w1", working="ANALYZING")
        conn.execute("DROP ROLE IF EXISTS conveyor_test_submitter")
        conn.execute("CREATE ROLE conveyor_test_submitter")
        conn.execute("GRANT USAGE ON SCHEMA conveyor TO conveyor_test_submitter")
        conn.execute("GRANT SELECT ON conveyor.workers TO conveyor_test_submitter")
        conn.execute("GRANT INSERT ON conveyor.pipeline_runs TO conveyor_test_submitter")
        try:
            with conn.transaction():
                conn.execute("SET LOCAL ROLE conveyor_test_submitter")
                conn.execute("INSERT INTO conveyor.pipeline_runs DEFAULT VALUES")
        finally:
            conn.execute("DROP OWNED BY conveyor_test_submitter")
            conn.execute("DROP ROLE conveyor_test_submitter")
    [payload] = _heard(listener)
    assert payload.startswith("run:")
    assert scalar(database_url, "SELECT status FROM conveyor.pipeline_runs") == "ANALYZING"


# What a hostile submitter could shadow in the functions that run with the owner's rights (the
# hand-off, and the observer trigger its UPDATE fires): each decoy answers correctly, but
# raises when called by anyone but the submitter itself.
_DECOY_OPERATORS = [
    ("=", "text", "text", "texteq"),
    ("=", "uuid", "uuid", "uuid_eq"),
    ("=", "integer", "integer", "int4eq"),
    (">", "integer", "integer", "int4gt"),
    (">", "timestamptz", "timestamptz", "timestamptz_gt"),
    ("<=", "timestamptz", "timestamptz", "timestamptz_le"),
    ("+", "integer", "integer", "int4pl"),
    ("-", "integer", "integer", "int4mi"),
    ("+", "timestamptz", "interval", "timestamptz_pl_interval"),
    ("||", "text", "text", "textcat"),
    ("<>", "text", "text", "textne"),
    ("||", "bytea", "bytea", "byteacat"),
]
_DECOY_FUNCTIONS = [
    ("now()", "timestamptz", "pg_catalog.now()"),
    ("clock_timestamp()", "timestamptz", "pg_catalog.clock_timestamp()"),
    ("octet_length(text)", "integer", "pg_catalog.octet_length($1)"),
    ("pg_notify(text, text)", "void", "pg_catalog.pg_notify($1, $2)"),
    ("length(text)", "integer", "pg_catalog.length($1)"),
    ("current_setting(text, boolean)", "text", "pg_catalog.current_setting($1, $2)"),
    ("set_config(text, text, boolean)", "text", "pg_catalog.set_config($1, $2, $3)"),
    ("sha256(bytea)", "bytea", "pg_catalog.sha256($1)"),
    ("convert_to(text, name)", "bytea", "pg_catalog.convert_to($1, $2)"),
    ("encode(bytea, text)", "text", "pg_catalog.encode($1, $2)"),
    ("pg_trigger_depth()", "integer", "pg_catalog.pg_trigger_depth()"),
]


def test_a_submitter_cannot_make_the_hand_off_run_its_code_with_the_owners_rights(
    database_url: str, listener: psycopg.Connection[Any]
) -> None:
    role = "conveyor_test_hostile"
    with psycopg.connect(database_url, autocommit=True) as conn:
        _register(conn, "w1", working="ANALYZING")
        conn.execute(f"DROP SCHEMA IF EXISTS hostile CASCADE; DROP ROLE IF EXISTS {role}")
        conn.execute(f"CREATE ROLE {role}")
        conn.execute(f"GRANT USAGE ON SCHEMA conveyor TO {role}")
        conn.execute(f"GRANT SELECT ON conveyor.workers TO {role}")
        conn.execute(f"GRANT INSERT ON conveyor.pipeline_runs TO {role}")
        conn.execute(f"CREATE SCHEMA hostile AUTHORIZATION {role}")
        try:
            with conn.transaction():
                conn.execute(f"SET LOCAL ROLE {role}")
                conn.execute(
                    "CREATE FUNCTION hostile.trap() RETURNS void LANGUAGE plpgsql AS $$"
                    f" BEGIN IF current_user <> '{role}' THEN"
                    "   RAISE EXCEPTION 'decoy called as %', current_user; END IF; END $$"
                )
                for name, (op, left, right, real) in enumerate(_DECOY_OPERATORS):
                    conn.execute(
                        f"CREATE FUNCTION hostile.op{name}(a {left}, b {right})"
                        f" RETURNS {'boolean' if op in ('=', '>', '<=', '<>') else left}"
                        f" LANGUAGE plpgsql AS $$ BEGIN PERFORM hostile.trap();"
                        f" RETURN pg_catalog.{real}(a, b); END $$"
                    )
                    conn.execute(
                        f"CREATE OPERATOR hostile.{op} (LEFTARG = {left}, RIGHTARG = {right},"
                        f" FUNCTION = hostile.op{name})"
                    )
                for signature, returns, real in _DECOY_FUNCTIONS:
                    conn.execute(
                        f"CREATE FUNCTION hostile.{signature} RETURNS {returns}"
                        f" LANGUAGE plpgsql AS $$ BEGIN PERFORM hostile.trap();"
                        f" {'PERFORM' if returns == 'void' else 'RETURN'} {real};"
                        f" {'RETURN;' if returns == 'void' else ''} END $$"
                    )
                conn.execute("SET LOCAL search_path = hostile, pg_catalog")
                # The decoys work, and the submitter's own statements do use them.
                assert conn.execute("SELECT 'a'::text = 'a'::text").fetchone() == (True,)
                conn.execute("INSERT INTO conveyor.pipeline_runs DEFAULT VALUES")
        finally:
            conn.execute("DROP SCHEMA IF EXISTS hostile CASCADE")
            conn.execute(f"DROP OWNED BY {role}")
            conn.execute(f"DROP ROLE {role}")
    [payload] = _heard(listener)
    assert payload.startswith("run:")
    assert scalar(database_url, "SELECT status FROM conveyor.pipeline_runs") == "ANALYZING"


def _waiting(url: str) -> int:
    return int(scalar(url, "SELECT count(*) FROM conveyor.workers WHERE waiting"))


def _idle_worker(database_url: str, start_conveyor: Start) -> None:
    """A worker of stage one, idle and waiting. A sweep once a minute: only a wake-up or a
    hand-off can move a run within the tests' timeouts. A long lease: no heartbeat refreshes
    the registry's count of free slots meanwhile."""
    start_conveyor(
        "worker", "--stage", "one", CONVEYOR_SWEEP_INTERVAL="60", CONVEYOR_LEASE="300", **CHAIN
    )
    wait_until(lambda: _waiting(database_url) == 1, 30, "an idle worker")
    time.sleep(0.2)  # past the claim a worker makes 50 ms after it starts waiting


def test_an_idle_worker_starts_a_run_from_the_hand_off(
    database_url: str, start_conveyor: Start
) -> None:
    _idle_worker(database_url, start_conveyor)
    with psycopg.connect(database_url, autocommit=True) as conn:
        conn.execute("LISTEN pipeline_events")
        submitter = conn.info.backend_pid
        run_id = conn.execute(
            "INSERT INTO conveyor.pipeline_runs (pipeline, input) VALUES ('chain', '{\"n\": 1}')"
            " RETURNING id"
        ).fetchone()[0]  # type: ignore[index]
        events = []
        for notify in conn.notifies(timeout=10):
            event = json.loads(notify.payload)
            events.append((event["status"], notify.pid))
            if event["status"] == "ONE_DONE":
                break
    # Leased to the worker by the submitter's own commit, not by a claim from the worker.
    assert events[:2] == [("NEW", submitter), ("ONE_RUNNING", submitter)]
    assert events[-1][0] == "ONE_DONE"
    attempts = fetch_all(
        database_url, "SELECT attempt FROM conveyor.run_events WHERE run_id = %s", (run_id,)
    )
    assert attempts == [(1,)]
    # It never stopped waiting: the hand-off took one of its 20 slots, and it needed no claim
    # nor registry update to take the run.
    assert fetch_all(database_url, "SELECT waiting, free_slots FROM conveyor.workers") == [
        (True, 19)
    ]


def test_a_retried_run_handed_to_the_same_worker_again_is_started(
    database_url: str, start_conveyor: Start
) -> None:
    # A retry sets the run's attempt back to 0, so the worker that took its first attempt by
    # hand-off is handed attempt 1 again, under a new lease: a run to start, not a replay.
    # A hand-off refused would leave the run leased, unstarted, for the lease's 5 minutes.
    _idle_worker(database_url, start_conveyor)
    with (
        psycopg.connect(database_url, autocommit=True) as conn,
        psycopg.connect(database_url, autocommit=True) as observer,
    ):
        observer.execute("LISTEN pipeline_events")
        run_id = conn.execute(
            "INSERT INTO conveyor.pipeline_runs (pipeline, input)"
            " VALUES ('chain', '{\"n\": 1}') RETURNING id"
        ).fetchone()[0]  # type: ignore[index]
        first = _events_until(observer, "ONE_DONE")
        assert runs.cancel(conn, "conveyor", run_id, "test")
        assert runs.retry(conn, "conveyor", tests.pipelines.chain, run_id, "test", "one")
        again = _events_until(observer, "ONE_DONE")
        me = conn.info.backend_pid
    # Both times leased to the worker by this connection's commit: handed off, not claimed.
    assert first[:2] == [("NEW", me), ("ONE_RUNNING", me)]
    assert again[:3] == [("CANCELLED", me), ("NEW", me), ("ONE_RUNNING", me)]
    assert fetch_all(
        database_url,
        "SELECT attempt FROM conveyor.run_events WHERE run_id = %s AND to_status = 'ONE_DONE'",
        (run_id,),
    ) == [(1,), (1,)]


def test_a_worker_that_claimed_runs_is_handed_the_next_one_once_they_are_done(
    database_url: str, start_conveyor: Start
) -> None:
    # While its claimed runs run, the worker waits offering no slot; once they are done it
    # offers them again, and the next run that comes alone is handed to it, not claimed.
    _idle_worker(database_url, start_conveyor)
    # Past the sweep timer's first claims (a second or so apart while the listener connects):
    # the next is a minute away, and only the worker going idle can offer its slots again.
    time.sleep(3.5)
    with (
        psycopg.connect(database_url, autocommit=True) as conn,
        psycopg.connect(database_url, autocommit=True) as observer,
    ):
        observer.execute("LISTEN pipeline_events")
        me = conn.info.backend_pid
        # One transaction, three runs: one handed over, the worker woken for the other two.
        conn.execute(
            "INSERT INTO conveyor.pipeline_runs (pipeline, input)"
            " SELECT 'chain', jsonb_build_object('n', n) FROM generate_series(1, 3) n"
        )
        batch = _events_until(observer, "ONE_DONE", count=3)
        assert [pid for status, pid in batch if status == "ONE_RUNNING"].count(me) == 1
        wait_until(
            lambda: (
                fetch_all(database_url, "SELECT waiting, free_slots FROM conveyor.workers")
                == [(True, 20)]
            ),
            10,
            "the worker offering its 20 slots again",
        )
        conn.execute("INSERT INTO conveyor.pipeline_runs (pipeline, input) VALUES ('chain', '{}')")
        alone = _events_until(observer, "ONE_DONE")
    assert alone[:2] == [("NEW", me), ("ONE_RUNNING", me)]  # leased at this commit


def _events_until(
    conn: psycopg.Connection[Any], last: str, *, count: int = 1
) -> list[tuple[str, int]]:
    """What `conn` hears on pipeline_events, as (status, sending backend), up to and including
    the `count`th `last` (20 s at most)."""
    events = []
    for notify in conn.notifies(timeout=20):
        status = json.loads(notify.payload)["status"]
        events.append((status, notify.pid))
        if [seen for seen, _pid in events].count(last) == count:
            return events
    raise AssertionError(f"no {count} {last} within 20 s: {events}")


def test_runs_handed_to_a_worker_that_did_not_hear_are_released_on_reconnect_and_at_exit(
    database_url: str, start_conveyor: Start
) -> None:
    worker = start_conveyor("worker", "--stage", "one", CONVEYOR_SWEEP_INTERVAL="60", **CHAIN)
    wait_until(lambda: _waiting(database_url) == 1, 30, "an idle worker")
    worker_id = scalar(database_url, "SELECT worker_id FROM conveyor.workers")

    def strand() -> Any:
        """A run leased to the worker whose notification it never got (as if it had been
        sent while the worker's listener was away)."""
        return leased_run(database_url, "chain", "ONE_RUNNING", worker_id, 3600)

    def released(run_id: Any) -> bool:
        return bool(
            scalar(
                database_url,
                "SELECT count(*) FROM conveyor.run_events WHERE run_id = %s"
                " AND error = 'released: handed to the worker while its listener was away'",
                (run_id,),
            )
        )

    first = strand()
    killed = scalar(
        database_url,
        "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity"
        " WHERE application_name LIKE 'conveyor-listen:%%'",
    )
    assert killed == 1
    wait_until(lambda: released(first), 20, "the stranded run released after the reconnect")
    # Released, it is claimable again: woken or handed off, it finishes its stage once.
    wait_until(
        lambda: (
            scalar(
                database_url, "SELECT status FROM conveyor.pipeline_runs WHERE id = %s", (first,)
            )
            == "ONE_DONE"
        ),
        20,
        "the released run to finish its stage",
    )

    second = strand()
    assert worker.stop() == 0
    assert released(second)
    # Released after the worker left the registry, whose row that release did not bring back.
    assert scalar(database_url, "SELECT count(*) FROM conveyor.workers") == 0
    assert fetch_all(
        database_url,
        "SELECT status, lease_owner, attempt FROM conveyor.pipeline_runs WHERE id = %s",
        (second,),
    ) == [("NEW", None, 0)]


def test_a_full_worker_gives_a_hand_off_back_and_runs_it_once_it_has_room(
    database_url: str, start_conveyor: Start
) -> None:
    with psycopg.connect(database_url, autocommit=True) as conn:
        for n in range(20):  # stage one's concurrency, queued before the worker starts
            conn.execute(
                "INSERT INTO conveyor.pipeline_runs (pipeline, input)"
                " VALUES ('chain', jsonb_build_object('n', %s, 'sleep', 3))",
                (n,),
            )
        # A long lease: no heartbeat rewrites the registry row while the test plays with it.
        start_conveyor(
            "worker", "--stage", "one", CONVEYOR_SWEEP_INTERVAL="60", CONVEYOR_LEASE="300", **CHAIN
        )
        wait_until(
            lambda: (
                scalar(
                    database_url,
                    "SELECT count(*) FROM conveyor.pipeline_runs WHERE status = 'ONE_RUNNING'",
                )
                == 20
            ),
            20,
            "a full worker",
        )
        # A registry that still counts free slots (a stale count): the next run is handed to a
        # worker that has no room for it.
        conn.execute("UPDATE conveyor.workers SET waiting = true, free_slots = 5")
        late = conn.execute(
            "INSERT INTO conveyor.pipeline_runs (pipeline, input)"
            " VALUES ('chain', '{\"n\": 99}') RETURNING id"
        ).fetchone()[0]  # type: ignore[index]
    wait_until(
        lambda: scalar(
            database_url,
            "SELECT count(*) FROM conveyor.run_events WHERE run_id = %s"
            " AND error = 'released: handed to a worker with no free slot'",
            (late,),
        ),
        10,
        "the hand-off given back",
    )
    # Never more in flight than the stage allows: the given-back run waits for a free slot.
    assert (
        scalar(
            database_url, "SELECT count(*) FROM conveyor.pipeline_runs WHERE status = 'ONE_RUNNING'"
        )
        <= 20
    )
    wait_until(
        lambda: (
            scalar(database_url, "SELECT status FROM conveyor.pipeline_runs WHERE id = %s", (late,))
            == "ONE_DONE"
        ),
        30,
        "the given-back run to finish its stage",
    )
    assert fetch_all(
        database_url,
        "SELECT to_status FROM conveyor.run_events WHERE run_id = %s ORDER BY id",
        (late,),
    ) == [("NEW",), ("ONE_DONE",)]


def test_a_transaction_hands_off_one_run_and_wakes_the_worker_for_the_rest(
    conn: psycopg.Connection[Any], listener: psycopg.Connection[Any]
) -> None:
    _register(conn, "w1", working="ANALYZING", free=100)
    conn.execute(
        "INSERT INTO conveyor.pipeline_runs (input) SELECT '{}' FROM generate_series(1, 50)"
    )
    heard = _heard(listener)
    assert [payload[:4] for payload in heard] == ["run:", ""]  # the rest is claimed as a batch
    assert conn.execute(
        "SELECT status, count(*) FROM conveyor.pipeline_runs GROUP BY 1 ORDER BY 1"
    ).fetchall() == [("ANALYZING", 1), ("NEW", 49)]


def test_one_transaction_wakes_each_stage_it_makes_runs_claimable_for(
    conn: psycopg.Connection[Any], listener: psycopg.Connection[Any], database_url: str
) -> None:
    # Nobody waits: nothing is sent, and what the trigger remembered about that ends with the
    # transaction (migration 010).
    conn.execute("INSERT INTO conveyor.pipeline_runs DEFAULT VALUES")
    assert _heard(listener) == []
    _register(conn, "w1", working="ANALYZING", free=100)
    conn.execute(
        "INSERT INTO conveyor.workers (worker_id, pipeline, stage, consumes, channel, hostname,"
        " pid, expires_at, waiting, working, lease_seconds, free_slots, secret)"
        " VALUES ('w2', 'agents', 'assemble', 'ANALYZED', 'conveyor.agents.ANALYZED', 'h', 2,"
        " now() + interval '1 min', true, 'ASSEMBLING', 30, 100, %s)",
        (SECRET,),
    )
    with psycopg.connect(database_url, autocommit=True) as second:
        second.execute('LISTEN "conveyor.agents.ANALYZED"')
        # Runs of two stages, interleaved, and one of a stage nobody waits for.
        conn.execute(
            "INSERT INTO conveyor.pipeline_runs (status)"
            " SELECT CASE WHEN g = 7 THEN 'ASSEMBLED' WHEN g % 2 = 1 THEN 'ANALYZED'"
            " ELSE 'NEW' END FROM generate_series(1, 20) g"
        )
        to_assemble, to_analyze = _heard(second), _heard(listener)
    # One hand-off per transaction (to the first run's stage), and each waiting stage woken
    # once for the rest.
    assert [payload[:4] for payload in to_assemble] == ["run:", ""]
    assert to_analyze == [""]
    assert conn.execute(
        "SELECT status, count(*) FROM conveyor.pipeline_runs GROUP BY 1 ORDER BY 1"
    ).fetchall() == [("ANALYZED", 8), ("ASSEMBLED", 1), ("ASSEMBLING", 1), ("NEW", 11)]


def test_a_transaction_looks_for_a_waiting_worker_once_per_stage_not_per_run(
    database_url: str,
) -> None:
    # Nobody waits (as under load): 200 runs of one stage and 100 of another, submitted in one
    # transaction, read the registry once per stage (migration 010), not once per run.
    with psycopg.connect(database_url) as conn:
        conn.execute(
            "INSERT INTO conveyor.pipeline_runs (status)"
            " SELECT CASE WHEN g <= 200 THEN 'NEW' ELSE 'ANALYZED' END"
            " FROM generate_series(1, 300) g"
        )
        conn.execute("SET CONSTRAINTS conveyor.wake_waiting_workers IMMEDIATE")  # fire it now
        row = conn.execute(
            "SELECT pg_stat_get_xact_numscans('conveyor.workers'::regclass)"
        ).fetchone()
        conn.commit()
    assert row == (2,)
