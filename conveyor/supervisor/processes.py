"""Forks N worker processes per stage, restarts the ones that die, forwards shutdown signals."""

from __future__ import annotations

import contextlib
import errno
import os
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import structlog

from conveyor import metrics
from conveyor.settings import ConfigError, Settings
from conveyor.supervisor.http import ProbeServer
from conveyor.supervisor.multiproc import mark_dead
from conveyor.worker.liveness import LivenessBoard, LivenessSlot

log = structlog.get_logger("conveyor.supervisor")

MAINTENANCE = "maintenance"  # the child that competes for the maintenance lead
CRASH_WINDOW_SECONDS = 10.0  # a child that dies sooner than this after start is crash-looping
MAX_RESTART_DELAY_SECONDS = 30.0
# A stage that crash-loops this many times in a row cannot be kept alive: exit non-zero so the
# orchestrator notices, instead of hiding behind endless restarts.
MAX_CONSECUTIVE_CRASHES = 10


@dataclass
class Slot:
    stage: str
    index: int
    pid: int = 0
    started_at: float = 0.0
    crashes: int = 0
    restart_at: float = 0.0
    restarts: int = 0
    died_pid: int | None = None  # the child it replaces, handed to its successor


# A child whose loop has not turned for this long is stuck: /healthz fails and the orchestrator
# restarts the pod. Loops turn every second, whatever the database is doing.
STUCK_AFTER_SECONDS = 30.0


@dataclass
class Supervisor:
    """Keeps `plan[name]` children of each name alive.

    `start_child(name, liveness, died_pid)` runs in the forked child and never returns; the
    child reports through its LivenessSlot, and `died_pid` is the child it replaces, if one
    died before it (its successor ends what it left behind). `metrics_port` None serves no
    HTTP (tests of the class itself); `metrics_host` None reads CONVEYOR_METRICS_HOST.
    """

    plan: dict[str, int]
    start_child: Callable[[str, LivenessSlot, int | None], None]
    grace_seconds: float
    metrics_port: int | None = None
    metrics_host: str | None = None
    max_consecutive_crashes: int = MAX_CONSECUTIVE_CRASHES
    max_restart_delay: float = MAX_RESTART_DELAY_SECONDS
    pipeline: str = ""  # the metrics' pipeline label
    slots: list[Slot] = field(default_factory=list)
    stopping: bool = False
    stop_signal: int | None = None
    exit_code: int = 0
    _server: ProbeServer | None = field(default=None, init=False, repr=False)

    def run(self) -> int:
        self.slots = [Slot(name, i) for name, n in self.plan.items() for i in range(n)]
        self.board = LivenessBoard(len(self.slots))
        signal.signal(signal.SIGTERM, self._on_signal)
        signal.signal(signal.SIGINT, self._on_signal)
        metrics.publish_build_info()
        for name in self.plan:  # restarts read as zero, not as missing, until one happens
            metrics.WORKER_RESTARTS.labels(self.pipeline, name)
        if self.metrics_port is not None:
            self._server = self._open_probe_server(self.metrics_port)
        log.info("supervisor started", plan=self.plan, pid=os.getpid())
        for slot in self.slots:
            self._spawn(slot)
        try:
            while not self.stopping:
                self._reap()
                self._restart_due()
                self._pause(0.1)
            if self.stop_signal is not None:
                log.info("supervisor stopping", signal=signal.Signals(self.stop_signal).name)
            self._shutdown()
        finally:
            if self._server is not None:
                self._server.close()
                self._server = None
        return self.exit_code

    def _open_probe_server(self, port: int) -> ProbeServer:
        """Bound before any child is forked: a bad address or a taken port is a setting's
        error (exit code 2), not a traceback."""
        host = self.metrics_host
        if host is None:
            host = Settings.from_env().metrics_host
        try:
            return ProbeServer(port, host=host, health=self.health, ready=self.readiness)
        except OSError as exc:
            taken = exc.errno in (errno.EADDRINUSE, errno.EACCES)
            variable, value = (
                ("CONVEYOR_METRICS_PORT", str(port)) if taken else ("CONVEYOR_METRICS_HOST", host)
            )
            raise ConfigError(
                variable, value, f"cannot listen on {host} port {port}: {exc.strerror or exc}"
            ) from None

    def _pause(self, seconds: float) -> None:
        """Wait between checks of the children; the probe server's turn never blocks longer."""
        if self._server is None:
            time.sleep(seconds)
        else:
            self._server.serve_once(seconds)

    def alive(self) -> dict[str, int]:
        counts = dict.fromkeys(self.plan, 0)
        for slot in self.slots:
            if slot.pid:
                counts[slot.stage] += 1
        return counts

    def health(self) -> tuple[bool, dict[str, object]]:
        """Alive: every child running and its loop turning. Never asks the database."""
        now = time.time()
        stuck = [
            f"{s.stage}#{s.index}"
            for s in self.slots
            if s.pid and now - self.board.last_tick(self._position(s)) > STUCK_AFTER_SECONDS
        ]
        alive = self.alive()
        ok = not self.stopping and alive == self.plan and not stuck
        return ok, {"processes": alive, "expected": self.plan, "stuck": stuck}

    def readiness(self) -> tuple[bool, dict[str, object]]:
        """Ready: every child connected: workers LISTENing, the maintenance process connected
        and the schema migrated to the current version. Read from shared memory."""
        waiting = [
            f"{s.stage}#{s.index}"
            for s in self.slots
            if not (s.pid and self.board.listening(self._position(s)))
        ]
        return not waiting and not self.stopping, {"not_connected": waiting}

    def _position(self, slot: Slot) -> int:
        return self.slots.index(slot)

    def _on_signal(self, signum: int, _frame: object) -> None:
        # Nothing else here, logging least of all: the signal may land while this process is
        # inside a log call, whose lock is not reentrant (the supervisor would hang on it).
        if self.stop_signal is None:
            self.stop_signal = signum
        self.stopping = True

    def _spawn(self, slot: Slot) -> None:
        position = self._position(slot)
        self.board.reset(position)
        pid = os.fork()
        if pid == 0:  # the child
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            signal.signal(signal.SIGINT, signal.SIG_DFL)
            if self._server is not None:  # the port stays the supervisor's alone
                self._server.close_inherited()
            code = 0
            try:
                self.start_child(slot.stage, self.board.slot(position), slot.died_pid)
            except SystemExit as exc:
                code = exc.code if isinstance(exc.code, int) else 1
            except BaseException:
                log.exception("worker crashed", stage=slot.stage)
                code = 1
            os._exit(code)
        slot.pid, slot.started_at = pid, time.monotonic()
        log.info("worker process started", stage=slot.stage, pid=pid)

    def _reap(self) -> None:
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            slot = next((s for s in self.slots if s.pid == pid), None)
            if slot is None:
                continue
            self._on_child_exit(slot, status)

    def _on_child_exit(self, slot: Slot, status: int) -> None:
        slot_pid = slot.pid
        lived = time.monotonic() - slot.started_at
        how = (
            f"signal {signal.Signals(os.WTERMSIG(status)).name}"
            if os.WIFSIGNALED(status)
            else f"exit code {os.WEXITSTATUS(status)}"
        )
        slot.pid, slot.died_pid = 0, slot_pid
        mark_dead(slot_pid)
        if self.stopping:
            return
        metrics.WORKER_RESTARTS.labels(self.pipeline, slot.stage).inc()
        slot.crashes = slot.crashes + 1 if lived < CRASH_WINDOW_SECONDS else 1
        delay = min(self.max_restart_delay, 0.1 * 2 ** (slot.crashes - 1))
        slot.restart_at = time.monotonic() + delay
        log.warning(
            "worker process died; restarting",
            stage=slot.stage,
            how=how,
            lived_seconds=round(lived, 2),
            restart_in=round(delay, 2),
        )
        if slot.crashes >= self.max_consecutive_crashes:
            log.error("stage keeps crashing; giving up", stage=slot.stage, crashes=slot.crashes)
            self.exit_code = 1
            self.stopping = True

    def _restart_due(self) -> None:
        now = time.monotonic()
        for slot in self.slots:
            if not slot.pid and slot.restart_at and now >= slot.restart_at:
                slot.restart_at = 0.0
                slot.restarts += 1
                self._spawn(slot)

    def _shutdown(self) -> None:
        live = [s for s in self.slots if s.pid]
        for slot in live:
            _signal(slot.pid, signal.SIGTERM)
        deadline = time.monotonic() + self.grace_seconds
        while any(s.pid for s in self.slots) and time.monotonic() < deadline:
            self._reap()
            self._pause(0.05)  # probes answer "stopping" meanwhile
        for slot in self.slots:
            if slot.pid:
                log.warning("worker did not stop in time; killing", stage=slot.stage, pid=slot.pid)
                _signal(slot.pid, signal.SIGKILL)
        while any(s.pid for s in self.slots):
            self._reap()
            time.sleep(0.05)
        log.info("supervisor stopped", exit_code=self.exit_code)


def _signal(pid: int, signum: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signum)
