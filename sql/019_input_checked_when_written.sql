-- 019: a run's input is checked to be a JSON object when it is written, not at every update.
-- PostgreSQL evaluates every CHECK constraint of a table on every UPDATE, whatever columns it
-- sets, and jsonb_typeof(input) reads the whole input: a claim, a completion and a heartbeat
-- each read every run's input back from TOAST just to check it again. Measured on the 2-core
-- machine, an UPDATE of 50 runs with 20 kB inputs took 0.52 ms with the constraint and 0.17 ms
-- without. Two triggers do the same check only when the input is written, with the same
-- SQLSTATE (23514, check_violation) and the constraint's name:
-- - BEFORE INSERT (the table has a BEFORE INSERT row trigger already, child_added: an insert
--   pays nothing more);
-- - AFTER UPDATE OF input: a BEFORE UPDATE row trigger would have every update of the table
--   lock its row first, and write a WAL record for the lock, whatever columns it sets.
-- A NULL input still fails on the column's NOT NULL (23502).
-- The constraint is dropped first: its ACCESS EXCLUSIVE lock is the strongest this migration
-- takes, and taking a weaker one on the table before it could deadlock with a transaction that
-- reads the table and then writes it. No table rewrite.

ALTER TABLE @schema@.pipeline_runs DROP CONSTRAINT pipeline_runs_input_is_object;

CREATE FUNCTION @schema@.refuse_input_not_object() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'run input must be a JSON object, not %', pg_catalog.jsonb_typeof(NEW.input)
        USING ERRCODE = 'check_violation',
              CONSTRAINT = 'pipeline_runs_input_is_object',
              TABLE = TG_TABLE_NAME,
              SCHEMA = TG_TABLE_SCHEMA;
END
$$;

CREATE TRIGGER pipeline_runs_input_is_object
    BEFORE INSERT ON @schema@.pipeline_runs
    FOR EACH ROW
    WHEN (pg_catalog.jsonb_typeof(NEW.input) OPERATOR(pg_catalog.<>) 'object')
    EXECUTE FUNCTION @schema@.refuse_input_not_object();

CREATE TRIGGER pipeline_runs_input_is_object_updated
    AFTER UPDATE OF input ON @schema@.pipeline_runs
    FOR EACH ROW
    WHEN (pg_catalog.jsonb_typeof(NEW.input) OPERATOR(pg_catalog.<>) 'object')
    EXECUTE FUNCTION @schema@.refuse_input_not_object();
