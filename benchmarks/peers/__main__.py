"""conveyor beside pgqueuer and graphile-worker on one PostgreSQL server (`make bench-peers`).

    python -m benchmarks.peers [--rounds N] [--figure 1|2|3]... [--peer NAME]... [--tiny]

(1) one stage: no-op jobs/s drained from a backlog by one worker process, started afresh on the
    backlog each round (conveyor: benchmarks.throughput --single, observer channel on and off,
    with (a)'s claims of 50 runs and with claims of 500, docs/performance.md's setting for short
    handlers; graphile-worker runs with a local queue of 500);
(2) enqueue -> handler start with an idle worker, p50/p99, from sending the enqueue (its commit
    included) (conveyor: benchmarks.latency, "from sending the INSERT"), of every round's jobs
    pooled: a 99th percentile of one round's 200 jobs is its second-slowest, which a disk
    flush that stalls once decides;
(3) three stages, runs/s, each peer chained as its users chain jobs (conveyor: benchmarks.throughput
    --three, a process per stage under the supervisor);
(4) CPU per job of (1) and per run of (3): the worker processes' and their database backends'.

Rounds are interleaved (conveyor, pgqueuer, graphile-worker, conveyor, ...) and each rate is
the best of the rounds; (2) pools the rounds' jobs. Each side has its own scratch database on the
same server, dropped at the end; every process started is stopped. The peers are installed on
first use under build/peers/ (see install.py); without node there is no graphile-worker, which is
said, and the rest measured.
How the peers are measured: measure.py; how they are configured: systems.py.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from contextlib import ExitStack
from pathlib import Path
from typing import TypeVar

from benchmarks import latency, throughput
from benchmarks.harness import BenchDatabase, Scale
from benchmarks.latency import Latency
from benchmarks.peers import install, measure, systems
from benchmarks.peers.measure import PeerRate
from benchmarks.peers.systems import Peer
from benchmarks.report import ratio

T = TypeVar("T")
CONVEYOR = "conveyor"
ON, OFF = "conveyor, batch 50, observer on", "conveyor, batch 50, observer off"
WIDE = 500  # claims of up to 500 runs, 1,000 slots: the setting for short handlers
WIDE_ON, WIDE_OFF = f"conveyor, batch {WIDE}, observer on", f"conveyor, batch {WIDE}, observer off"
SINGLE_CMD = f"{throughput.COMMAND} --single"
WIDE_CMD = f"{SINGLE_CMD} --batch {WIDE}"
# First guesses at each side's rate, to size its first backlog; then its best rate so far.
GUESS_JOBS = {"pgqueuer": 4_000.0, "graphile-worker": 15_000.0}
GUESS_RUNS = {"pgqueuer": 200.0, "graphile-worker": 200.0}
_STARTED = time.monotonic()
_DRY_RETRIES = 2  # a peer's backlog queued again at most this many times, each 4x as large


def progress(what: str) -> None:
    print(f"[{time.monotonic() - _STARTED:5.0f} s] {what} ...", file=sys.stderr, flush=True)


def keep(best: dict[str, T], key: str, value: T, better: Callable[[T, T], bool]) -> None:
    if key not in best or better(value, best[key]):
        best[key] = value


def faster(a: PeerRate, b: PeerRate) -> bool:
    return a.per_second > b.per_second


def as_rate(result: throughput.Throughput) -> PeerRate:
    return PeerRate(result.runs_per_second, result.cpu_us_per_run, result.db_cpu_us_per_run)


class Comparison:
    """The interleaved rounds: the best rate of each side, and its pooled waits."""

    def __init__(self, scale: Scale, figures: set[int], peers: list[Peer]) -> None:
        self.scale, self.figures, self.peers = scale, figures, peers
        self.single: dict[str, PeerRate] = {}
        self.three: dict[str, PeerRate] = {}
        # (2): every round's seconds from commit and from submit, pooled per side
        self.waits: dict[str, tuple[list[float], list[float]]] = {}

    def run(self, rounds: int) -> None:
        with ExitStack() as stack:
            ours = stack.enter_context(BenchDatabase.create())
            theirs: dict[str, BenchDatabase] = {}
            for peer in self.peers:
                if peer.name not in theirs:
                    theirs[peer.name] = stack.enter_context(BenchDatabase.create())
                    measure.install(peer, theirs[peer.name])
            for number in range(1, rounds + 1):
                self.round(number, rounds, ours, theirs)

    def round(
        self, number: int, rounds: int, ours: BenchDatabase, theirs: dict[str, BenchDatabase]
    ) -> None:
        scale = self.scale
        if 1 in self.figures:
            progress(f"round {number}/{rounds}: (1) one stage")
            keep(self.single, ON, as_rate(throughput.single(ours, scale)), faster)
            keep(self.single, OFF, as_rate(throughput.single(ours, scale, observer=False)), faster)
            wide_on = throughput.single(ours, scale, batch=WIDE)
            keep(self.single, WIDE_ON, as_rate(wide_on), faster)
            wide_off = throughput.single(ours, scale, observer=False, batch=WIDE)
            keep(self.single, WIDE_OFF, as_rate(wide_off), faster)
            for peer in self.peers:
                keep(self.single, peer.label, self._single(peer, theirs[peer.name]), faster)
        if 2 in self.figures:
            progress(f"round {number}/{rounds}: (2) enqueue -> handler start")
            self._pool(CONVEYOR, latency.commit_to_start_samples(ours, scale))
            for peer in self._latency_peers():
                self._pool(peer.label, measure.latency(peer, theirs[peer.name], scale))
        if 3 in self.figures:
            progress(f"round {number}/{rounds}: (3) three stages")
            keep(self.three, CONVEYOR, as_rate(throughput.three(ours, scale)), faster)
            for peer in self.peers:
                result = measure.three(peer, theirs[peer.name], self._runs(peer))
                keep(self.three, peer.label, result, faster)

    def _pool(self, side: str, samples: tuple[list[float], list[float]]) -> None:
        from_commit, from_submit = self.waits.setdefault(side, ([], []))
        from_commit += samples[0]
        from_submit += samples[1]

    def _latency_peers(self) -> list[Peer]:
        """One configuration of each peer: an idle worker's batch size does not matter."""
        seen: dict[str, Peer] = {}
        for peer in self.peers:
            seen.setdefault(peer.name, peer)
        return list(seen.values())

    def _single(self, peer: Peer, db: BenchDatabase) -> PeerRate:
        """(1) for a peer; a backlog that ran dry before the window ended (the peer is faster
        than its best rate so far says) is queued again, four times as large."""
        backlog = self._backlog(peer)
        for _ in range(_DRY_RETRIES):
            try:
                return measure.single(peer, db, self.scale, backlog)
            except measure.BacklogRanDry:
                backlog *= 4
                progress(f"{peer.label}: the backlog ran dry; again with {backlog:,} jobs")
        return measure.single(peer, db, self.scale, backlog)

    def _backlog(self, peer: Peer) -> int:
        """Twice what the peer drains in the warm-up and the window at its best rate so far."""
        known = self.single.get(peer.label)
        rate = max(known.per_second if known else 0.0, GUESS_JOBS[peer.name])
        return max(2000, int(2 * rate * (self.scale.warmup + self.scale.window)))

    def _runs(self, peer: Peer) -> int:
        """Runs that take about the warm-up and the window to drain at the best rate so far."""
        known = self.three.get(peer.label)
        rate = known.per_second if known else GUESS_RUNS[peer.name]
        return max(100, int(rate * (self.scale.warmup + self.scale.window)))

    def lines(self) -> list[str]:
        out: list[str] = []
        if 1 in self.figures:
            out += self._single_lines()
        if 2 in self.figures:
            out += self._latency_lines()
        if 3 in self.figures:
            out += self._three_lines()
        if 1 in self.figures:
            out += self._cpu_lines("(4) CPU per job, one stage", self.single, ON, 1)
        if 3 in self.figures:
            out += self._cpu_lines("(4) CPU per run, three stages", self.three, CONVEYOR, 3)
        return out

    def _single_lines(self) -> list[str]:
        title = "(1) one stage, no-op jobs, one worker process"
        on, off = self.single[ON], self.single[OFF]
        wide_on, wide_off = self.single[WIDE_ON], self.single[WIDE_OFF]
        out = [
            f"{title}: {ON}: {on.per_second:,.0f} jobs/s ({SINGLE_CMD})",
            f"{title}: {OFF}: {off.per_second:,.0f} jobs/s ({SINGLE_CMD} --observer-off)",
            f"{title}: {WIDE_ON}: {wide_on.per_second:,.0f} jobs/s ({WIDE_CMD})",
            f"{title}: {WIDE_OFF}: {wide_off.per_second:,.0f} jobs/s ({WIDE_CMD} --observer-off)",
        ]
        for peer in self.peers:
            theirs = self.single[peer.label].per_second
            out.append(
                f"{title}: {peer.label}: {theirs:,.0f} jobs/s; conveyor/{peer.name}"
                f" at batch 50 {ratio(on.per_second, theirs)} (observer on),"
                f" {ratio(off.per_second, theirs)} (observer off);"
                f" at batch {WIDE} {ratio(wide_on.per_second, theirs)} (observer on),"
                f" {ratio(wide_off.per_second, theirs)} (observer off)"
                f" ({systems.command(peer.name, 1)})"
            )
        return out

    def _latency_lines(self) -> list[str]:
        title = "(2) enqueue -> handler start, idle worker, the enqueue's commit included"
        ours = latency.summary(*self.waits[CONVEYOR])
        out = [f"{title}: {CONVEYOR}: {_latency(ours)} ({latency.COMMAND})"]
        for peer in self._latency_peers():
            theirs = latency.summary(*self.waits[peer.label])
            out.append(
                f"{title}: {peer.label}: {_latency(theirs)}; conveyor/{peer.name}"
                f" p50 {ratio(ours.submit_p50_ms, theirs.submit_p50_ms)},"
                f" p99 {ratio(ours.submit_p99_ms, theirs.submit_p99_ms)} (below 1: conveyor"
                f" starts sooner) ({systems.command(peer.name, 2)})"
            )
        return out

    def _three_lines(self) -> list[str]:
        title = "(3) three stages, no-op"
        ours = self.three[CONVEYOR]
        out = [
            f"{title}: conveyor, a worker process per stage: {ours.per_second:,.0f} runs/s"
            f" ({throughput.COMMAND} --three)"
        ]
        for peer in self.peers:
            theirs = self.three[peer.label].per_second
            out.append(
                f"{title}: {peer.label}, one worker process, each handler enqueues the next"
                f" job: {theirs:,.0f} runs/s; conveyor/{peer.name}"
                f" {ratio(ours.per_second, theirs)} ({systems.command(peer.name, 3)})"
            )
        return out

    def _cpu_lines(
        self, title: str, best: dict[str, PeerRate], ours: str, figure: int
    ) -> list[str]:
        conveyor = best[ours]
        command = SINGLE_CMD if figure == 1 else f"{throughput.COMMAND} --three"
        out = [f"{title}: {ours}: {_cpu(conveyor)} ({command})"]
        if figure == 1:
            out.append(f"{title}: {OFF}: {_cpu(best[OFF])} ({command} --observer-off)")
            out.append(f"{title}: {WIDE_ON}: {_cpu(best[WIDE_ON])} ({WIDE_CMD})")
            out.append(f"{title}: {WIDE_OFF}: {_cpu(best[WIDE_OFF])} ({WIDE_CMD} --observer-off)")
        for peer in self.peers:
            theirs = best[peer.label]
            versus = _cpu_ratios(conveyor, theirs)
            if figure == 1:
                versus = (
                    f"at batch 50 {versus}; at batch {WIDE} {_cpu_ratios(best[WIDE_ON], theirs)}"
                )
            out.append(
                f"{title}: {peer.label}: {_cpu(theirs)}; conveyor/{peer.name} {versus}"
                f" ({systems.command(peer.name, figure)})"
            )
        return out


def _cpu_ratios(ours: PeerRate, theirs: PeerRate) -> str:
    return (
        f"worker {ratio(ours.cpu_us, theirs.cpu_us)},"
        f" database {ratio(ours.db_cpu_us, theirs.db_cpu_us)}"
    )


def _latency(result: Latency) -> str:
    return (
        f"p50 {result.submit_p50_ms:.2f} ms, p99 {result.submit_p99_ms:.2f} ms"
        f" (from the commit's acknowledgement: {result.p50_ms:.2f} / {result.p99_ms:.2f};"
        f" {result.runs} jobs, every round's)"
    )


def _cpu(result: PeerRate) -> str:
    return f"worker {result.cpu_us:.0f} us, its database backends {result.db_cpu_us:.0f} us"


def load_average() -> str:
    return Path("/proc/loadavg").read_text().split()[0]


def configured(installed: install.Installed, names: set[str]) -> list[Peer]:
    peers: list[Peer] = []
    if "pgqueuer" in names:
        peers += [systems.pgqueuer(installed, batch) for batch in (10, 50)]
    if "graphile-worker" in names and installed.graphile_version:
        peers.append(systems.graphile(installed))
    return peers


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds, best of N")
    parser.add_argument("--figure", type=int, action="append", choices=(1, 2, 3))
    parser.add_argument("--peer", action="append", choices=("pgqueuer", "graphile-worker"))
    parser.add_argument("--tiny", action="store_true", help="a second or two per figure, one round")
    args = parser.parse_args()
    scale = Scale.small() if args.tiny else Scale()
    rounds = 1 if args.tiny else args.rounds
    names = set(args.peer or ("pgqueuer", "graphile-worker"))
    progress("the peers, installed under build/peers on first use")
    installed = install.ensure()
    missing = ""
    if "graphile-worker" in names and not installed.graphile_version:
        missing = f"graphile-worker: not measured: {installed.graphile_missing}"
        print(missing, file=sys.stderr, flush=True)
    comparison = Comparison(scale, set(args.figure or (1, 2, 3)), configured(installed, names))
    started, load_before = time.monotonic(), load_average()
    comparison.run(rounds)
    beside = sorted({f"{peer.name} {peer.version}" for peer in comparison.peers})
    print(
        f"conveyor beside {' and '.join(beside) or 'no peer'} on one PostgreSQL server:"
        f" {rounds} interleaved round(s) in"
        f" {time.monotonic() - started:.0f} s; load average {load_before} before,"
        f" {load_average()} after (2 cores, shared: figures measured while other work ran are low)"
    )
    if missing:
        print(missing)
    for line in comparison.lines():
        print(line)


if __name__ == "__main__":
    main()
