"""What any database login can send a worker: notifications on its channel, runs it cannot
decode, calls to conveyor's functions, registry rows. None may stop a stage, run forged work,
or break another login's commits. Real workers, a real server, and a login with no grants."""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import psycopg
import pytest
from psycopg import conninfo, sql

from conveyor import migrate
from tests.helpers import ConveyorProcess, fetch_all, scalar, wait_until

CHAIN = {"CONVEYOR_PIPELINE": "tests.pipelines:chain"}
CHANNEL = "conveyor.chain.NEW"
# The sweep and the lease are far off: a run that finishes within the bound below was woken by
# a notification, through a listener that still works.
QUIET = {**CHAIN, "CONVEYOR_SWEEP_INTERVAL": "120", "CONVEYOR_LEASE": "120"}
DEEP = "[" * 1500 + "]" * 1500
Start = Callable[..., ConveyorProcess]


@pytest.fixture
def stranger(database_url: str) -> Iterator[str]:
    """The URL of a login with no grants at all: it may connect, LISTEN and NOTIFY."""
    name = f"stranger_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(database_url, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE ROLE {} LOGIN").format(sql.Identifier(name)))
    yield conninfo.make_conninfo(database_url, user=name)
    with psycopg.connect(database_url, autocommit=True) as conn:
        conn.execute(sql.SQL("DROP OWNED BY {}").format(sql.Identifier(name)))
        conn.execute(sql.SQL("DROP ROLE {}").format(sql.Identifier(name)))


def _worker_id(stranger: str) -> str:
    """What every login sees of a worker: its application name."""

    def listening() -> str | None:
        with psycopg.connect(stranger, autocommit=True) as conn:
            row = conn.execute(
                "SELECT application_name FROM pg_stat_activity"
                " WHERE application_name LIKE 'conveyor-listen:one-%' LIMIT 1"
            ).fetchone()
        return row[0].split(":", 1)[1] if row else None

    return wait_until(listening, 30, "a stage-one worker listening")


def _waiting(url: str) -> None:
    wait_until(
        lambda: scalar(url, "SELECT count(*) FROM conveyor.workers WHERE waiting") >= 1,
        30,
        "the worker waiting",
    )


def _notify(url: str, payload: str, channel: str = CHANNEL) -> None:
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("SELECT pg_notify(%s, %s)", (channel, payload))


def _submit(url: str, run_input: str) -> uuid.UUID:
    with psycopg.connect(url, autocommit=True) as conn:
        row = conn.execute(
            "INSERT INTO conveyor.pipeline_runs (pipeline, input) VALUES ('chain', %s)"
            " RETURNING id",
            (run_input,),
        ).fetchone()
    assert row is not None
    return uuid.UUID(str(row[0]))


def _status(url: str, run_id: uuid.UUID) -> str:
    return str(scalar(url, "SELECT status FROM conveyor.pipeline_runs WHERE id = %s", (run_id,)))


def _where(url: str, run_id: uuid.UUID) -> list[tuple[object, ...]]:
    """Where a run stands, for a failure's message."""
    return fetch_all(
        url,
        "SELECT status, lease_owner, attempt, updated_at FROM conveyor.pipeline_runs WHERE id = %s",
        (run_id,),
    )


def _registry(url: str) -> list[tuple[object, ...]]:
    """The workers' registry rows, for a failure's message."""
    return fetch_all(
        url, "SELECT worker_id, waiting, free_slots, heartbeat_at FROM conveyor.workers"
    )


def _done_promptly(url: str, run_id: uuid.UUID) -> bool:
    try:
        wait_until(lambda: _status(url, run_id) == "DONE", 20, f"run {run_id} DONE")
    except AssertionError:
        return False
    return True


def test_a_forged_hand_off_runs_nothing(
    database_url: str, start_conveyor: Start, stranger: str
) -> None:
    worker = start_conveyor("run", CONVEYOR_STAGES="one=1,two=1,three=1", **QUIET)
    worker_id = _worker_id(stranger)
    _waiting(database_url)
    forged_id = uuid.uuid4()
    body = {
        "worker": worker_id,
        "free": 1,
        "id": str(forged_id),
        "attempt": 1,
        "waited": 0.0,
        "expires": 4e9,
        "input": {"n": 666},
        "outputs": {},
    }
    # As the hand-off looked before it was signed, and signed with a key the stranger made up.
    _notify(stranger, "run:" + json.dumps(body))
    _notify(stranger, f"run:{worker_id}:{'ab' * 32}:" + json.dumps(body))
    wait_until(lambda: "hand-off notification refused" in worker.log(), 20, "the forgery refused")
    real = _submit(database_url, '{"n": 1}')
    assert _done_promptly(database_url, real), worker.log()[-3000:]
    assert str(forged_id) not in worker.log()
    assert scalar(database_url, "SELECT count(*) FROM conveyor.run_events WHERE run_id = %s",
                  (forged_id,)) == 0  # fmt: skip


HOSTILE_PAYLOADS = [
    "run:" + DEEP,
    "run:" + "x" * 7990,
    "run:",
    "run:{}",
    "run:null",
    '{"worker": 1}',
    DEEP,
    "ping",
    "ping:",
    "\ufffd" * 2000,
]


def test_hostile_notifications_never_deafen_a_worker(
    database_url: str, start_conveyor: Start, stranger: str
) -> None:
    worker = start_conveyor("run", CONVEYOR_STAGES="one=1,two=1,three=1", **QUIET)
    worker_id = _worker_id(stranger)
    payloads = [
        *HOSTILE_PAYLOADS,
        f"run:{worker_id}:",
        f"run:{worker_id}:zz:{{}}",
        f"run:{worker_id}:{'0' * 64}:" + DEEP,
        f"run:{worker_id}:{'0' * 64}:" + "{" * 3000,
    ]
    stuck = []
    for number, payload in enumerate(payloads):
        _waiting(database_url)
        _notify(stranger, payload)
        run_id = _submit(database_url, '{"n": 2}')
        if not _done_promptly(database_url, run_id):
            stuck.append((number, run_id, _where(database_url, run_id)))
    print(f"hostile notifications: {len(payloads)} tried, {len(payloads) - len(stuck)} held")
    assert not stuck, (stuck, _registry(database_url), worker.log()[-3000:])
    assert worker.process.poll() is None
    assert "worker process died" not in worker.log()


@pytest.mark.parametrize("path", ["claimed", "handed off"])
def test_a_run_nested_too_deeply_fails_clearly_and_its_worker_lives(
    database_url: str, start_conveyor: Start, path: str
) -> None:
    deep_input = json.dumps({"question": "x"})[:-1] + ', "deep": ' + DEEP + "}"
    if path == "claimed":
        poison = _submit(database_url, deep_input)
        worker = start_conveyor("run", CONVEYOR_STAGES="one=1,two=1,three=1", **CHAIN)
    else:
        worker = start_conveyor("run", CONVEYOR_STAGES="one=1,two=1,three=1", **QUIET)
        _waiting(database_url)
        poison = _submit(database_url, deep_input)
    wait_until(lambda: _status(database_url, poison) == "FAILED", 30, "the deep run FAILED")
    error = scalar(
        database_url, "SELECT last_error FROM conveyor.pipeline_runs WHERE id = %s", (poison,)
    )
    assert error == "run input cannot be read: JSON nested too deeply to decode"
    assert (
        scalar(database_url, "SELECT rescues FROM conveyor.pipeline_runs WHERE id = %s", (poison,))
        == 0
    )
    assert _done_promptly(database_url, _submit(database_url, '{"n": 3}'))
    assert "worker process died" not in worker.log()
    assert "Traceback" not in worker.log()


def test_hand_off_runs_only_from_its_trigger_and_for_nobody_else(
    database_url: str, stranger: str
) -> None:
    args = (uuid.uuid4(), "chain", "NEW", "now")
    call = "SELECT conveyor.hand_off(%s, %s, %s, %s::timestamptz)"
    with psycopg.connect(database_url, autocommit=True) as owner:
        migrate.apply_roles(owner, "conveyor")
        with pytest.raises(psycopg.errors.RaiseException, match="only from the wake-up trigger"):
            owner.execute(call, args)
        reader = f"reader_{uuid.uuid4().hex[:8]}"
        owner.execute(
            sql.SQL("CREATE ROLE {} LOGIN IN ROLE conveyor_reader").format(sql.Identifier(reader))
        )
    try:
        for url in (stranger, conninfo.make_conninfo(database_url, user=reader)):
            with psycopg.connect(url, autocommit=True) as conn:
                for statement in (call, "SELECT * FROM conveyor.prune_finished(0, NULL)"):
                    with pytest.raises(psycopg.errors.InsufficientPrivilege):
                        conn.execute(statement, args if statement == call else None)
    finally:
        with psycopg.connect(database_url, autocommit=True) as owner:
            owner.execute(sql.SQL("DROP OWNED BY {}").format(sql.Identifier(reader)))
            owner.execute(sql.SQL("DROP ROLE {}").format(sql.Identifier(reader)))


@pytest.fixture
def worker_login(database_url: str) -> Iterator[str]:
    name = f"worker_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(database_url, autocommit=True) as conn:
        migrate.apply_roles(conn, "conveyor")
        conn.execute(
            sql.SQL("CREATE ROLE {} LOGIN IN ROLE conveyor_worker").format(sql.Identifier(name))
        )
    yield conninfo.make_conninfo(database_url, user=name)
    with psycopg.connect(database_url, autocommit=True) as conn:
        conn.execute(sql.SQL("DROP OWNED BY {}").format(sql.Identifier(name)))
        conn.execute(sql.SQL("DROP ROLE {}").format(sql.Identifier(name)))


ABSURD_REGISTRY_ROWS = [
    {"channel": ""},
    {"channel": "c" * 64},
    {"worker_id": "w" * 101},
    {"lease_seconds": 1e300},
    {"lease_seconds": 0},
    {"free_slots": -1},
    {"free_slots": 2_000_000_000},
    {"expires_at": "infinity"},
    {"secret": b"short"},
]


@pytest.mark.parametrize("absurd", ABSURD_REGISTRY_ROWS, ids=lambda row: next(iter(row)))
def test_the_registry_refuses_what_would_break_a_submitters_commit(
    database_url: str, worker_login: str, absurd: dict[str, Any]
) -> None:
    row: dict[str, Any] = {
        "worker_id": "intruder",
        "pipeline": "chain",
        "stage": "one",
        "consumes": "NEW",
        "channel": CHANNEL,
        "hostname": "h",
        "pid": 1,
        "expires_at": "tomorrow",
        "waiting": True,
        "working": "ONE_RUNNING",
        "lease_seconds": 30,
        "free_slots": 1,
        "secret": bytes(32),
        **absurd,
    }
    insert = sql.SQL("INSERT INTO conveyor.workers ({}) VALUES ({})").format(
        sql.SQL(", ").join(map(sql.Identifier, row)),
        sql.SQL(", ").join(sql.Placeholder() * len(row)),
    )
    with psycopg.connect(worker_login, autocommit=True) as conn:
        with pytest.raises(psycopg.errors.CheckViolation):
            conn.execute(insert, list(row.values()))
        _submit(worker_login, '{"n": 4}')  # and submitters still commit


def test_history_is_append_only_for_the_worker_role(database_url: str, worker_login: str) -> None:
    run_id = _submit(database_url, '{"n": 5}')
    with psycopg.connect(database_url, autocommit=True) as owner:
        owner.execute(
            "UPDATE conveyor.pipeline_runs SET status = 'FAILED',"
            " finished_at = now() - interval '2 days' WHERE id = %s",
            (run_id,),
        )
        owner.execute(
            "INSERT INTO conveyor.run_events (run_id, pipeline, to_status) VALUES (%s, 'chain',"
            " 'FAILED')",
            (run_id,),
        )
    denied = [
        "DELETE FROM conveyor.run_events",
        "UPDATE conveyor.run_events SET error = 'forged'",
        "TRUNCATE conveyor.run_events",
        "DELETE FROM conveyor.pipeline_runs",
        "SELECT secret FROM conveyor.workers",
        "UPDATE conveyor.workers SET secret = '\\x00'",
    ]
    with psycopg.connect(worker_login, autocommit=True) as conn:
        for statement in denied:
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                conn.execute(statement)
        # Retention still works, through the bounded function.
        pruned = conn.execute("SELECT * FROM conveyor.prune_finished(86400, 'chain')").fetchall()
    assert pruned == [(run_id,)]
    assert scalar(database_url, "SELECT count(*) FROM conveyor.run_events") == 0
