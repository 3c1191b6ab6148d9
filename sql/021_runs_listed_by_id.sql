-- 021: the console lists runs by id where the id tells when the run was made, and
-- pipeline_runs_created goes. Every move of a run writes a new version of its row that no
-- index may skip (its status, a key of the claim index, changes), so each index of the table
-- gets a new entry at every claim and every completion. The entries of (created_at, id) land
-- among the old versions' entries of the same runs, deep inside the index, where they split
-- pages: on the 2-core machine they cost a one-stage drain ~5 us of backend CPU per run, a
-- tenth of its rate.
-- Ids uuid_v7() makes (006) start with their creation time in milliseconds, so the primary
-- key holds those runs in creation order. The others (ids made before 006, or chosen by
-- whoever inserted the run, and any id claiming a time past 2200) are indexed by creation
-- time here, and only they: the predicate is false for every id uuid_v7() makes, so moving
-- such a run writes nothing in this index. console_runs (sql/queries.sql) reads both in one
-- order. The predicate is written the same way there, where the planner must match it.
DROP INDEX @schema@.pipeline_runs_created;

CREATE INDEX pipeline_runs_untimed_ids ON @schema@.pipeline_runs (created_at, id)
    WHERE NOT (get_byte(uuid_send(id), 6) >> 4 = 7
               AND id < '0699e991-a800-0000-0000-000000000000'::uuid);
