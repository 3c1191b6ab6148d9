"""conveyor: multi-stage pipelines on PostgreSQL.

The public API, all a pipeline needs (nothing else in the package is promised to stay):

- Pipeline, Stage, Backoff: declare a pipeline (named by import path in CONVEYOR_PIPELINE);
  `Pipeline(text_input=...)` says what `conveyor submit TEXT` inserts (TextInput).
- Run: what a handler receives; `Run.write` hands a statement over to commit with the output,
  `Run.record_usage` says what an outside call used (a Usage, kept on the run's event).
- PermanentError: raised by a handler, fails the run at once, without retries.
- Route: returned by a handler to send its run to another status its stage declares
  (Stage(routes=...)), an earlier stage's too, a loop bounded by Stage(max_visits=...).
- FanOut, Child: returned by a handler to create child runs (Stage(fan_out=...)); the run
  waits until they have all finished, and the stage that joins them sees them as Run.children.
- Limit, Throttled, Reservation, BudgetExceeded: flow control shared by every worker
  (Stage(limits=...), Run.acquire, Run.close_limit, Run.check_budget); Throttled sends a run
  back to wait, its attempt not counted; BudgetExceeded fails it at once.
- PipelineError: a declaration that cannot run.
- submit, Submitted, SubmitError: start a run from Python (the same as the plain SQL insert).
- Database: where the workers' database is, for a handler's own reads.
- ConfigError, EnvReader: read a pipeline's own CONVEYOR_* variables as the engine reads its
  settings (a bad value names its variable and stops `conveyor run` with exit code 2).
"""

from conveyor.environment import Database
from conveyor.fan_out import Child, FanOut
from conveyor.handler_run import Run, Usage, Write
from conveyor.limits import BudgetExceeded, Limit, Reservation, Throttled
from conveyor.pipeline import (
    Backoff,
    PermanentError,
    Pipeline,
    PipelineError,
    Stage,
    TextInput,
)
from conveyor.routes import Route
from conveyor.runs import SubmitError, Submitted, submit
from conveyor.settings import ConfigError, EnvReader

__all__ = [
    "Backoff",
    "BudgetExceeded",
    "Child",
    "ConfigError",
    "Database",
    "EnvReader",
    "FanOut",
    "Limit",
    "PermanentError",
    "Pipeline",
    "PipelineError",
    "Reservation",
    "Route",
    "Run",
    "Stage",
    "SubmitError",
    "Submitted",
    "TextInput",
    "Throttled",
    "Usage",
    "Write",
    "submit",
]
__version__ = "0.1.0"
