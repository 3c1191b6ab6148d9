-- 021: the console lists runs by id, and pipeline_runs_created goes. Every move of a run
-- writes a new version of its row that no index may skip (its status, a key of the claim
-- index, changes), so each index of the table gets a new entry at every claim and every
-- completion. The entries of (created_at, id) land among the old versions' entries of the
-- same runs, deep inside the index, where they split pages: on the 2-core machine they cost
-- a one-stage drain ~5 us of backend CPU per run, a tenth of its rate. Run ids are
-- time-ordered (uuid_v7), so the primary key already holds the runs newest last; the runs
-- list and the overview's latest runs read it instead (sql/queries.sql, console_runs).
DROP INDEX @schema@.pipeline_runs_created;
