"""The dispatcher: when a worker claims, how much, and whether it takes a hand-off.

The dispatcher is a state machine. Its mode says what it waits for before its next claim:

    WAITING   waits for a wake-up: a notification, a hand-off that took its last free slot, the
              sweep timer, or the idle grace after it armed its registry row (the only mode in
              which it is armed, and so the only one in which runs are handed to it).
    BACKLOG   its last claim came back full: it claims again without waiting for a wake-up, as
              soon as `refill_at` slots (half a batch) are free, so that batches stay big.
    EMPTYING  a rescued run is due (asked on a timer wake-up while runs are in flight) and a
              rescued run is only claimed alone: it claims nothing, takes no hand-off, and once
              nothing is in flight claims at once, alone.
    RESCUED   the rescued run is in flight and runs alone: nothing is claimed or taken beside it.
    STOPPING  the worker stops: nothing more is claimed or taken. Never left.

Every mode also waits for a free slot: WAITING and BACKLOG claim into what is free, EMPTYING and
RESCUED wait for nothing to be in flight. Events, and the modes they lead to:

                        claimed_full
              +---------+ ------------> +---------+
   start ---> | WAITING |               | BACKLOG | <-----------+
              +---------+ <------------ +---------+             |
                 |   ^     claimed_short   |   ^                | rescued_done
     rescued_due |   | claimed_short       |   | claimed_full   |
                 v   |                     |   |                |
              +----------+  rescued_due    |   |           +---------+
              | EMPTYING | <---------------+   |           | RESCUED |
              |          | --------------------+           +---------+
              +----------+                                      ^
                 |               claimed_rescued                |
                 +----------------------------------------------+

    A short claim keeps WAITING where it is, a full one BACKLOG; a claim made with nothing in
    flight may bring a rescued run from WAITING or BACKLOG as well (claimed_rescued); `stop`
    moves every mode to STOPPING. TRANSITIONS below is the whole table.

Only the dispatcher's own loop moves between modes, through `_on`, except `stop`, which may
come at any await. Two things lie outside the modes: whether the registry row is armed
(HandOffs.armed: the trigger disarms it when it hands over the last free slot, and the listener
going away disarms it) and whether runs handed over unheard are to be released before the next
claim (HandOffs.unheard).
"""

from __future__ import annotations

import asyncio
import enum
import logging
import random
import time

import psycopg
from structlog.typing import FilteringBoundLogger

from conveyor.pipeline import Stage
from conveyor.protocol import StageProtocol
from conveyor.worker.database_errors import DB_ERRORS, DatabaseErrors
from conveyor.worker.hand_offs import HandOffs, Verdict
from conveyor.worker.in_flight import InFlight

# A worker holds at most this many times its concurrency: runs in its handlers, and results
# waiting for the completer's next commit.
HOLD_FACTOR = 2


class Mode(enum.Enum):
    WAITING = "waiting"
    BACKLOG = "backlog"
    EMPTYING = "emptying"
    RESCUED = "rescued"
    STOPPING = "stopping"


class Event(enum.Enum):
    CLAIMED_FULL = "claimed_full"  # a claim brought as many runs as it asked for
    CLAIMED_SHORT = "claimed_short"  # fewer: the queue is empty, for now
    CLAIMED_RESCUED = "claimed_rescued"  # a claim made alone brought a rescued run
    RESCUED_DUE = "rescued_due"  # a timer wake-up with runs in flight found a rescued run due
    RESCUED_DONE = "rescued_done"  # the rescued run ended: nothing is in flight
    STOP = "stop"


_CLAIMS = {
    Event.CLAIMED_FULL: Mode.BACKLOG,
    Event.CLAIMED_SHORT: Mode.WAITING,
    # A lone rescued run says nothing about the backlog: BACKLOG looks again once it is done.
    Event.CLAIMED_RESCUED: Mode.RESCUED,
}

TRANSITIONS: dict[tuple[Mode, Event], Mode] = {
    **{(mode, event): to for mode in (Mode.WAITING, Mode.BACKLOG) for event, to in _CLAIMS.items()},
    **{(mode, Event.RESCUED_DUE): Mode.EMPTYING for mode in (Mode.WAITING, Mode.BACKLOG)},
    **{(Mode.EMPTYING, event): to for event, to in _CLAIMS.items()},
    (Mode.RESCUED, Event.RESCUED_DONE): Mode.BACKLOG,
    **{(mode, Event.STOP): Mode.STOPPING for mode in Mode},
    # A stop may come while a claim or a question is under way: its answer changes nothing.
    **{(Mode.STOPPING, event): Mode.STOPPING for event in Event},
}


def next_mode(mode: Mode, event: Event) -> Mode:
    """The mode `event` moves `mode` to; an event a mode cannot meet is a bug (KeyError)."""
    return TRANSITIONS[mode, event]


class Dispatcher:
    """Claims for one worker in the modes described above; runs go to InFlight."""

    def __init__(
        self,
        stage: Stage,
        protocol: StageProtocol,
        *,
        in_flight: InFlight,
        hand_offs: HandOffs,
        errors: DatabaseErrors,
        wake: asyncio.Event,
        slot_freed: asyncio.Event,
        log: FilteringBoundLogger,
    ) -> None:
        self._stage = stage
        self._concurrency = stage.concurrency
        self._hold = HOLD_FACTOR * stage.concurrency
        # Under a backlog, claim only when a good part of a batch is free, so batches stay big.
        self._refill_at = min(max(1, stage.batch // 2), stage.concurrency)
        self._protocol = protocol
        self._in_flight = in_flight
        self._tasks = in_flight.tasks
        in_flight.on_idle = self._offer_slots_again
        self._hand_offs = hand_offs
        self._errors = errors
        self._wake = wake  # set by notifications, hand-offs, the sweep timer, the idle grace
        self._slot_freed = slot_freed  # set by every run that ends
        self._log = log
        enabled_for = getattr(log, "is_enabled_for", None)
        self._log_modes = enabled_for is not None and bool(enabled_for(logging.DEBUG))
        self.mode = Mode.WAITING
        self._woken_by_timer = False
        self._throttle_timer: asyncio.TimerHandle | None = None

    def _on(self, event: Event) -> None:
        """The one way the mode changes: to where `event` leads (logged at debug level)."""
        mode = next_mode(self.mode, event)
        if mode is not self.mode:
            if self._log_modes:
                self._log.debug(
                    "dispatcher mode", mode=mode.value, on=event.value, was=self.mode.value
                )
            self.mode = mode

    @property
    def free(self) -> int:
        """How many more runs this worker may take: its slots not running a handler, and no
        more than `HOLD_FACTOR` times its concurrency held in all, results that wait for their
        commit included. A completer that falls behind slows the claims down, and the runs wait
        in the database (where other workers may take them), not in this worker's memory."""
        held = len(self._in_flight.held)
        return max(0, min(self._concurrency - len(self._tasks), self._hold - held))

    @property
    def free_slots(self) -> int:
        """How many runs may be handed to this worker (the registry counts them down): what is
        free (`free`) while no handler runs, none while one does. Hand-offs are for a worker
        that is idle; one that works claims what comes as a batch, when it is woken."""
        if self._tasks or self.mode is Mode.RESCUED or self._protocol.flow is not None:
            return 0  # under limits, none: a hand-off would pass them by
        return self.free

    def _offer_slots_again(self) -> None:
        """The last run in flight has ended. A worker that claimed runs while waiting stayed
        armed but offered no slot (free_slots: it was working); idle now, it offers them
        again, so that the next run to come alone is handed to it rather than woken for and
        claimed. Its hand-offs count its slots down themselves: nothing to write then."""
        hand_offs = self._hand_offs
        if self.mode is Mode.WAITING and hand_offs.armed and hand_offs.free_reported <= 0:
            hand_offs.offer_soon(lambda: self.free_slots if self.mode is Mode.WAITING else 0)

    def _wake_at(self, epoch: float) -> None:
        """Claim again when a limit opens (a closed key, a bucket filling), spread over a few
        milliseconds so that the workers waiting on it do not all ask at once."""
        if self._throttle_timer is not None:
            self._throttle_timer.cancel()
        delay = max(epoch - time.time(), 0.0) + random.uniform(0.0, 0.05)
        self._throttle_timer = asyncio.get_running_loop().call_later(delay, self._wake.set)

    def sweep(self) -> None:
        """The sweep timer: claim now, even without a notification."""
        self._woken_by_timer = True
        self._wake.set()

    def stop(self) -> None:
        self._on(Event.STOP)
        self._wake.set()
        self._slot_freed.set()

    def take_hand_off(self, signed: str) -> bool:
        """Start a run the wake-up trigger leased to this worker at commit, from the
        notification (the text after the worker's prefix). One it cannot take is given back.
        Whether the dispatcher should look again: the registry handed it its last free slot,
        so it no longer waits."""
        hand_offs = self._hand_offs
        row = hand_offs.read(signed)
        if isinstance(row, Verdict):
            return row is Verdict.UNDECODABLE  # refused: nothing to claim
        no_slot_left = hand_offs.free_reported <= 0
        run_id = row[0]
        if run_id in hand_offs.releasing:
            return no_slot_left  # the lease being given back: the release takes care of it
        taking = self.mode is Mode.WAITING or self.mode is Mode.BACKLOG
        # A run still held here was handed over again once the result that sent it back to
        # this stage committed, before the completer let it go: a new lease, given back (and
        # claimed again) rather than left leased to this worker, unstarted, until it expires.
        again = run_id in self._in_flight.held
        if again or not taking or self.free < 1:
            hand_offs.give_back_soon(run_id)
            return True  # it no longer waits: the dispatcher claims and waits again when it can
        self._in_flight.start([row], by_timer=False, at_once=True)
        return no_slot_left

    async def dispatch_until_stopped(self) -> None:
        protocol = self._protocol
        hand_offs = self._hand_offs
        tasks = self._tasks
        while True:
            mode = self.mode
            if mode is Mode.STOPPING:
                return
            free = self.free
            # The free slots each mode waits for: one, half a batch, or all of them.
            if mode is Mode.WAITING:
                needed = 1
            elif mode is Mode.BACKLOG:
                needed = self._refill_at
            else:
                needed = self._concurrency
            if free < needed:
                self._slot_freed.clear()
                await self._slot_freed.wait()
                continue
            if mode is Mode.RESCUED:
                self._on(Event.RESCUED_DONE)
                mode = self.mode
            elif mode is Mode.WAITING:
                await self._wake.wait()
                if self.mode is Mode.STOPPING:
                    return
            self._wake.clear()
            timer_fired, self._woken_by_timer = self._woken_by_timer, False
            # A sweep pick-up is a claim by an idle worker that the timer woke; under a backlog
            # the dispatcher claims without waiting, whatever the timer did meanwhile.
            by_timer = timer_fired and mode is Mode.WAITING
            alone = not tasks
            operation = "claim"
            try:
                if hand_offs.unheard:
                    operation = "release_unheard"
                    hand_offs.unheard = False
                    await hand_offs.release_unheard()
                    operation = "claim"
                if timer_fired and not alone:
                    operation = "rescued_waiting"
                    if await protocol.rescued_waiting():
                        self._on(Event.RESCUED_DUE)
                        await hand_offs.set_waiting(False)  # no hand-off keeps it from emptying
                        continue
                    operation = "claim"
                want = protocol.claim_size(free)
                rows = await protocol.claim(want, alone=alone)
            except DB_ERRORS as exc:
                hand_offs.unheard = hand_offs.unheard or operation == "release_unheard"
                await self._errors.away(operation, exc)
                self._wake.set()  # the wake-up this claim answered is spent: claim again
                continue
            except psycopg.Error as exc:
                hand_offs.unheard = hand_offs.unheard or operation == "release_unheard"
                await self._errors.refused(operation, exc)
                self._wake.set()  # and claim again
                continue
            # Held back (nothing, or less than asked, because of a limit): claim again when it
            # allows more.
            throttled = self._protocol.throttled
            if len(rows) < want and throttled is not None and throttled.until is not None:
                self._wake_at(throttled.until)
            if self._in_flight.start(rows, by_timer=by_timer):
                self._on(Event.CLAIMED_RESCUED)
            elif len(rows) == want:
                self._on(Event.CLAIMED_FULL)
            else:
                self._on(Event.CLAIMED_SHORT)
            if self.mode is Mode.WAITING:
                await hand_offs.set_waiting(True, self.free_slots)
                if not tasks:  # its runs ended while the row was written
                    self._offer_slots_again()
            else:
                await hand_offs.set_waiting(False)
