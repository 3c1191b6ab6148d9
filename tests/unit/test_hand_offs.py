"""A hand-off notification is taken only when the database sent it: signed with the worker's
secret as hand_off() signs it, fresh, and not seen before. A refusal is counted every time and
logged at most every few seconds."""

from __future__ import annotations

import asyncio
import hashlib
import json
import time
import uuid
from typing import Any, cast

from prometheus_client import REGISTRY

from conveyor.worker.hand_offs import HandOffs, Verdict, signature

LABELS = ("handed", "s")


class _Log:
    def __init__(self) -> None:
        self.lines: list[tuple[str, str, dict[str, Any]]] = []

    def _line(self, level: str) -> Any:
        return lambda event, **fields: self.lines.append((level, event, fields))

    def __getattr__(self, level: str) -> Any:
        return self._line(level)


def _hand_offs(log: _Log | None = None) -> HandOffs:
    # read() touches neither the database nor the listener
    return HandOffs(
        "s-1-abc",
        cast(Any, None),
        listener=cast(Any, None),
        errors=cast(Any, None),
        held=set(),
        channel="c",
        ttl_seconds=30.0,
        stopping=asyncio.Event(),
        wake=asyncio.Event(),
        labels=LABELS,
        log=cast(Any, log or _Log()),
    )


def _body(run_id: uuid.UUID, *, attempt: int = 1, free: int = 3, expires_in: float = 30.0) -> str:
    return json.dumps(
        {
            "id": str(run_id),
            "input": {"q": 1},
            "outputs": {},
            "attempt": attempt,
            "waited": 0.002,
            "free": free,
            "expires": time.time() + expires_in,
        }
    )


def _signed(secret: bytes, body: str) -> str:
    return f"{signature(secret, body)}:{body}"


def _refusals() -> float:
    labels = {"pipeline": LABELS[0], "stage": LABELS[1], "operation": "hand_off_refused"}
    return REGISTRY.get_sample_value("conveyor_worker_errors_total", labels) or 0.0


def test_the_signature_is_sha256_of_the_secret_and_the_sha256_of_secret_and_body() -> None:
    secret, body = b"k" * 32, '{"id": 1}'
    inner = hashlib.sha256(secret + body.encode()).digest()
    assert signature(secret, body) == hashlib.sha256(secret + inner).hexdigest()


def test_a_signed_fresh_hand_off_is_taken_and_notes_the_free_slots() -> None:
    hand_offs = _hand_offs()
    hand_offs.armed = True
    run_id = uuid.uuid4()
    row = hand_offs.read(_signed(hand_offs.secret, _body(run_id, attempt=2, free=3)))
    assert row == (run_id, {"q": 1}, {}, 2, 0.002, False)
    assert (hand_offs.free_reported, hand_offs.armed) == (3, True)
    # the last free slot: the trigger took the worker off the waiting list
    last = hand_offs.read(_signed(hand_offs.secret, _body(uuid.uuid4(), free=0)))
    assert not isinstance(last, Verdict)
    assert (hand_offs.free_reported, hand_offs.armed) == (0, False)


def test_forged_stale_and_replayed_hand_offs_are_refused_and_counted() -> None:
    hand_offs = _hand_offs()
    before = _refusals()
    body = _body(uuid.uuid4())
    assert hand_offs.read(f"{'0' * 64}:{body}") is Verdict.REFUSED
    assert hand_offs.read(_signed(b"another secret", body)) is Verdict.REFUSED
    assert hand_offs.read("no signature at all") is Verdict.REFUSED
    stale = _body(uuid.uuid4(), expires_in=-1.0)
    assert hand_offs.read(_signed(hand_offs.secret, stale)) is Verdict.REFUSED
    assert _refusals() == before + 4
    assert (hand_offs.free_reported, hand_offs.unheard) == (0, False)


def test_a_replay_is_refused_but_a_later_lease_of_the_same_run_is_taken() -> None:
    hand_offs = _hand_offs()
    run_id = uuid.uuid4()
    first = _signed(hand_offs.secret, _body(run_id, attempt=1))
    assert not isinstance(hand_offs.read(first), Verdict)
    assert hand_offs.read(first) is Verdict.REFUSED
    assert not isinstance(
        hand_offs.read(_signed(hand_offs.secret, _body(run_id, attempt=2))), Verdict
    )
    # Its attempt goes back to 0 when it is retried or routed back to the stage: the next
    # hand-off brings attempt 1 again, under a new lease, and is a run to start.
    retried = _signed(hand_offs.secret, _body(run_id, attempt=1, expires_in=31.0))
    assert not isinstance(hand_offs.read(retried), Verdict)
    assert hand_offs.read(retried) is Verdict.REFUSED


def test_a_signed_hand_off_that_cannot_be_read_is_released_as_unheard() -> None:
    log = _Log()
    hand_offs = _hand_offs(log)
    body = json.dumps({"id": "not a uuid", "free": 1, "expires": time.time() + 30})
    assert hand_offs.read(_signed(hand_offs.secret, body)) is Verdict.UNDECODABLE
    assert hand_offs.unheard
    assert [line[1] for line in log.lines] == ["undecodable hand-off; releasing it"]


def test_refusals_are_logged_at_most_every_few_seconds() -> None:
    log = _Log()
    hand_offs = _hand_offs(log)
    for _ in range(50):
        hand_offs.read(f"forged:{_body(uuid.uuid4())}")
    assert [(line[1], line[2]["refused"]) for line in log.lines] == [
        ("hand-off notification refused", 1)
    ]


def test_hand_offs_remembered_past_the_limit_are_not_all_looked_at_on_every_read() -> None:
    """Past 1,024 remembered hand-offs, those whose lease is over are forgotten; while they all
    still run, the next look waits until as many more came, not one per hand-off."""
    hand_offs = _hand_offs()
    for _ in range(1024):
        hand_offs._remember((uuid.uuid4(), 1, time.time() + 30), time.time() + 30)
    hand_offs._remember((uuid.uuid4(), 1, time.time() + 30), time.time() + 30)  # all live
    assert len(hand_offs._handed) == 1025
    looked_at = hand_offs._handed
    for _ in range(500):
        hand_offs._remember((uuid.uuid4(), 1, time.time() + 30), time.time() + 30)
    assert hand_offs._handed is looked_at  # not rebuilt on each of them
    expired = time.time() - 1
    for _ in range(600):
        hand_offs._remember((uuid.uuid4(), 1, expired), expired)
    assert len(hand_offs._handed) < 2048  # forgotten: the leases that were over
    read = hand_offs.read(_signed(hand_offs.secret, _body(uuid.uuid4())))
    assert not isinstance(read, Verdict)
