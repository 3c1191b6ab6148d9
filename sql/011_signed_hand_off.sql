-- 011: hand-offs signed for their worker; the registry bounded; functions owner-only.
-- @schema@ is replaced by the quoted, validated schema name when the migration is applied.
--
-- Any login may NOTIFY on any channel, and worker ids are visible to every login: a hand-off
-- is acted on only when it carries a signature made with the secret its worker keeps in its
-- registry row, which only conveyor's roles can read. The trigger functions run with their
-- owner's rights, so no caller needs (or gets) EXECUTE on hand_off, which refuses to run
-- outside the trigger. Registry values that would make a submitter's commit fail (an empty
-- or overlong channel, a lease PostgreSQL cannot add to now()) are refused when written.

-- Rows of processes that stopped long ago, or that would break the new bounds, go: a live
-- worker writes its row again at its next beat.
DELETE FROM @schema@.workers
 WHERE octet_length(channel) NOT BETWEEN 1 AND 63
    OR octet_length(worker_id) NOT BETWEEN 1 AND 100
    OR lease_seconds NOT BETWEEN 1 AND 604800
    OR free_slots NOT BETWEEN 0 AND 100000
    OR expires_at > heartbeat_at + interval '7 days';

ALTER TABLE @schema@.workers
    ADD COLUMN secret bytea,
    ADD CONSTRAINT workers_channel_length CHECK (octet_length(channel) BETWEEN 1 AND 63),
    ADD CONSTRAINT workers_id_length CHECK (octet_length(worker_id) BETWEEN 1 AND 100),
    ADD CONSTRAINT workers_lease_bounds CHECK (lease_seconds BETWEEN 1 AND 604800),
    ADD CONSTRAINT workers_free_slots_bounds CHECK (free_slots BETWEEN 0 AND 100000),
    ADD CONSTRAINT workers_expiry_bounds CHECK (expires_at <= heartbeat_at + interval '7 days'),
    ADD CONSTRAINT workers_secret_length CHECK (octet_length(secret) BETWEEN 16 AND 64);

COMMENT ON COLUMN @schema@.workers.secret IS
    'The key hand_off signs this worker''s hand-offs with; never readable by conveyor_reader.';

-- Leases a claimable run to a waiting worker at commit, and tells that worker alone, with a
-- notification `run:<worker>:<signature>:<json>` where the signature is the hex of
-- sha256(secret || sha256(secret || json)). Every name is qualified: it runs with its owner's
-- rights and the caller's search_path.
CREATE OR REPLACE FUNCTION @schema@.hand_off(handed_id uuid, handed_pipeline text,
                                             handed_status text, ready_at timestamptz)
RETURNS boolean
LANGUAGE plpgsql SECURITY DEFINER AS $$
DECLARE
    waiter record;
    handed record;
    left_free integer;
    body pg_catalog.text;
    sent pg_catalog.text;
BEGIN
    IF pg_catalog.pg_trigger_depth() OPERATOR(pg_catalog.<) 1 THEN
        RAISE EXCEPTION 'hand_off() runs only from the wake-up trigger';
    END IF;
    SELECT w.worker_id, w.channel, w.working, w.lease_seconds, w.secret INTO waiter
      FROM @schema@.workers w
     WHERE w.waiting
       AND w.pipeline OPERATOR(pg_catalog.=) handed_pipeline
       AND w.consumes OPERATOR(pg_catalog.=) handed_status
       AND w.expires_at OPERATOR(pg_catalog.>) pg_catalog.now()
       AND w.working IS NOT NULL
       AND w.secret IS NOT NULL
       AND w.free_slots OPERATOR(pg_catalog.>) 0
     LIMIT 1
       FOR UPDATE SKIP LOCKED;
    IF waiter.worker_id IS NULL THEN
        RETURN false;
    END IF;
    UPDATE @schema@.pipeline_runs r
       SET status = waiter.working,
           lease_owner = waiter.worker_id,
           lease_expires_at = pg_catalog.now() OPERATOR(pg_catalog.+)
                              pg_catalog.make_interval(secs => waiter.lease_seconds),
           attempt = r.attempt OPERATOR(pg_catalog.+) 1,
           updated_at = pg_catalog.now()
     WHERE r.id OPERATOR(pg_catalog.=) handed_id
       AND r.status OPERATOR(pg_catalog.=) handed_status
       AND r.lease_owner IS NULL AND r.finished_at IS NULL
       AND r.rescues OPERATOR(pg_catalog.=) 0
       AND r.run_after OPERATOR(pg_catalog.<=) pg_catalog.now()
       AND pg_catalog.octet_length(r.input::pg_catalog.text) OPERATOR(pg_catalog.+)
           pg_catalog.octet_length(r.outputs::pg_catalog.text) OPERATOR(pg_catalog.<=) 7000
    RETURNING r.id, r.attempt, r.input, r.outputs, r.lease_expires_at INTO handed;
    IF handed.id IS NULL THEN
        RETURN false;
    END IF;
    UPDATE @schema@.workers
       SET free_slots = free_slots OPERATOR(pg_catalog.-) 1,
           waiting = free_slots OPERATOR(pg_catalog.>) 1
     WHERE worker_id OPERATOR(pg_catalog.=) waiter.worker_id
    RETURNING free_slots INTO left_free;
    body := pg_catalog.json_build_object(
        'free', left_free, 'id', handed.id, 'attempt', handed.attempt,
        'waited', extract(epoch FROM pg_catalog.clock_timestamp() OPERATOR(pg_catalog.-)
                                     ready_at),
        'expires', extract(epoch FROM handed.lease_expires_at),
        'input', handed.input, 'outputs', handed.outputs)::pg_catalog.text;
    sent := pg_catalog.pg_notify(waiter.channel,
        'run:' OPERATOR(pg_catalog.||) waiter.worker_id OPERATOR(pg_catalog.||) ':'
        OPERATOR(pg_catalog.||) pg_catalog.encode(pg_catalog.sha256(
            waiter.secret OPERATOR(pg_catalog.||) pg_catalog.sha256(
                waiter.secret OPERATOR(pg_catalog.||) pg_catalog.convert_to(body, 'UTF8'))),
            'hex')
        OPERATOR(pg_catalog.||) ':' OPERATOR(pg_catalog.||) body);
    RETURN true;
END
$$;
REVOKE ALL ON FUNCTION @schema@.hand_off(uuid, text, text, timestamptz) FROM PUBLIC;

-- The wake-up trigger, as 010 made it, now with its owner's rights (it calls hand_off, which
-- no caller may) and so with every name qualified (IS DISTINCT FROM would look `=` up through
-- the caller's search_path: COALESCE over a qualified operator instead).
CREATE OR REPLACE FUNCTION @schema@.wake_waiting_workers() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER AS $$
DECLARE
    -- which stage this run waits for, without ambiguity whatever the names contain
    stage_key pg_catalog.text := pg_catalog.length(NEW.pipeline) OPERATOR(pg_catalog.||) ':'
                                 OPERATOR(pg_catalog.||) NEW.pipeline
                                 OPERATOR(pg_catalog.||) NEW.status;
    waiting_channel pg_catalog.text;
    sent pg_catalog.text;
BEGIN
    IF NEW.finished_at IS NOT NULL
       OR COALESCE(pg_catalog.current_setting('conveyor.woken', true)
                   OPERATOR(pg_catalog.=) stage_key, false) THEN
        RETURN NULL;
    END IF;
    SELECT w.channel INTO waiting_channel
      FROM @schema@.workers w
     WHERE w.waiting AND w.pipeline OPERATOR(pg_catalog.=) NEW.pipeline
       AND w.consumes OPERATOR(pg_catalog.=) NEW.status
       AND w.expires_at OPERATOR(pg_catalog.>) pg_catalog.now()
     LIMIT 1;
    IF waiting_channel IS NULL THEN
        sent := pg_catalog.set_config('conveyor.woken', stage_key, true);
        RETURN NULL;
    END IF;
    IF NEW.rescues OPERATOR(pg_catalog.=) 0 AND NEW.run_after OPERATOR(pg_catalog.<=) pg_catalog.now()
       AND pg_catalog.current_setting('transaction_isolation') OPERATOR(pg_catalog.=) 'read committed'
       AND COALESCE(pg_catalog.current_setting('conveyor.handed_off', true)
                    OPERATOR(pg_catalog.<>) 'on', true) THEN
        IF @schema@.hand_off(NEW.id, NEW.pipeline, NEW.status,
                             greatest(NEW.run_after, NEW.updated_at)) THEN
            sent := pg_catalog.set_config('conveyor.handed_off', 'on', true);
            RETURN NULL;
        END IF;
    END IF;
    sent := pg_catalog.pg_notify(waiting_channel, '');
    sent := pg_catalog.set_config('conveyor.woken', stage_key, true);
    RETURN NULL;
END
$$;

-- Retention for roles without DELETE on history: finished runs older than `older_than_seconds`
-- (of one pipeline, or all when NULL), up to 1000 a call, with their events. Runs not finished
-- and their history are out of its reach.
CREATE OR REPLACE FUNCTION @schema@.prune_finished(older_than_seconds float8, only_pipeline text)
RETURNS SETOF uuid
LANGUAGE sql SECURITY DEFINER AS $$
    WITH doomed AS (
        SELECT r.id FROM @schema@.pipeline_runs r
         WHERE r.finished_at OPERATOR(pg_catalog.<) (pg_catalog.now() OPERATOR(pg_catalog.-)
               pg_catalog.make_interval(secs => greatest(older_than_seconds, 0)))
           AND (only_pipeline IS NULL OR r.pipeline OPERATOR(pg_catalog.=) only_pipeline)
         LIMIT 1000
           FOR UPDATE SKIP LOCKED
    ), events AS (
        DELETE FROM @schema@.run_events e USING doomed d
         WHERE e.run_id OPERATOR(pg_catalog.=) d.id
    )
    DELETE FROM @schema@.pipeline_runs r USING doomed d
     WHERE r.id OPERATOR(pg_catalog.=) d.id
    RETURNING r.id
$$;
REVOKE ALL ON FUNCTION @schema@.prune_finished(float8, text) FROM PUBLIC;
