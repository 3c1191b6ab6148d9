"""The peers, installed on demand under build/peers/ and found there again on the next run.

pgqueuer goes into a virtualenv of its own (build/peers/venv), so that conveyor's .venv is not
changed; graphile-worker into an npm prefix (build/peers/node). A stamp names what was installed:
the same request is not installed twice. Without node or npm there is no graphile-worker: that is
said, and the benchmark goes on without it.

    python -m benchmarks.peers.install    install (or find) both, and say what there is
"""

from __future__ import annotations

import fcntl
import json
import shutil
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from benchmarks.harness import ROOT

PEERS = ROOT / "build" / "peers"
VENV = PEERS / "venv"
NODE_PREFIX = PEERS / "node"
PGQUEUER = "pgqueuer[asyncpg]>=1.6,<2"
# graphile-worker 0.18 needs Node 22.18 or later; 0.17 (local queue, batched completions) runs
# on Node 14 and later. The newest one the node here can run comes first.
GRAPHILE_NEWEST = ("graphile-worker@^0.18", (22, 18))
GRAPHILE_OLDER = ("graphile-worker@^0.17.3", "graphile-worker@^0.16")


@dataclass(frozen=True)
class Installed:
    python: Path  # the interpreter of the peers' virtualenv
    pgqueuer_version: str
    node: str | None  # the node executable, None when graphile-worker could not be had
    graphile_version: str | None
    graphile_missing: str = ""  # why there is no graphile-worker


def ensure() -> Installed:
    """Install what is missing (once; concurrent callers wait for each other)."""
    PEERS.mkdir(parents=True, exist_ok=True)
    with _locked(PEERS / ".install.lock"):
        python = _ensure_pgqueuer()
        node, graphile, missing = _ensure_graphile()
    return Installed(python, _pgqueuer_version(python), node, graphile, missing)


@contextmanager
def _locked(path: Path) -> Iterator[None]:
    with path.open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _ensure_pgqueuer() -> Path:
    python = VENV / "bin" / "python"
    stamp = VENV / ".installed"
    if python.exists() and stamp.exists() and stamp.read_text() == PGQUEUER:
        return python
    _say(f"installing {PGQUEUER} into {VENV.relative_to(ROOT)} ...")
    _run([sys.executable, "-m", "venv", "--clear", str(VENV)])
    _run([str(python), "-m", "pip", "install", "--quiet", "--disable-pip-version-check", PGQUEUER])
    stamp.write_text(PGQUEUER)
    return python


def _pgqueuer_version(python: Path) -> str:
    done = subprocess.run(
        [str(python), "-c", "import importlib.metadata as m; print(m.version('pgqueuer'))"],
        capture_output=True,
        text=True,
        check=True,
    )
    return done.stdout.strip()


def _ensure_graphile() -> tuple[str | None, str | None, str]:
    node, npm = shutil.which("node"), shutil.which("npm")
    if not node or not npm:
        return None, None, "node and npm are needed (Node.js 20 or later) and were not found"
    package = NODE_PREFIX / "node_modules" / "graphile-worker" / "package.json"
    stamp = NODE_PREFIX / ".installed"
    wanted = _graphile_specs(node)
    if package.exists() and stamp.exists() and stamp.read_text() in wanted:
        return node, json.loads(package.read_text())["version"], ""
    failures = []
    for spec in wanted:
        _say(f"installing {spec} into {NODE_PREFIX.relative_to(ROOT)} ...")
        done = subprocess.run(
            [npm, "install", "--prefix", str(NODE_PREFIX), "--no-audit", "--no-fund", spec],
            capture_output=True,
            text=True,
            check=False,
        )
        if done.returncode == 0 and package.exists():
            stamp.write_text(spec)
            return node, json.loads(package.read_text())["version"], ""
        failures.append(f"{spec}: {(done.stderr or done.stdout).strip()[-500:]}")
    return None, None, "npm could not install graphile-worker: " + "; ".join(failures)


def _graphile_specs(node: str) -> tuple[str, ...]:
    done = subprocess.run([node, "--version"], capture_output=True, text=True, check=True)
    major, minor = (int(part) for part in done.stdout.strip().lstrip("v").split(".")[:2])
    spec, needs = GRAPHILE_NEWEST
    return (spec, *GRAPHILE_OLDER) if (major, minor) >= needs else GRAPHILE_OLDER


def _run(command: list[str]) -> None:
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed: {(done.stderr or done.stdout)[-2000:]}")


def _say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def main() -> None:
    installed = ensure()
    print(f"pgqueuer {installed.pgqueuer_version} ({installed.python})")
    if installed.graphile_version:
        print(f"graphile-worker {installed.graphile_version} (node {installed.node})")
    else:
        print(f"graphile-worker: none, {installed.graphile_missing}")


if __name__ == "__main__":
    main()
