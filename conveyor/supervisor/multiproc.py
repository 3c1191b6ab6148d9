"""PROMETHEUS_MULTIPROC_DIR: prepared before prometheus_client is imported anywhere."""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

from conveyor.settings import ConfigError


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
    if not os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        return
    from prometheus_client import multiprocess

    multiprocess.mark_process_dead(pid)  # type: ignore[no-untyped-call]
