"""PROMETHEUS_MULTIPROC_DIR: set before prometheus_client is imported anywhere.

prometheus_client picks its storage when it is first imported, and a pipeline's own modules may
import it early, so when the variable is missing `conveyor run` makes a private directory and
re-executes itself with the variable set: the new process starts as if the operator had set it.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
from pathlib import Path

from conveyor.settings import ConfigError

_OWNED = "CONVEYOR_OWNS_METRICS_DIR"  # we made the directory, so we remove it at exit


def prepare_metrics_dir() -> Path:
    """Check the operator's directory (writable) and empty it: files of a previous run would be
    summed into this one's. Without one, make a private one and re-execute (does not return)."""
    configured = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    if not configured:
        private = tempfile.mkdtemp(prefix="conveyor-metrics-")
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = private
        os.environ[_OWNED] = "1"
        os.execv(sys.executable, [sys.executable, "-m", "conveyor", *sys.argv[1:]])
    path = Path(configured)
    if not path.is_dir() or not os.access(path, os.W_OK):
        raise ConfigError(
            "PROMETHEUS_MULTIPROC_DIR", configured, "expected an existing writable directory"
        )
    for stale in path.glob("*.db"):
        stale.unlink()
    return path


def remove_owned_metrics_dir() -> None:
    if os.environ.get(_OWNED) == "1" and os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        shutil.rmtree(os.environ["PROMETHEUS_MULTIPROC_DIR"], ignore_errors=True)


def mark_dead(pid: int) -> None:
    """A reaped child's live gauges must stop counting (its counters stay in the sums)."""
    if not os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        return
    from prometheus_client import multiprocess

    multiprocess.mark_process_dead(pid)  # type: ignore[no-untyped-call]
