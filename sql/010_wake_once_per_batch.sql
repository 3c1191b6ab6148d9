-- 010: the wake-up trigger does its work once per transaction and stage, not once per run.
-- @schema@ is replaced by the quoted, validated schema name when the migration is applied.

-- The trigger is a deferred row trigger: at commit it ran once for every run the transaction
-- made claimable, and each time looked for a waiting worker in the registry, a query. For a
-- batch that moves 50 runs to the next stage that was ~0.6 ms more commit, ~0.25 ms now
-- (measured on the 2-core machine); for a bulk submission, a query per submitted run. What the
-- first run of a stage finds holds for the rest of the batch: nobody waits (the runs are
-- claimed as a batch once a worker is back, and the sweep bounds the wait), or the worker was
-- woken, or one run was handed over (one hand-off per transaction, as before), and then the
-- next run sends the plain wake-up for the rest. The transaction remembers the stage it last
-- dealt with in `conveyor.woken` (pipeline and status; transaction-local, like
-- `conveyor.handed_off`), and later runs of that stage return at once. A run of another stage
-- in the same transaction (a failure going back while successes move on) takes the full path,
-- as before. A single-run transaction pays the same as before (8-client ingest, versions
-- alternated every 2 s: 0.883 of the trigger-off rate, 0.874 without the memo). Like the
-- functions of 009, it calls pg_notify and set_config as expressions, not with PERFORM.

CREATE OR REPLACE FUNCTION @schema@.wake_waiting_workers() RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
    -- which stage this run waits for, without ambiguity whatever the names contain
    stage_key text := length(NEW.pipeline) || ':' || NEW.pipeline || NEW.status;
    waiting_channel text;
    sent text;
BEGIN
    IF NEW.finished_at IS NOT NULL
       OR current_setting('conveyor.woken', true) IS NOT DISTINCT FROM stage_key THEN
        RETURN NULL;
    END IF;
    SELECT w.channel INTO waiting_channel
      FROM @schema@.workers w
     WHERE w.waiting AND w.pipeline = NEW.pipeline AND w.consumes = NEW.status
       AND w.expires_at > now()
     LIMIT 1;
    IF waiting_channel IS NULL THEN
        -- nobody waits: under load, the commit pays nothing more for this stage
        sent := set_config('conveyor.woken', stage_key, true);
        RETURN NULL;
    END IF;
    -- One hand-off per transaction: a batch that moves many runs wakes the next stage, whose
    -- worker claims the rest as a batch (handing each one over would write every run twice).
    IF NEW.rescues = 0 AND NEW.run_after <= now()
       AND current_setting('transaction_isolation') = 'read committed'
       AND current_setting('conveyor.handed_off', true) IS DISTINCT FROM 'on' THEN
        IF @schema@.hand_off(NEW.id, NEW.pipeline, NEW.status,
                             greatest(NEW.run_after, NEW.updated_at)) THEN
            sent := set_config('conveyor.handed_off', 'on', true);
            RETURN NULL;  -- the next run of the batch, if any, wakes a worker for the rest
        END IF;
    END IF;
    sent := pg_notify(waiting_channel, '');
    sent := set_config('conveyor.woken', stage_key, true);
    RETURN NULL;
END
$$;
