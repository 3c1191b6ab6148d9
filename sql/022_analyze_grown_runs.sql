-- 022: the maintenance leader analyzes pipeline_runs once it holds more than twice the runs
-- PostgreSQL last counted in it. A worker keeps one plan per statement (prepared, then generic),
-- made with what the planner knew of the table at the time. Planned on a table of a few runs,
-- the completion finds its runs by reading the whole table; as the table grows under load,
-- every completion reads all of it, the queue falls behind, and the backlog makes the table
-- grow faster still, until autovacuum analyzes it (its first visit can be a minute away:
-- autovacuum_naptime), which makes every session plan again. The leader looks at every tick.
-- SKIP_LOCKED: a vacuum or analyze under way is not waited for (the leader's rescues would wait
-- with it), nor cancelled; the next tick looks again. True only when the table was analyzed.
-- SECURITY DEFINER: ANALYZE needs the table's owner (or MAINTAIN), which conveyor_worker is not.
CREATE FUNCTION @schema@.analyze_runs_if_grown(least_rows float8)
RETURNS boolean
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    counted float8;
    live float8;
BEGIN
    SELECT c.reltuples, pg_stat_get_live_tuples(c.oid) INTO counted, live
      FROM pg_class c
     WHERE c.oid = '@schema@.pipeline_runs'::regclass;
    IF live <= 2 * greatest(counted, least_rows) THEN
        RETURN false;
    END IF;
    ANALYZE (SKIP_LOCKED) @schema@.pipeline_runs;
    RETURN (SELECT c.reltuples IS DISTINCT FROM counted
              FROM pg_class c
             WHERE c.oid = '@schema@.pipeline_runs'::regclass);
END
$$;
REVOKE ALL ON FUNCTION @schema@.analyze_runs_if_grown(float8) FROM PUBLIC;
