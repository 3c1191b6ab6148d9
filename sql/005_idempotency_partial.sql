-- 005: the idempotency key is indexed only where there is one.
-- @schema@ is replaced by the quoted, validated schema name when the migration is applied.

-- Every claim and every completion writes a new version of its row, and each version gets an
-- entry in every index of the table. Most runs have no idempotency key, yet the unique
-- constraint indexed (pipeline, NULL) for all of them: one index entry per run and stage spent
-- on nothing (about a tenth of the database's CPU per move, python -m benchmarks.throughput).
-- Uniqueness per pipeline is unchanged. An insert that names the conflict target says so:
--   INSERT ... ON CONFLICT (pipeline, idempotency_key) WHERE idempotency_key IS NOT NULL DO NOTHING
-- (ON CONFLICT DO NOTHING without a target needs no change).
ALTER TABLE @schema@.pipeline_runs DROP CONSTRAINT pipeline_runs_idempotency;

CREATE UNIQUE INDEX pipeline_runs_idempotency ON @schema@.pipeline_runs (pipeline, idempotency_key)
    WHERE idempotency_key IS NOT NULL;
