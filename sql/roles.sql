-- Optional least-privilege roles, applied by `conveyor migrate --roles` (the schema name is
-- substituted for @schema@). Roles are cluster-wide and NOLOGIN: grant them to login users.
--
--   conveyor_worker  what `conveyor run`/`worker` need: read and move runs, write history and
--                    memory, keep the worker registry. No DDL: it cannot create, alter or drop.
--   conveyor_reader  read-only: dashboards, the KEDA scaler, `conveyor status`/`show`.
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

GRANT INSERT, UPDATE, DELETE ON @schema@.pipeline_runs, @schema@.workers TO conveyor_worker;
GRANT INSERT, DELETE ON @schema@.run_events TO conveyor_worker;
GRANT INSERT, UPDATE, DELETE ON @schema@.memory TO conveyor_worker;
GRANT USAGE ON ALL SEQUENCES IN SCHEMA @schema@ TO conveyor_worker;
