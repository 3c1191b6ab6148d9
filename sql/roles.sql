-- Optional least-privilege roles, applied by `conveyor migrate --roles` (the schema name is
-- substituted for @schema@). Roles are cluster-wide and NOLOGIN: grant them to login users.
--
--   conveyor_worker  what `conveyor run`/`worker` need: read and move runs, append history,
--                    write memory, keep the worker registry, prune finished runs through
--                    prune_finished() and analyze a grown pipeline_runs through
--                    analyze_runs_if_grown(). No DDL, no DELETE of runs or history.
--   conveyor_reader  read-only: dashboards, the KEDA scaler, `conveyor status`/`show`. It can
--                    execute no conveyor function (none is granted to PUBLIC that changes data).
--
-- Example:  CREATE ROLE app_worker LOGIN PASSWORD '...' IN ROLE conveyor_worker;
-- Migrations themselves run as the schema's owner, not as either role.

DO $$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'conveyor_worker') THEN
        CREATE ROLE conveyor_worker NOLOGIN;
    END IF;
    IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'conveyor_reader') THEN
        CREATE ROLE conveyor_reader NOLOGIN;
    END IF;
END
$$;

GRANT USAGE ON SCHEMA @schema@ TO conveyor_worker, conveyor_reader;
GRANT SELECT ON ALL TABLES IN SCHEMA @schema@ TO conveyor_worker, conveyor_reader;

-- History is append-only for workers: runs and their events leave only through the bounded
-- retention function (prune_finished), never by a DELETE of the worker's own.
REVOKE DELETE ON @schema@.pipeline_runs, @schema@.run_events FROM conveyor_worker;
REVOKE UPDATE, TRUNCATE ON @schema@.run_events FROM conveyor_worker;
GRANT INSERT, UPDATE ON @schema@.pipeline_runs TO conveyor_worker;
GRANT INSERT ON @schema@.run_events TO conveyor_worker;
GRANT INSERT, UPDATE, DELETE ON @schema@.memory TO conveyor_worker;
GRANT USAGE ON ALL SEQUENCES IN SCHEMA @schema@ TO conveyor_worker;
GRANT EXECUTE ON FUNCTION @schema@.prune_finished(float8, text) TO conveyor_worker;
-- ANALYZE of pipeline_runs once it has grown (the leader's tick), through its owner's rights
GRANT EXECUTE ON FUNCTION @schema@.analyze_runs_if_grown(float8) TO conveyor_worker;

-- Flow control: workers declare limits, take from them and close them; readers only see them.
GRANT INSERT, UPDATE ON @schema@.limits, @schema@.limit_stages TO conveyor_worker;
-- limit_places: kept by limit_room, cleared by the triggers of migration 016
GRANT INSERT, UPDATE, DELETE ON @schema@.limit_places TO conveyor_worker;
GRANT EXECUTE ON FUNCTION @schema@.limit_room(text[], integer),
                          @schema@.limit_take(text[], integer, float8),
                          @schema@.limit_acquire(text, integer, float8),
                          @schema@.limit_settle(text, float8, boolean),
                          @schema@.limit_close(text, timestamptz, text) TO conveyor_worker;

-- The registry's hand-off secrets are for the database alone: no role reads that column, and a
-- worker writes it only with its own row. Everything else in the registry stays readable.
REVOKE SELECT, UPDATE ON @schema@.workers FROM conveyor_worker, conveyor_reader;
GRANT SELECT (worker_id, pipeline, stage, consumes, channel, hostname, pid, started_at,
              heartbeat_at, expires_at, waiting, working, lease_seconds, free_slots)
   ON @schema@.workers TO conveyor_worker, conveyor_reader;
GRANT UPDATE (pipeline, stage, consumes, channel, hostname, pid, heartbeat_at, expires_at,
              waiting, working, lease_seconds, free_slots)
   ON @schema@.workers TO conveyor_worker;
GRANT INSERT, DELETE ON @schema@.workers TO conveyor_worker;
