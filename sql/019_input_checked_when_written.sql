-- 019: a run's input is checked to be a JSON object when it is written, not at every update.
-- PostgreSQL evaluates every CHECK constraint of a table on every UPDATE, whatever columns it
-- sets, and jsonb_typeof(input) reads the whole input: a claim, a completion and a heartbeat
-- each read every run's input back from TOAST just to check it again. Measured on the 2-core
-- machine, an UPDATE of 50 runs with 20 kB inputs took 0.52 ms with the constraint and 0.17 ms
-- without. A trigger on INSERT and on UPDATE OF input does the same check only when the input
-- is written, with the same SQLSTATE (23514, check_violation) and the constraint's name.
-- No table rewrite: the constraint is dropped and the trigger created, both instantly.

CREATE FUNCTION @schema@.refuse_input_not_object() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'run input must be a JSON object, not %',
                    coalesce(pg_catalog.jsonb_typeof(NEW.input), 'null')
        USING ERRCODE = 'check_violation',
              CONSTRAINT = 'pipeline_runs_input_is_object',
              TABLE = TG_TABLE_NAME,
              SCHEMA = TG_TABLE_SCHEMA;
END
$$;

CREATE TRIGGER pipeline_runs_input_is_object
    BEFORE INSERT OR UPDATE OF input ON @schema@.pipeline_runs
    FOR EACH ROW
    WHEN (pg_catalog.jsonb_typeof(NEW.input) IS DISTINCT FROM 'object')
    EXECUTE FUNCTION @schema@.refuse_input_not_object();

ALTER TABLE @schema@.pipeline_runs DROP CONSTRAINT pipeline_runs_input_is_object;
