"""Hand-offs: runs leased to a waiting worker by the wake-up trigger, and the worker's place on
the registry's waiting list that brings them.

A worker with nothing to do arms its registry row (`waiting`, `free_slots`). A transaction that
makes a run claimable then leases it to that worker at commit and notifies it with the run
itself: `run:<worker>:<signature>:<json>`. Anyone may NOTIFY, so the signature,
sha256(secret || sha256(secret || body)) with a secret only this process and its registry row
know, says the database sent it; `expires` and the memory of the hand-offs taken refuse a stale
or replayed one. A hand-off the worker cannot take is given back.

A run handed over while the listener is away goes unheard. So a worker whose listener is away
leaves the waiting list, and once the listener is back it releases what is leased to it but not
held: `unheard` asks the dispatcher to do so before its next claim.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import hashlib
import hmac
import importlib
import secrets
import time
from collections.abc import Callable, Coroutine
from typing import Any
from uuid import UUID

import psycopg
from structlog.typing import FilteringBoundLogger

from conveyor import metrics
from conveyor.db import brief
from conveyor.listening import Listener
from conveyor.protocol import StageProtocol
from conveyor.server_json import ClaimedRow, Undecodable, json_from_server
from conveyor.worker.database_errors import DB_ERRORS, DatabaseErrors

# What every hand-off notification starts with; the worker's id follows.
HAND_OFF = "run:"
# A worker that has just gone idle claims once more after this grace: a transaction whose wake-up
# trigger ran (and found nobody waiting) just before it said it was waiting commits within it.
IDLE_GRACE_SECONDS = 0.05
# Refused hand-off notifications (forged, stale, replayed) are logged at most this often.
REFUSAL_LOG_SECONDS = 10.0
# Past this many remembered hand-offs, those whose lease is over are forgotten.
_REMEMBERED = 1024


def _cpython_sha256() -> Callable[[bytes], Any]:
    """CPython's own SHA-256 where it has one. The check sits on the path from an idle wait
    to a handler, on a CPU just woken, where OpenSSL's (a provider lookup on every call) costs
    some 20 µs more; hashlib's, which is OpenSSL's, otherwise."""
    for module in ("_sha2", "_sha256"):  # Python 3.12+, 3.11
        with contextlib.suppress(ImportError, AttributeError):
            return importlib.import_module(module).sha256  # type: ignore[no-any-return]
    return hashlib.sha256


_sha256 = _cpython_sha256()


def signature(secret: bytes, body: str) -> str:
    """hand_off()'s signature of a payload: sha256(secret || sha256(secret || body)), in hex."""
    inner = _sha256(secret + body.encode()).digest()
    return _sha256(secret + inner).hexdigest()  # type: ignore[no-any-return]


class Verdict(enum.Enum):
    """What became of a hand-off that is not a run to start."""

    REFUSED = "refused"  # forged, stale or replayed: nothing to do
    UNDECODABLE = "undecodable"  # leased to this worker, unreadable here: released as unheard


class HandOffs:
    def __init__(
        self,
        worker_id: str,
        protocol: StageProtocol,
        *,
        listener: Listener,
        errors: DatabaseErrors,
        held: set[UUID],
        channel: str,
        ttl_seconds: float,
        stopping: asyncio.Event,
        wake: asyncio.Event,
        labels: tuple[str, str],
        log: FilteringBoundLogger,
    ) -> None:
        self._protocol = protocol
        self._listener = listener
        self._errors = errors
        self._held = held  # the worker's runs, from claim or hand-off to result (shared)
        self._channel = channel
        self._ttl = ttl_seconds
        self._stopping = stopping
        self._wake = wake
        self._labels = labels
        self._log = log
        # Known to this process and, through its registry row, to the database alone: what
        # tells a hand-off from a notification any login could send.
        self.secret = secrets.token_bytes(32)
        self.prefix = f"{HAND_OFF}{worker_id}:"
        self.armed = False  # the registry row says this worker waits: runs may be handed to it
        self.free_reported = 0  # the free slots the registry last heard of (hand-offs count down)
        self.unheard = False  # runs may have been handed over unheard: release them
        self.releasing: set[UUID] = set()  # being given back: neither started nor released again
        self.background: set[asyncio.Task[None]] = set()  # give-backs, the leaving beat
        # Set as the worker removes its registry row at exit: no write may bring it back.
        self.forgotten = False
        # One registry write at a time, each deciding what to write once it holds the lock: the
        # dispatcher, the heartbeat and the give-backs all write the row, and a write decided
        # before another one committed would leave the row saying what the worker no longer is
        # (not waiting while it waits: no run would be handed to it or woken).
        self._registry_write = asyncio.Lock()
        # Hand-offs read so far, and the registry's free slots the last one carried: a hand-off
        # read while the row is written was counted by the trigger before or after that write.
        self._reads = 0
        self._read_free = 0
        # Every hand-off taken, and every lease released unheard, as (run, attempt, lease
        # expiry), until that lease would have expired: a replayed notification is not run
        # twice, nor a late one run beside the worker it was released to. The expiry tells
        # two genuine hand-offs of one run apart: its attempt goes back to 0 when it moves on
        # (a stage that routes a run back to itself) or is retried, and the next hand-off
        # brings the same attempt again, under a new lease.
        self._handed: dict[tuple[UUID, int, float], float] = {}
        self._forget_at = _REMEMBERED
        self._refused = 0
        self._next_refusal_log = 0.0

    # -- reading a hand-off ------------------------------------------------------------------

    def read(self, signed: str) -> ClaimedRow | Verdict:
        """The run in a hand-off to this worker (the text after its prefix), once its signature
        proves the database sent it and it is neither stale nor replayed. Notes the registry's
        count of free slots it carries: at zero the trigger took this worker off the list."""
        sig, _, body = signed.partition(":")
        if not (sig.isascii() and hmac.compare_digest(sig, signature(self.secret, body))):
            self._refuse("signature does not match")
            return Verdict.REFUSED
        try:
            handed = json_from_server(body)
            if isinstance(handed, Undecodable):
                raise ValueError(handed.reason)
            free = int(handed["free"])  # the registry's count, after this one
            expires = float(handed["expires"])
            row: ClaimedRow = (
                UUID(handed["id"]),
                handed["input"],
                handed["outputs"],
                int(handed["attempt"]),
                float(handed["waited"]),
                False,
            )
        except (ValueError, KeyError, TypeError, RecursionError) as exc:
            # The database leased it to this worker, but its text cannot be read here (an
            # input nested too deeply): released unheard, then claimed, and failed there.
            self._log.error("undecodable hand-off; releasing it", error=brief(exc))
            self.unheard = True
            return Verdict.UNDECODABLE
        key = (row[0], row[3], expires)
        if expires <= time.time() or key in self._handed:
            self._refuse("stale or replayed")
            return Verdict.REFUSED
        self._remember(key, expires)
        self._reads += 1
        self._read_free = free
        self.free_reported = free
        if free <= 0:
            self.armed = False  # the trigger took it off the waiting list
        return row

    def _remember(self, key: tuple[UUID, int, float], expires: float) -> None:
        """A lease whose hand-off is taken, or given back unheard: refused if heard again."""
        if len(self._handed) >= self._forget_at:  # forget the ones whose lease is over
            now = time.time()
            self._handed = {k: at for k, at in self._handed.items() if at > now}
            # Leases all still running are looked at again only once as many more came.
            self._forget_at = max(_REMEMBERED, 2 * len(self._handed))
        self._handed[key] = expires

    def _refuse(self, reason: str) -> None:
        """A hand-off notification that proves nothing: anyone may NOTIFY. Counted, and logged
        at most every few seconds, so a flood of them cannot flood the log."""
        self._refused += 1
        metrics.WORKER_ERRORS.labels(*self._labels, "hand_off_refused").inc()
        now = time.monotonic()
        if now >= self._next_refusal_log:
            self._next_refusal_log = now + REFUSAL_LOG_SECONDS
            self._log.warning("hand-off notification refused", reason=reason, refused=self._refused)

    # -- giving runs back --------------------------------------------------------------------

    def give_back_soon(self, run_id: UUID) -> None:
        self._in_background(self._give_back(run_id))

    def offer_soon(self, free_slots: Callable[[], int]) -> None:
        """Stay on the waiting list, offering `free_slots()` runs again, beside the dispatcher:
        for a row that waits offering none (HandOffs.armed, free_reported 0). Decided once the
        registry lock is held, on what the row says then and what `free_slots()` says then (0:
        nothing to offer, the worker no longer waits)."""
        self._in_background(self._offer(free_slots))

    async def _offer(self, free_slots: Callable[[], int]) -> None:
        async with self._registry_write:
            free = free_slots()
            if not (self.armed and self.free_reported <= 0 and free > 0 and self._may_wait()):
                return
            try:
                await self._write_row(True, free)
            except psycopg.Error as exc:  # still on the list: woken, it claims and arms again
                self._log.warning("could not offer free slots", error=brief(exc))

    def leave_soon(self) -> None:
        """Leave the waiting list, beside whatever runs: no more hand-offs, the worker stops."""
        self._in_background(self.set_waiting(False))

    def _in_background(self, work: Coroutine[Any, Any, None]) -> None:
        """Run `work` beside the dispatcher; waited for (then cancelled) at exit."""
        task = asyncio.create_task(work)
        self.background.add(task)
        task.add_done_callback(self.background.discard)

    async def _give_back(self, run_id: UUID) -> None:
        """Release a hand-off this worker cannot take, after leaving the waiting list: the
        release makes the run claimable again, and must not hand it straight back."""
        self.releasing.add(run_id)
        try:
            async with self._registry_write:
                await self._leave_for_release()
                await self._protocol.release(
                    [run_id], reason="handed to a worker with no free slot"
                )
        except psycopg.Error as exc:  # its lease expires; the rescue forgives a live owner
            self._log.warning("could not give a hand-off back", error=brief(exc))
        finally:
            self.releasing.discard(run_id)

    async def _leave_for_release(self) -> None:
        """Off the waiting list before a release (the registry lock held until the release
        has committed, so that nothing arms the worker in between): the release's own commit
        would otherwise hand the run straight back. Written whatever the worker believes the
        row says: a beat that waited for the trigger's lock may have written it after the
        hand-off that disarmed it."""
        await self._write_row(False, 0)

    async def release_unheard(self) -> None:
        """Give back the runs leased to this worker that it never heard of: handed to it while
        its listener was away. Fenced like every release; a hand-off heard meanwhile is left
        to this release (`releasing`), not started. The worker leaves the waiting list first,
        as a give-back does. A database error is raised, for the dispatcher to try again."""
        leases = await self._protocol.leased_to_me()
        if not leases.keys() - self._held - self.releasing:
            return
        async with self._registry_write:
            await self._leave_for_release()
            # What started meanwhile is held.
            unheard = leases.keys() - self._held - self.releasing
            if not unheard:
                return
            # A hand-off of one of these leases heard from now on (queued behind the one that
            # could not be read) is a replay: the run is released, and may be someone else's.
            for run_id in unheard:
                attempt, expires = leases[run_id]
                self._remember((run_id, attempt, expires), expires)
            self.releasing |= unheard
            try:
                released = await self._protocol.release(
                    list(unheard), reason="handed to the worker while its listener was away"
                )
            finally:
                self.releasing -= unheard
        self._log.warning("released runs handed over while not listening", runs=released)

    # -- the waiting list --------------------------------------------------------------------

    async def set_waiting(self, waiting: bool, free_slots: int = 0) -> None:
        """Arm or disarm the wake-up trigger for this worker, with `free_slots` runs it may be
        handed; only on a change, or when a waiting worker's free slots changed by more than
        its hand-offs counted (it claimed): hand-offs beyond its room would only be given
        back. Never armed while the listener is away: a run handed over then would go unheard.
        Once armed, the dispatcher is woken after IDLE_GRACE_SECONDS; a worker that could not
        arm is woken after the back-off, to claim and try again."""
        failed: psycopg.Error | None = None
        async with self._registry_write:
            waiting = waiting and self._may_wait()
            free = free_slots if waiting else 0
            if waiting == self.armed and free == self.free_reported:
                return
            was_armed = self.armed
            try:
                await self._write_row(waiting, free)
            except psycopg.Error as exc:
                failed = exc
        # The back-off after a failure waits outside the lock: the heartbeat need not wait too.
        if isinstance(failed, DB_ERRORS):
            await self._errors.away("beat", failed)
        elif isinstance(failed, psycopg.Error):
            await self._errors.refused("beat", failed)
        if failed is not None:
            if waiting:
                self._wake.set()
        elif self.armed and not was_armed:
            asyncio.get_running_loop().call_later(IDLE_GRACE_SECONDS, self._wake.set)

    def _may_wait(self) -> bool:
        """Whether the worker may be on the waiting list: listening, and not stopping."""
        return self._listener.connected.is_set() and not self._stopping.is_set()

    async def beat(self, free_slots: Callable[[], int]) -> None:
        """The heartbeat's registry beat: keeps the row fresh, as armed as the worker is when
        the beat is sent, with `free_slots()` read then. Raises on a database error, for the
        heartbeat to log."""
        async with self._registry_write:
            await self._write_row(self.armed, free_slots() if self.armed else 0)

    async def _write_row(self, waiting: bool, free: int) -> None:
        """Write the registry row (the lock held) and note what it says now. A hand-off read
        meanwhile was counted by the trigger before this write or after it, which the worker
        cannot tell apart: it then takes the hand-off's word on whether it is still armed, and
        writes the row again at the next chance (no free count matches -1)."""
        if self.forgotten:
            self.armed, self.free_reported = False, 0
            return
        reads = self._reads
        await self._protocol.beat(
            channel=self._channel,
            waiting=waiting,
            ttl_seconds=self._ttl,
            free_slots=free,
            secret=self.secret,
        )
        if self._reads == reads:
            self.armed, self.free_reported = waiting, free
        else:
            self.armed, self.free_reported = waiting and self._read_free > 0, -1

    async def not_waiting_while_deaf(self) -> None:
        """A worker whose listener is away leaves the waiting list at once, so no run is handed
        to it unheard; the sweep tightens meanwhile, and once the listener is back the worker
        releases what it missed (release_unheard), claims, and waits again."""
        listener = self._listener
        while True:
            await listener.disconnected.wait()
            while self.armed and not listener.connected.is_set():
                await self.set_waiting(False)
            await listener.connected.wait()
