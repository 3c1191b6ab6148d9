"""PROMETHEUS_MULTIPROC_DIR: set before prometheus_client is imported anywhere.

prometheus_client picks its storage when it is first imported, and a pipeline's own modules may
import it early, so when the variable is missing `conveyor run` makes a private directory and
re-executes itself with the variable set: the new process starts as if the operator had set it.
"""

from __future__ import annotations

import contextlib
import glob
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

from conveyor.settings import ConfigError

_OWNED = "CONVEYOR_OWNS_METRICS_DIR"  # we made the directory, so we remove it at exit
# A metric file starts with its used size (4 bytes) and 4 of padding; a reader needs them.
_HEADER_BYTES = 8


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


def collect_all(registry: object) -> None:
    """Register the collector of every process's metric files on a fresh registry."""
    from prometheus_client.multiprocess import MultiProcessCollector

    class SettledFiles(MultiProcessCollector):  # type: ignore[misc]
        """Skips a file a starting process has created but not sized yet: read at that instant
        it fails the whole scrape. Its metrics are in the next scrape."""

        def collect(self) -> Any:
            files = []
            for path in glob.glob(os.path.join(self._path, "*.db")):
                with contextlib.suppress(FileNotFoundError):  # a dead process's live gauges
                    if os.path.getsize(path) >= _HEADER_BYTES:
                        files.append(path)
            return self.merge(files, accumulate=True)  # type: ignore[no-untyped-call]

    SettledFiles(registry)  # type: ignore[no-untyped-call]
