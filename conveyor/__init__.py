"""conveyor: multi-stage pipelines on PostgreSQL."""

from conveyor.pipeline import (
    Backoff,
    PermanentError,
    Pipeline,
    PipelineError,
    Run,
    Stage,
    Write,
)
from conveyor.runs import SubmitError, Submitted, submit

__all__ = [
    "Backoff",
    "PermanentError",
    "Pipeline",
    "PipelineError",
    "Run",
    "Stage",
    "SubmitError",
    "Submitted",
    "Write",
    "submit",
]
__version__ = "0.1.0"
