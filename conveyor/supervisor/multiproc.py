"""PROMETHEUS_MULTIPROC_DIR: prepared before prometheus_client is imported anywhere."""

from __future__ import annotations

import contextlib
import glob
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

from conveyor.settings import ConfigError

# A metric file starts with its used size (4 bytes) and 4 of padding; a reader needs them.
_HEADER_BYTES = 8


def prepare_metrics_dir() -> Path:
    """Use the operator's directory (checked writable, emptied: files of a previous run would
    be summed into this one's), or make a private one. Must run before prometheus_client loads."""
    configured = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    if configured:
        path = Path(configured)
        if not path.is_dir() or not os.access(path, os.W_OK):
            raise ConfigError(
                "PROMETHEUS_MULTIPROC_DIR", configured, "expected an existing writable directory"
            )
        for stale in path.glob("*.db"):
            stale.unlink()
        return path
    if "prometheus_client" in sys.modules:
        raise RuntimeError("prometheus_client was imported before the metrics dir was set up")
    path = Path(tempfile.mkdtemp(prefix="conveyor-metrics-"))
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(path)
    return path


def mark_dead(pid: int) -> None:
    """A reaped child's live gauges must stop counting (its counters stay in the sums)."""
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
