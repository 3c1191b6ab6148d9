-- 017: autovacuum keeps pace with the queue. Every move of a run between stages writes a new
-- version of its row (and of its index entries: the claim index's key changes), and retention
-- deletes finished runs and their events as fast as they arrive: with the defaults, autovacuum
-- waits for a fifth of a table to be dead, lets the heap and its indexes swell between visits,
-- and, when the heap's last pages come free, takes the table's exclusive lock to cut them off,
-- which stops every claim and completion while it lasts. Both tables are vacuumed once 2% of
-- them is dead (or newly inserted), and keep their length.
ALTER TABLE @schema@.pipeline_runs SET (
    autovacuum_vacuum_scale_factor = 0.02,
    autovacuum_vacuum_insert_scale_factor = 0.02,
    autovacuum_analyze_scale_factor = 0.02,
    vacuum_truncate = false
);

ALTER TABLE @schema@.run_events SET (
    autovacuum_vacuum_scale_factor = 0.02,
    autovacuum_vacuum_insert_scale_factor = 0.02,
    autovacuum_analyze_scale_factor = 0.02,
    vacuum_truncate = false
);
