-- 007: the wake-up hands the run to the waiting worker at commit.
-- @schema@ is replaced by the quoted, validated schema name when the migration is applied.

-- A waiting worker used to be woken and then claim: one more round trip to a backend that had
-- been idle, which was most of the time from commit to handler start. Now, when a run becomes
-- claimable and one of its stage's workers is waiting, the commit itself leases the run to that
-- worker (as its claim would: working status, lease, attempt + 1) and sends it the run in the
-- notification, so its handler starts as soon as the notification arrives.
--
-- An idle waiting worker says how many runs it can take (`free_slots`; a worker with runs in
-- flight says none, and claims what comes as a batch); each hand-off takes one, and
-- the last one takes the worker off the waiting list (it claims, and waits again, once it has
-- room). The row is locked with SKIP LOCKED, so concurrent commits never queue behind each
-- other: one that finds it locked wakes the worker instead, as before. These are woken as
-- before too: runs that must run alone (rescued), runs not yet due, runs too big for a
-- notification (8000 bytes), every run after the first that a transaction makes claimable (a
-- batch is claimed as a batch), transactions above READ COMMITTED (a locked registry row could
-- make them fail to serialize), and workers that do not take hand-offs (registered without a
-- working status: older versions during a rolling upgrade). A worker gives back a hand-off it
-- cannot take, and releases the runs leased to it that it never heard of (its listener was
-- away) once it is back.

ALTER TABLE @schema@.workers
    ADD COLUMN working text,          -- the stage's working status; NULL: no hand-offs
    ADD COLUMN lease_seconds float8,  -- the lease a hand-off gives
    ADD COLUMN free_slots integer;    -- how many more runs may be handed to it

-- Runs with the rights of the schema's owner: whoever inserts a run needs no privilege on the
-- registry, nor UPDATE on pipeline_runs.
CREATE FUNCTION @schema@.hand_off(handed_id uuid, handed_pipeline text, handed_status text,
                                  ready_at timestamptz) RETURNS boolean
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    waiter record;
    handed record;
    left_free integer;
BEGIN
    SELECT w.worker_id, w.channel, w.working, w.lease_seconds INTO waiter
      FROM @schema@.workers w
     WHERE w.waiting AND w.pipeline = handed_pipeline AND w.consumes = handed_status
       AND w.expires_at > now() AND w.working IS NOT NULL AND w.free_slots > 0
     LIMIT 1
       FOR UPDATE SKIP LOCKED;
    IF waiter.worker_id IS NULL THEN
        RETURN false;
    END IF;
    UPDATE @schema@.pipeline_runs r
       SET status = waiter.working,
           lease_owner = waiter.worker_id,
           lease_expires_at = now() + make_interval(secs => waiter.lease_seconds),
           attempt = r.attempt + 1,
           updated_at = now()
     WHERE r.id = handed_id AND r.status = handed_status AND r.lease_owner IS NULL
       AND r.finished_at IS NULL AND r.rescues = 0 AND r.run_after <= now()
       AND octet_length(r.input::text) + octet_length(r.outputs::text) <= 7000
    RETURNING r.id, r.attempt, r.input, r.outputs INTO handed;
    IF handed.id IS NULL THEN
        RETURN false;
    END IF;
    UPDATE @schema@.workers
       SET free_slots = free_slots - 1, waiting = free_slots > 1
     WHERE worker_id = waiter.worker_id
    RETURNING free_slots INTO left_free;
    PERFORM pg_notify(waiter.channel, 'run:' || json_build_object(
        'worker', waiter.worker_id, 'free', left_free, 'id', handed.id, 'attempt', handed.attempt,
        'waited', extract(epoch FROM clock_timestamp() - ready_at),
        'input', handed.input, 'outputs', handed.outputs)::text);
    RETURN true;
END
$$;

CREATE OR REPLACE FUNCTION @schema@.wake_waiting_workers() RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
    waiting_channel text;
BEGIN
    IF NEW.finished_at IS NOT NULL THEN
        RETURN NULL;
    END IF;
    SELECT w.channel INTO waiting_channel
      FROM @schema@.workers w
     WHERE w.waiting AND w.pipeline = NEW.pipeline AND w.consumes = NEW.status
       AND w.expires_at > now()
     LIMIT 1;
    IF waiting_channel IS NULL THEN
        RETURN NULL;  -- nobody waits: under load, the commit pays nothing more
    END IF;
    -- One hand-off per transaction: a batch that moves many runs wakes the next stage, whose
    -- worker claims the rest as a batch (handing each one over would write every run twice).
    IF NEW.rescues = 0 AND NEW.run_after <= now()
       AND current_setting('transaction_isolation') = 'read committed'
       AND current_setting('conveyor.handed_off', true) IS DISTINCT FROM 'on' THEN
        IF @schema@.hand_off(NEW.id, NEW.pipeline, NEW.status,
                             greatest(NEW.run_after, NEW.updated_at)) THEN
            PERFORM set_config('conveyor.handed_off', 'on', true);
            RETURN NULL;
        END IF;
    END IF;
    PERFORM pg_notify(waiting_channel, '');
    RETURN NULL;
END
$$;
