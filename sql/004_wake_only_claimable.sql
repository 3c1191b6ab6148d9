-- 004: the wake-up trigger is queued only for rows that become claimable.
-- @schema@ is replaced by the quoted, validated schema name when the migration is applied.

-- A claimed run carries a lease and a finished run a finished_at: neither can wake a worker
-- (every statement that moves a run to a stage's input status clears its lease). A constraint
-- trigger's WHEN clause is evaluated when the row changes, not at commit, so a claim or a
-- terminal completion no longer queues a deferred trigger event per row, nor runs the function
-- for it at commit. The pure-SQL protocol at batch 50 (python -m benchmarks.ceiling, observer
-- off) moved ~20% more rows per second on one stage, ~9% on three.
DROP TRIGGER wake_waiting_workers ON @schema@.pipeline_runs;

CREATE CONSTRAINT TRIGGER wake_waiting_workers
    AFTER INSERT OR UPDATE OF status ON @schema@.pipeline_runs
    DEFERRABLE INITIALLY DEFERRED
    FOR EACH ROW WHEN (NEW.finished_at IS NULL AND NEW.lease_owner IS NULL)
    EXECUTE FUNCTION @schema@.wake_waiting_workers();
