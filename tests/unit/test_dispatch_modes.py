"""The dispatcher's modes: the transition table, and the dispatcher driven through its modes
against a scripted protocol (no database): a backlog, a rescued run that runs alone, hand-offs
given back while it cannot take them, and a stop."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Callable
from typing import Any, cast

import psycopg
import pytest

from conveyor import metrics
from conveyor.handler_run import Run
from conveyor.pipeline import Pipeline, Stage
from conveyor.results import Applied, Failure, Success
from conveyor.server_json import ClaimedRow
from conveyor.worker.completer import Completer
from conveyor.worker.database_errors import DatabaseErrors
from conveyor.worker.dispatch import TRANSITIONS, Dispatcher, Event, Mode, next_mode
from conveyor.worker.in_flight import InFlight
from conveyor.worker.tally import StageTally

W, B, E, R, S = Mode.WAITING, Mode.BACKLOG, Mode.EMPTYING, Mode.RESCUED, Mode.STOPPING


def test_the_transition_table() -> None:
    expected = {
        (W, Event.CLAIMED_FULL): B,
        (W, Event.CLAIMED_SHORT): W,
        (W, Event.CLAIMED_RESCUED): R,
        (W, Event.RESCUED_DUE): E,
        (B, Event.CLAIMED_FULL): B,
        (B, Event.CLAIMED_SHORT): W,
        (B, Event.CLAIMED_RESCUED): R,
        (B, Event.RESCUED_DUE): E,
        (E, Event.CLAIMED_FULL): B,
        (E, Event.CLAIMED_SHORT): W,
        (E, Event.CLAIMED_RESCUED): R,
        (R, Event.RESCUED_DONE): B,
    }
    for mode in Mode:
        expected[mode, Event.STOP] = S
    for event in Event:
        expected[S, event] = S
    assert expected == TRANSITIONS


def test_an_event_a_mode_cannot_meet_is_a_bug() -> None:
    with pytest.raises(KeyError):
        next_mode(R, Event.CLAIMED_FULL)  # a rescued run in flight: nothing is claimed
    with pytest.raises(KeyError):
        next_mode(E, Event.RESCUED_DUE)  # asked only with runs in flight; emptying claims alone


class _Protocol:
    """Scripted claims and rescue questions; records what was asked."""

    def __init__(self) -> None:
        self.claims: list[list[ClaimedRow]] = []
        self.asked: list[tuple[int, bool]] = []
        self.rescued_due = False
        self.flow = None  # no limits
        self.throttled = None
        self.failures: list[Exception] = []  # raised by the next claims, one each

    def claim_size(self, free: int) -> int:
        return min(free, 4)

    async def claim(self, batch: int, *, alone: bool = False) -> list[ClaimedRow]:
        self.asked.append((batch, alone))
        if self.failures:
            raise self.failures.pop(0)
        return self.claims.pop(0) if self.claims else []

    async def rescued_waiting(self) -> bool:
        return self.rescued_due


class _HandOffs:
    def __init__(self, row: ClaimedRow | None = None) -> None:
        self.unheard = False
        self.releasing: set[uuid.UUID] = set()
        self.armed = False
        self.free_reported = 4
        self.waiting: list[tuple[bool, int]] = []
        self.given_back: list[uuid.UUID] = []
        self.offered: list[int] = []
        self.row = row

    async def set_waiting(self, waiting: bool, free_slots: int = 0) -> None:
        self.waiting.append((waiting, free_slots))
        self.armed, self.free_reported = waiting, free_slots if waiting else 0

    def offer_soon(self, free_slots: Callable[[], int]) -> None:
        self.offered.append(free_slots())

    def read(self, signed: str) -> ClaimedRow | None:
        return self.row

    def give_back_soon(self, run_id: uuid.UUID) -> None:
        self.given_back.append(run_id)


class _Log:
    def __getattr__(self, level: str) -> Any:
        return lambda *args, **fields: None


def _rows(count: int, *, rescued: bool = False) -> list[ClaimedRow]:
    return [(uuid.uuid4(), {}, {}, 1, 0.0, rescued) for _ in range(count)]


async def _until(predicate: Callable[[], bool]) -> None:
    async with asyncio.timeout(5):
        while not predicate():
            await asyncio.sleep(0.001)


class _Applier:
    """The completer's side of the protocol: records the results applied."""

    def __init__(self) -> None:
        self.successes: list[Success] = []

    async def apply(self, successes: list[Success], failures: list[Failure]) -> Applied:
        self.successes += successes
        return Applied(len(successes), 0, len(failures), 0)


def _dispatcher(
    protocol: _Protocol, hand_offs: _HandOffs, errors: DatabaseErrors | None = None
) -> tuple[Dispatcher, dict[Any, Any]]:
    gates: dict[uuid.UUID, asyncio.Event] = {}

    async def handler(run: Run) -> dict[str, Any]:
        await gates.setdefault(run.id, asyncio.Event()).wait()
        return {}

    stage = Stage("s", handler, consumes="NEW", produces="DONE", concurrency=4, batch=4)
    labels = (f"modes-{uuid.uuid4().hex[:8]}", "s")
    metrics.prepare_stage(*labels)
    log = cast(Any, _Log())
    tally = StageTally(labels, lambda: 0)
    held: set[uuid.UUID] = set()
    running: dict[uuid.UUID, asyncio.Task[None]] = {}
    stopping, slot_freed = asyncio.Event(), asyncio.Event()
    completer = Completer(
        cast(Any, _Applier()),
        tally=tally,
        held=held,
        running=running,
        slot_freed=slot_freed,
        errors=cast(Any, None),
        log=log,
    )
    in_flight = InFlight(
        Pipeline("p", [stage]),
        stage,
        held=held,
        tasks=running,
        completer=completer,
        tally=tally,
        slot_freed=slot_freed,
        stopping=stopping,
        log=log,
        log_runs=False,
    )
    dispatcher = Dispatcher(
        stage,
        cast(Any, protocol),
        in_flight=in_flight,
        hand_offs=cast(Any, hand_offs),
        errors=cast(Any, errors),
        wake=asyncio.Event(),
        slot_freed=slot_freed,
        log=log,
    )
    return dispatcher, gates


def _finish(gates: dict[uuid.UUID, asyncio.Event], rows: list[ClaimedRow]) -> None:
    for row in rows:
        gates.setdefault(row[0], asyncio.Event()).set()


def test_a_full_claim_is_a_backlog_and_a_short_one_waits_armed() -> None:
    async def scenario() -> None:
        protocol, hand_offs = _Protocol(), _HandOffs()
        dispatcher, gates = _dispatcher(protocol, hand_offs)
        first, second = _rows(4), _rows(1)
        protocol.claims = [first, second]
        task = asyncio.create_task(dispatcher.dispatch_until_stopped())
        await asyncio.sleep(0.01)
        assert (dispatcher.mode, protocol.asked) == (W, [])  # waits for a wake-up
        dispatcher.sweep()
        await _until(lambda: dispatcher.mode is B)
        assert hand_offs.waiting == [(False, 0)]
        _finish(gates, first[:1])  # one free slot: below half a batch, no claim yet
        await asyncio.sleep(0.01)
        assert protocol.asked == [(4, True)]
        _finish(gates, first[1:2])  # two free: claimed without a wake-up
        await _until(lambda: dispatcher.mode is W)
        assert protocol.asked == [(4, True), (2, False)]
        assert hand_offs.waiting[-1] == (True, 0)  # armed, with runs in flight: no free slot
        assert hand_offs.offered == []
        _finish(gates, first + second)  # idle again: it offers its slots, without a claim
        await _until(lambda: len(hand_offs.offered) == 1)
        # Its 5 results, not yet applied when the last run ended, count too: 8 held at most.
        assert hand_offs.offered == [3]
        assert protocol.asked == [(4, True), (2, False)]
        dispatcher.stop()
        await task
        assert dispatcher.mode is S

    asyncio.run(scenario())


def test_a_claim_the_database_did_not_answer_is_made_again_without_another_wake_up() -> None:
    """The wake-up a claim answered is spent when the claim fails: nothing may come to wake
    the worker again (its row disarmed by the hand-off that took its last slot, say)."""

    async def scenario() -> None:
        protocol, hand_offs = _Protocol(), _HandOffs()
        errors = DatabaseErrors(
            pool=cast(Any, None),  # a lost connection, not a read-only server: neither is used
            listener=cast(Any, None),
            stopping=asyncio.Event(),
            sweep_interval=5,
            labels=("modes", "s"),
            log=cast(Any, _Log()),
        )
        dispatcher, gates = _dispatcher(protocol, hand_offs, errors)
        protocol.failures = [psycopg.OperationalError("server closed the connection")]
        claimed = _rows(1)
        protocol.claims = [claimed]
        task = asyncio.create_task(dispatcher.dispatch_until_stopped())
        dispatcher.sweep()  # the one wake-up
        await _until(lambda: len(protocol.asked) == 2)
        await _until(lambda: claimed[0][0] in gates)  # the second claim's run started
        dispatcher.stop()
        _finish(gates, claimed)
        await task

    asyncio.run(scenario())


def test_a_rescued_run_due_empties_the_worker_then_runs_alone() -> None:
    async def scenario() -> None:
        protocol, hand_offs = _Protocol(), _HandOffs()
        dispatcher, gates = _dispatcher(protocol, hand_offs)
        busy, rescued = _rows(2), _rows(1, rescued=True)
        protocol.claims = [busy, rescued, []]
        task = asyncio.create_task(dispatcher.dispatch_until_stopped())
        dispatcher.sweep()
        await _until(lambda: len(protocol.asked) == 1 and dispatcher.mode is W)
        protocol.rescued_due = True
        dispatcher.sweep()  # a timer wake-up with runs in flight asks, and empties
        await _until(lambda: dispatcher.mode is E)
        assert hand_offs.waiting[-1] == (False, 0)
        hand_offs.row = _rows(1)[0]
        assert dispatcher.take_hand_off("signed") is True  # given back: it cannot take it
        assert hand_offs.given_back == [hand_offs.row[0]]
        _finish(gates, busy)  # empty: claims at once, alone, and gets the rescued run
        await _until(lambda: dispatcher.mode is R)
        assert protocol.asked[-1] == (4, True)
        assert dispatcher.free_slots == 0
        protocol.rescued_due = False
        _finish(gates, rescued)  # done: it looks again at once, as under a backlog
        await _until(lambda: dispatcher.mode is W and len(protocol.asked) == 3)
        assert hand_offs.waiting[-1] == (True, 4)
        dispatcher.stop()
        await task

    asyncio.run(scenario())


def test_a_hand_off_is_started_while_waiting_and_wakes_only_on_the_last_slot() -> None:
    async def scenario() -> None:
        protocol, hand_offs = _Protocol(), _HandOffs()
        dispatcher, gates = _dispatcher(protocol, hand_offs)
        row = _rows(1)[0]
        hand_offs.row, hand_offs.free_reported = row, 3
        assert dispatcher.take_hand_off("signed") is False
        assert list(dispatcher._in_flight.tasks) == [row[0]]
        hand_offs.row, hand_offs.free_reported = _rows(1)[0], 0
        assert dispatcher.take_hand_off("signed") is True
        assert dispatcher.free_slots == 0
        dispatcher.stop()
        hand_offs.row = _rows(1)[0]
        assert dispatcher.take_hand_off("signed") is True  # stopping: given back
        assert hand_offs.given_back == [hand_offs.row[0]]
        _finish(gates, [row])
        for task in list(dispatcher._in_flight.tasks.values()):
            task.cancel()

    asyncio.run(scenario())


def test_a_hand_off_of_a_run_still_held_is_given_back_and_of_one_being_released_left() -> None:
    """A stage that routes a run back to itself may have it handed over again once the result
    that sent it back committed, before the completer let it go: a new lease, given back,
    never left leased and unstarted. A run being given back or released is the release's."""

    async def scenario() -> None:
        protocol, hand_offs = _Protocol(), _HandOffs()
        dispatcher, _gates = _dispatcher(protocol, hand_offs)
        held, releasing = _rows(1)[0], _rows(1)[0]
        dispatcher._in_flight.held.add(held[0])  # its last result not yet off the books
        hand_offs.releasing.add(releasing[0])
        hand_offs.row = held
        assert dispatcher.take_hand_off("signed") is True
        hand_offs.row = releasing
        assert dispatcher.take_hand_off("signed") is False  # slots left: nothing to claim
        assert hand_offs.given_back == [held[0]]
        assert dispatcher._in_flight.tasks == {}  # neither started

    asyncio.run(scenario())


def test_a_run_started_again_while_its_first_task_ends_runs_both_to_their_results() -> None:
    """A claim does not look at what runs here: a run rescued from under this worker can be
    claimed by it again while its first attempt still ends. Each task then knows itself (its
    timeout, its cancellation), whatever the worker's table of tasks says meanwhile."""

    async def scenario() -> None:
        dispatcher, gates = _dispatcher(_Protocol(), _HandOffs())
        in_flight = dispatcher._in_flight
        (row,) = _rows(1)
        in_flight.start([row], by_timer=False)
        await asyncio.sleep(0.01)  # the first attempt waits in its handler
        first = in_flight.tasks[row[0]]
        gates[row[0]].set()  # its wake-up is queued before the second task's first step
        in_flight.start([row], by_timer=False)
        second = in_flight.tasks[row[0]]
        await _until(lambda: first.done() and second.done())
        assert first.exception() is None and second.exception() is None
        applied = cast(_Applier, in_flight._completer._protocol).successes
        assert len([*applied, *in_flight._successes]) == 2

    asyncio.run(scenario())


def test_the_result_of_an_attempt_that_ends_while_its_run_runs_here_again_is_left_out() -> None:
    """The first attempt's task ends after the run was claimed here again: the new attempt's
    task stays counted, the run stays held, and the old result is not applied (it could pass
    the new lease's fence); the new attempt's result is."""

    async def scenario() -> None:
        dispatcher, gates = _dispatcher(_Protocol(), _HandOffs())
        in_flight = dispatcher._in_flight
        applied = cast(_Applier, in_flight._completer._protocol).successes
        (row,) = _rows(1)
        in_flight.start([row], by_timer=False)
        await asyncio.sleep(0.01)
        first = in_flight.tasks[row[0]]
        gates[row[0]].set()  # the first attempt ends...
        in_flight.start([row], by_timer=False)  # ...as the run is claimed here again
        second = in_flight.tasks[row[0]]
        gates[row[0]] = asyncio.Event()  # which waits in its handler
        await _until(first.done)
        assert in_flight.tasks == {row[0]: second} and row[0] in in_flight.held
        await in_flight._completer.flush()  # the completer's turn
        assert applied == [] and row[0] in in_flight.held
        gates[row[0]].set()
        await _until(second.done)
        assert [s.run_id for s in applied] == [row[0]]
        assert in_flight.held == set()

    asyncio.run(scenario())


def test_a_hand_off_runs_its_handler_and_commits_a_lone_result_before_the_callback_returns() -> (
    None
):
    """Read in the listener's reader callback, a hand-off's handler starts there, and a result
    with nothing else in flight is committed from the run's own task, not the completer's."""

    async def scenario() -> None:
        (row,) = _rows(1)
        dispatcher, gates = _dispatcher(_Protocol(), _HandOffs(row))
        in_flight = dispatcher._in_flight
        applied = cast(_Applier, in_flight._completer._protocol).successes
        _finish(gates, [row])  # its handler returns at once
        seen: list[list[uuid.UUID]] = []

        def notified() -> None:  # as the listener calls it: outside any task
            assert dispatcher.take_hand_off("signed") is False  # slots left: nothing to claim
            seen.append([s.run_id for s in applied])

        asyncio.get_running_loop().call_soon(notified)
        await _until(lambda: bool(seen))
        assert seen == [[row[0]]]
        assert in_flight.tasks == {} and in_flight.held == set()

    asyncio.run(scenario())
