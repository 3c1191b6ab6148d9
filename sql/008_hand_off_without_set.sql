-- 008: the hand-off function without a SET clause.
-- @schema@ is replaced by the quoted, validated schema name when the migration is applied.

-- `SET search_path` on a function makes every call save, parse, apply and restore the setting:
-- measured ~0.2 ms per hand-off on the 2-core machine, a seventh of a stage's hop from commit
-- to the next handler (benchmarks, (d)). The clause was there because the function runs with
-- its owner's rights (SECURITY DEFINER) while the caller picks the search_path: an unqualified
-- name could resolve to a function, operator or type the caller created. So every name in the
-- body is qualified instead: tables by the schema, functions, types and operators by
-- pg_catalog. The same holds for the observer trigger, which the function's UPDATE fires with
-- the owner's rights. (Keywords such as integer, boolean, IS NULL and extract() are not looked
-- up through the search_path.)

CREATE OR REPLACE FUNCTION @schema@.hand_off(handed_id uuid, handed_pipeline text,
                                             handed_status text, ready_at timestamptz)
RETURNS boolean
LANGUAGE plpgsql SECURITY DEFINER AS $$
DECLARE
    waiter record;
    handed record;
    left_free integer;
BEGIN
    SELECT w.worker_id, w.channel, w.working, w.lease_seconds INTO waiter
      FROM @schema@.workers w
     WHERE w.waiting
       AND w.pipeline OPERATOR(pg_catalog.=) handed_pipeline
       AND w.consumes OPERATOR(pg_catalog.=) handed_status
       AND w.expires_at OPERATOR(pg_catalog.>) pg_catalog.now()
       AND w.working IS NOT NULL
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
    RETURNING r.id, r.attempt, r.input, r.outputs INTO handed;
    IF handed.id IS NULL THEN
        RETURN false;
    END IF;
    UPDATE @schema@.workers
       SET free_slots = free_slots OPERATOR(pg_catalog.-) 1,
           waiting = free_slots OPERATOR(pg_catalog.>) 1
     WHERE worker_id OPERATOR(pg_catalog.=) waiter.worker_id
    RETURNING free_slots INTO left_free;
    PERFORM pg_catalog.pg_notify(waiter.channel, 'run:' OPERATOR(pg_catalog.||)
        pg_catalog.json_build_object(
            'worker', waiter.worker_id, 'free', left_free, 'id', handed.id,
            'attempt', handed.attempt,
            'waited', extract(epoch FROM pg_catalog.clock_timestamp() OPERATOR(pg_catalog.-)
                                         ready_at),
            'input', handed.input, 'outputs', handed.outputs)::pg_catalog.text);
    RETURN true;
END
$$;

-- hand_off's UPDATE fires the observer trigger with the owner's rights and the caller's
-- search_path: its names are qualified too. Nothing else about the observer changes.
CREATE OR REPLACE FUNCTION @schema@.notify_pipeline_change() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_catalog.pg_notify('pipeline_events', pg_catalog.json_build_object(
        'id', NEW.id, 'status', NEW.status, 'operation', TG_OP)::pg_catalog.text);
    RETURN NULL;
END
$$;
