-- 014: routing. A stage may send a run to one of several statuses, back to an earlier stage
-- too; `visits` counts, per stage on such a loop, how many times the run has run it
-- ({"retrieve": 2}), so that a loop ends at the stage's max_visits. NULL for a run that has
-- been on no loop: a pipeline without loops never writes it.
ALTER TABLE @schema@.pipeline_runs ADD COLUMN visits jsonb;

COMMENT ON COLUMN @schema@.pipeline_runs.visits IS
    'Times the run has run each stage on a loop of its pipeline (docs/pipelines.md).';
