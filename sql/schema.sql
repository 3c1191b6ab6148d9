CREATE SCHEMA conveyor;
CREATE FUNCTION conveyor.analyze_runs_if_grown(least_rows double precision) RETURNS boolean
    LANGUAGE plpgsql SECURITY DEFINER
    SET search_path TO 'pg_catalog', 'pg_temp'
    AS $$
DECLARE
    counted float8;
    live float8;
BEGIN
    SELECT c.reltuples, pg_stat_get_live_tuples(c.oid) INTO counted, live
      FROM pg_class c
     WHERE c.oid = '"conveyor".pipeline_runs'::regclass;
    IF live <= 2 * greatest(counted, least_rows) THEN
        RETURN false;
    END IF;
    ANALYZE (SKIP_LOCKED) "conveyor".pipeline_runs;
    RETURN (SELECT c.reltuples IS DISTINCT FROM counted
              FROM pg_class c
             WHERE c.oid = '"conveyor".pipeline_runs'::regclass);
END
$$;
CREATE FUNCTION conveyor.bucket_free(tat timestamp with time zone, per_minute double precision, at timestamp with time zone) RETURNS double precision
    LANGUAGE sql IMMUTABLE
    AS $$
    SELECT greatest(per_minute / 60.0, 1.0)
           - extract(epoch FROM greatest(tat, at) - at)::float8 * per_minute / 60.0
$$;
CREATE FUNCTION conveyor.bucket_ready_at(tat timestamp with time zone, per_minute double precision, units double precision) RETURNS timestamp with time zone
    LANGUAGE sql IMMUTABLE
    AS $$
    SELECT tat - make_interval(secs => (greatest(per_minute / 60.0, 1.0) - units)
                                       * 60.0 / per_minute)
$$;
CREATE FUNCTION conveyor.child_added() RETURNS trigger
    LANGUAGE plpgsql
    AS $$
DECLARE
    parent record;
BEGIN
    IF NEW.child_index IS NOT NULL THEN
        RAISE EXCEPTION 'leave child_index out: a parent''s children are numbered as they are added'
              USING ERRCODE = 'check_violation';
    END IF;
    IF NEW.finished_at IS NOT NULL THEN
        RAISE EXCEPTION 'a child run must start unfinished (finished_at NULL)'
              USING ERRCODE = 'check_violation';
    END IF;
    SELECT p.id, p.status, p.finished_at, p.fan_out INTO parent
      FROM "conveyor".pipeline_runs p WHERE p.id = NEW.parent_id
       FOR NO KEY UPDATE;
    IF parent.id IS NULL OR parent.finished_at IS NOT NULL OR parent.fan_out IS NULL
       OR parent.status IS DISTINCT FROM parent.fan_out ->> 'waiting' THEN
        RAISE EXCEPTION 'run % is not waiting for children: a child may be added only while its parent waits for its fan-out',
                        NEW.parent_id
              USING ERRCODE = 'check_violation';
    END IF;
    NEW.child_index := (SELECT coalesce(max(c.child_index) + 1, 0)
                          FROM "conveyor".pipeline_runs c WHERE c.parent_id = NEW.parent_id);
    RETURN NEW;
END
$$;
CREATE FUNCTION conveyor.child_counted() RETURNS trigger
    LANGUAGE plpgsql
    AS $$
BEGIN
    UPDATE "conveyor".pipeline_runs SET children_pending = children_pending + 1, updated_at = now()
     WHERE id = NEW.parent_id;
    RETURN NULL;
END
$$;
CREATE FUNCTION conveyor.hand_off(handed_id uuid, handed_pipeline text, handed_status text, ready_at timestamp with time zone) RETURNS boolean
    LANGUAGE plpgsql SECURITY DEFINER
    AS $$
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
      FROM "conveyor".workers w
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
    UPDATE "conveyor".pipeline_runs r
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
    UPDATE "conveyor".workers
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
CREATE FUNCTION conveyor.limit_acquire(acquired_key text, requests integer, tokens double precision) RETURNS timestamp with time zone
    LANGUAGE plpgsql
    AS $$
DECLARE
    lim record;
    needed float8;
    now_at timestamptz := clock_timestamp();
BEGIN
    INSERT INTO "conveyor".limits (key) VALUES (acquired_key) ON CONFLICT (key) DO NOTHING;
    -- the lock limit_room takes: claims and acquires under a key follow one another
    PERFORM pg_catalog.pg_advisory_xact_lock(pg_catalog.hashtext('conveyor.limit.' || acquired_key));
    SELECT * INTO lim FROM "conveyor".limits l WHERE l.key = acquired_key;
    IF lim.closed_until > now_at THEN
        RETURN lim.closed_until;
    END IF;
    -- more requests than the bucket holds wait for it to be full, then go into deficit
    needed := least(requests, greatest(lim.requests_per_minute / 60.0, 1.0));
    IF requests > 0 AND lim.requests_per_minute IS NOT NULL
       AND "conveyor".bucket_free(lim.requests_tat, lim.requests_per_minute, now_at)
           < needed - 1e-9 THEN
        RETURN "conveyor".bucket_ready_at(lim.requests_tat, lim.requests_per_minute, needed);
    END IF;
    IF tokens > 0 AND lim.tokens_per_minute IS NOT NULL
       AND "conveyor".bucket_free(lim.tokens_tat, lim.tokens_per_minute, now_at) < 1 THEN
        RETURN "conveyor".bucket_ready_at(lim.tokens_tat, lim.tokens_per_minute, 1);
    END IF;
    PERFORM "conveyor".limit_take(ARRAY[acquired_key], requests, tokens);
    RETURN NULL;
END
$$;
CREATE FUNCTION conveyor.limit_close(closed_key text, until timestamp with time zone, reason text) RETURNS double precision
    LANGUAGE sql
    AS $$
    INSERT INTO "conveyor".limits AS l (key, closed_until, closed_reason, closures, updated_at)
    VALUES (closed_key, coalesce(until, clock_timestamp() + interval '1 second'), reason, 1,
            now())
    ON CONFLICT (key) DO UPDATE
       SET closed_until = CASE
               WHEN until IS NOT NULL THEN greatest(l.closed_until, until)
               WHEN l.closed_until > clock_timestamp() THEN l.closed_until  -- already closed
               ELSE clock_timestamp()
                    + make_interval(secs => least(60.0, 2.0 ^ least(l.closures, 6))) END,
           closed_reason = reason,
           -- the calls in flight when a key closes all meet its 429: one closure, not many
           closures = CASE WHEN l.closed_until > clock_timestamp() THEN l.closures
                           ELSE l.closures + 1 END,
           updated_at = now()
    RETURNING extract(epoch FROM closed_until - clock_timestamp())::float8;
$$;
CREATE TABLE conveyor.limits (
    key text NOT NULL,
    max_in_flight integer,
    requests_per_minute double precision,
    tokens_per_minute double precision,
    closed_until timestamp with time zone,
    closed_reason text,
    closures integer DEFAULT 0 NOT NULL,
    requests_tat timestamp with time zone,
    tokens_tat timestamp with time zone,
    updated_at timestamp with time zone DEFAULT now() NOT NULL
);
COMMENT ON TABLE conveyor.limits IS 'Flow control shared by every worker: caps, rates and closures per key (docs/flow-control.md).';
CREATE FUNCTION conveyor.limit_out_of_bounds(limit_row conveyor.limits) RETURNS text
    LANGUAGE sql IMMUTABLE
    RETURN CASE WHEN (NOT COALESCE(((octet_length((limit_row).key) >= 1) AND (octet_length((limit_row).key) <= 200)), true)) THEN 'limits_key_length'::text WHEN (NOT COALESCE(((limit_row).max_in_flight >= 0), true)) THEN 'limits_max_in_flight'::text WHEN (NOT COALESCE((((limit_row).requests_per_minute >= (0.001)::double precision) AND ((limit_row).requests_per_minute <= ('1000000000'::numeric)::double precision)), true)) THEN 'limits_rpm'::text WHEN (NOT COALESCE((((limit_row).tokens_per_minute >= (0.001)::double precision) AND ((limit_row).tokens_per_minute <= ('1000000000000'::numeric)::double precision)), true)) THEN 'limits_tpm'::text ELSE NULL::text END;
CREATE FUNCTION conveyor.limit_places_forget() RETURNS trigger
    LANGUAGE plpgsql
    AS $$
BEGIN
    DELETE FROM "conveyor".limit_places
     WHERE key IN (SELECT (CASE WHEN TG_OP = 'DELETE' THEN OLD ELSE NEW END).key
                   UNION SELECT (CASE WHEN TG_OP = 'INSERT' THEN NEW ELSE OLD END).key);
    RETURN NULL;
END
$$;
CREATE FUNCTION conveyor.limit_room(keys text[], wanted integer) RETURNS TABLE(room integer, throttled_until timestamp with time zone, throttled_by text)
    LANGUAGE plpgsql
    SET plan_cache_mode TO 'force_generic_plan'
    SET enable_seqscan TO 'off'
    SET enable_bitmapscan TO 'off'
    AS $$
DECLARE
    lim record;
    stage_row record;
    held integer;
    free integer;
    next_due timestamptz;
    next_key text;
    fits boolean;
    fitting_caps text[];
    capped text[] := '{}';
    capped_held integer[] := '{}';
    capped_counted timestamptz[] := '{}';
    counted_at timestamptz;
    uncapped text[] := '{}';
    now_at timestamptz := clock_timestamp();
BEGIN
    room := wanted;
    -- Claims under a key follow one another: an advisory lock per key, taken in key order
    -- (row locks would write to the table, and its WAL, at every claim).
    PERFORM pg_catalog.pg_advisory_xact_lock(pg_catalog.hashtext('conveyor.limit.' || k))
       FROM (SELECT DISTINCT k FROM unnest(keys) k ORDER BY k) ordered;
    -- The common case, read in one statement: no key is closed, every cap's bound is fresh and
    -- leaves room for the whole claim, every rate's bucket holds a request for each run, and
    -- no key is short of tokens (a key without a bound yet answers NULL: not the common case).
    -- The claim may take all it wants; the caps' bounds grow by it.
    SELECT coalesce(bool_and(coalesce(
               (l.closed_until IS NULL OR l.closed_until <= now_at)
               AND CASE WHEN l.max_in_flight IS NULL THEN p.key IS NULL
                        ELSE p.bound + wanted <= l.max_in_flight
                             AND p.counted_at > now_at - interval '1 second' END
               AND (l.requests_per_minute IS NULL
                    OR "conveyor".bucket_free(l.requests_tat, l.requests_per_minute, now_at)
                       + 1e-9 >= wanted)
               AND (l.tokens_per_minute IS NULL
                    OR "conveyor".bucket_free(l.tokens_tat, l.tokens_per_minute, now_at) >= 1),
               false)), false),
           array_agg(l.key) FILTER (WHERE l.max_in_flight IS NOT NULL)
      INTO fits, fitting_caps
      FROM "conveyor".limits l LEFT JOIN "conveyor".limit_places p ON p.key = l.key
     WHERE l.key = ANY(keys);
    IF fits THEN
        UPDATE "conveyor".limit_places SET bound = bound + wanted WHERE key = ANY(fitting_caps);
        RETURN QUERY SELECT wanted, NULL::timestamptz, NULL::text;
        RETURN;
    END IF;
    FOR lim IN SELECT l.*, p.bound, p.counted_at AS bound_counted_at FROM "conveyor".limits l
                 LEFT JOIN "conveyor".limit_places p ON p.key = l.key
                WHERE l.key = ANY(keys) ORDER BY l.key
    LOOP
        IF lim.closed_until > now_at THEN
            RETURN QUERY SELECT 0, lim.closed_until, lim.key;
            RETURN;
        END IF;
        IF lim.max_in_flight IS NULL AND lim.bound IS NOT NULL THEN
            -- no cap: claims keep no bound, so a cap set later counts first
            uncapped := uncapped || lim.key;
        END IF;
        IF lim.max_in_flight IS NOT NULL THEN
            IF lim.bound IS NOT NULL AND lim.bound + room <= lim.max_in_flight
               AND lim.bound_counted_at > now_at - interval '1 second' THEN
                held := lim.bound;  -- the bound leaves room: no count needed
                counted_at := lim.bound_counted_at;
            ELSE
                counted_at := now_at;
                -- stage by stage, each count through the claim's index: only leased runs
                -- are read
                held := 0;
                FOR stage_row IN SELECT s.pipeline, s.working FROM "conveyor".limit_stages s
                                  WHERE s.key = lim.key
                LOOP
                    held := held + (SELECT count(*) FROM "conveyor".pipeline_runs r
                                     WHERE r.pipeline = stage_row.pipeline
                                       AND r.status = stage_row.working
                                       AND r.finished_at IS NULL
                                       AND r.lease_expires_at > now_at);
                END LOOP;
            END IF;
            capped := capped || lim.key;
            capped_held := capped_held || held;
            capped_counted := capped_counted || counted_at;
            IF held >= lim.max_in_flight THEN
                room := 0;
                EXIT;
            END IF;
            room := least(room, lim.max_in_flight - held);
        END IF;
        IF lim.requests_per_minute IS NOT NULL THEN
            free := floor("conveyor".bucket_free(lim.requests_tat, lim.requests_per_minute, now_at)
                          + 1e-9);
            IF free < 1 THEN
                RETURN QUERY SELECT 0, "conveyor".bucket_ready_at(lim.requests_tat,
                                                                lim.requests_per_minute, 1),
                                    lim.key;
                RETURN;
            END IF;
            IF free < room THEN  -- the rate bounds this claim: when is the next request due
                room := free;
                next_due := "conveyor".bucket_ready_at(
                    greatest(lim.requests_tat, now_at)
                        + make_interval(secs => room * 60.0 / lim.requests_per_minute),
                    lim.requests_per_minute, 1);
                next_key := lim.key;
            END IF;
        END IF;
        -- tokens are taken by the handlers (limit_acquire); a claim waits out a deficit
        IF lim.tokens_per_minute IS NOT NULL
           AND "conveyor".bucket_free(lim.tokens_tat, lim.tokens_per_minute, now_at) < 1 THEN
            RETURN QUERY SELECT 0, "conveyor".bucket_ready_at(lim.tokens_tat,
                                                            lim.tokens_per_minute, 1),
                                lim.key;
            RETURN;
        END IF;
    END LOOP;
    -- The bound of every capped key read so far: what was held, and the room this claim may
    -- take (a claim that takes less leaves the bound a little high, which is safe).
    IF cardinality(capped) > 0 THEN
        INSERT INTO "conveyor".limit_places AS p (key, bound, counted_at)
        SELECT c.key, c.held + room, c.counted_at
          FROM unnest(capped, capped_held, capped_counted) AS c(key, held, counted_at)
        ON CONFLICT (key) DO UPDATE SET bound = excluded.bound, counted_at = excluded.counted_at;
    END IF;
    IF cardinality(uncapped) > 0 THEN
        DELETE FROM "conveyor".limit_places WHERE key = ANY(uncapped);
    END IF;
    IF room < 1 THEN  -- a cap is full: until a place is given back, which notifies
        RETURN QUERY SELECT 0, NULL::timestamptz, capped[cardinality(capped)];
        RETURN;
    END IF;
    -- With room, `throttled_until` is when a rate that bounded the claim has its next request.
    RETURN QUERY SELECT room, next_due, next_key;
END
$$;
CREATE FUNCTION conveyor.limit_settle(settled_key text, tokens double precision, answered boolean) RETURNS void
    LANGUAGE sql
    AS $$
    UPDATE "conveyor".limits l
       SET tokens_tat = CASE WHEN l.tokens_per_minute IS NULL OR tokens = 0 THEN l.tokens_tat
                             ELSE greatest(l.tokens_tat, clock_timestamp())
                                  + make_interval(secs => tokens * 60.0 / l.tokens_per_minute)
                             END,
           closures = CASE WHEN answered THEN 0 ELSE l.closures END
     WHERE l.key = settled_key AND ((answered AND l.closures > 0)
                                    OR (l.tokens_per_minute IS NOT NULL AND tokens <> 0));
$$;
CREATE FUNCTION conveyor.limit_take(keys text[], requests integer, tokens double precision) RETURNS void
    LANGUAGE sql
    SET plan_cache_mode TO 'force_generic_plan'
    AS $$
    UPDATE "conveyor".limits l
       SET requests_tat = CASE WHEN l.requests_per_minute IS NULL OR requests = 0
                               THEN l.requests_tat
                               ELSE greatest(l.requests_tat, clock_timestamp())
                                    + make_interval(secs => requests * 60.0
                                                            / l.requests_per_minute) END,
           tokens_tat = CASE WHEN l.tokens_per_minute IS NULL OR tokens = 0 THEN l.tokens_tat
                             ELSE greatest(l.tokens_tat, clock_timestamp())
                                  + make_interval(secs => tokens * 60.0 / l.tokens_per_minute)
                             END
     WHERE l.key = ANY(keys)
       AND (l.requests_per_minute IS NOT NULL OR l.tokens_per_minute IS NOT NULL);
$$;
CREATE FUNCTION conveyor.notify_pipeline_change() RETURNS trigger
    LANGUAGE plpgsql
    AS $$
DECLARE
    sent pg_catalog.text;
BEGIN
    sent := pg_catalog.pg_notify('pipeline_events', pg_catalog.json_build_object(
        'id', NEW.id, 'status', NEW.status, 'operation', TG_OP)::pg_catalog.text);
    RETURN NULL;
END
$$;
CREATE FUNCTION conveyor.prune_finished(older_than_seconds double precision, only_pipeline text) RETURNS SETOF uuid
    LANGUAGE sql SECURITY DEFINER
    AS $$
    WITH doomed AS (
        SELECT r.id FROM "conveyor".pipeline_runs r
         WHERE r.finished_at OPERATOR(pg_catalog.<) (pg_catalog.now() OPERATOR(pg_catalog.-)
               pg_catalog.make_interval(secs => greatest(older_than_seconds, 0)))
           AND (only_pipeline IS NULL OR r.pipeline OPERATOR(pg_catalog.=) only_pipeline)
           AND (r.parent_id IS NULL
                OR NOT EXISTS (SELECT 1 FROM "conveyor".pipeline_runs p
                                WHERE p.id OPERATOR(pg_catalog.=) r.parent_id
                                  AND p.finished_at IS NULL))
         LIMIT 1000
           FOR UPDATE SKIP LOCKED
    ), events AS (
        DELETE FROM "conveyor".run_events e USING doomed d
         WHERE e.run_id OPERATOR(pg_catalog.=) d.id
    )
    DELETE FROM "conveyor".pipeline_runs r USING doomed d
     WHERE r.id OPERATOR(pg_catalog.=) d.id
    RETURNING r.id
$$;
CREATE FUNCTION conveyor.refuse_input_not_object() RETURNS trigger
    LANGUAGE plpgsql
    AS $$
BEGIN
    RAISE EXCEPTION 'run input must be a JSON object, not %', pg_catalog.jsonb_typeof(NEW.input)
        USING ERRCODE = 'check_violation',
              CONSTRAINT = 'pipeline_runs_input_is_object',
              TABLE = TG_TABLE_NAME,
              SCHEMA = TG_TABLE_SCHEMA;
END
$$;
CREATE FUNCTION conveyor.refuse_limit_out_of_bounds() RETURNS trigger
    LANGUAGE plpgsql
    AS $$
DECLARE
    broken pg_catalog.text := "conveyor".limit_out_of_bounds(NEW);
BEGIN
    RAISE EXCEPTION 'limit % out of bounds: %',
                    pg_catalog.quote_literal(pg_catalog.left(NEW.key, 64)), broken
        USING ERRCODE = 'check_violation',
              DETAIL = 'key: 1 to 200 bytes; max_in_flight >= 0; requests_per_minute from'
                       ' 0.001 to 1e9; tokens_per_minute from 0.001 to 1e12',
              CONSTRAINT = broken,
              TABLE = TG_TABLE_NAME,
              SCHEMA = TG_TABLE_SCHEMA;
END
$$;
CREATE FUNCTION conveyor.run_finished() RETURNS trigger
    LANGUAGE plpgsql
    AS $$
DECLARE
    child_failed boolean := NEW.status IN ('FAILED', 'CANCELLED');
    fail_now boolean;
    parent record;
    moved_to text;
    moved_error text;
BEGIN
    IF NEW.children_pending > 0 THEN
        WITH cancelled AS (
            UPDATE "conveyor".pipeline_runs c
               SET status = 'CANCELLED', lease_owner = NULL, lease_expires_at = NULL,
                   last_error = format('cancelled: its parent run %s ended %s', NEW.id,
                                       NEW.status),
                   updated_at = now(), finished_at = now()
              FROM (SELECT id, status FROM "conveyor".pipeline_runs
                     WHERE parent_id = NEW.id AND finished_at IS NULL
                     ORDER BY id FOR UPDATE) running
             WHERE c.id = running.id
            RETURNING c.id, c.pipeline, running.status AS from_status, c.last_error
        )
        INSERT INTO "conveyor".run_events (run_id, pipeline, from_status, to_status, error)
        SELECT id, pipeline, from_status, 'CANCELLED', last_error FROM cancelled;
    END IF;
    IF NEW.parent_id IS NOT NULL
       AND (current_setting('conveyor.children_counted', true) IS DISTINCT FROM 'on'
            OR OLD.status = OLD.fan_out ->> 'waiting') THEN
        -- Counted apart from the move: most children change neither the parent's status nor
        -- an indexed column, so their update stays cheap (a HOT update, no wake-up queued).
        UPDATE "conveyor".pipeline_runs p
           SET children_pending = p.children_pending - 1, updated_at = now()
         WHERE p.id = NEW.parent_id AND p.finished_at IS NULL
           AND p.status = p.fan_out ->> 'waiting'
           AND NEW.child_index >= (p.fan_out ->> 'first')::int
        RETURNING p.id, p.pipeline, p.children_pending, p.fan_out INTO parent;
        IF parent.id IS NULL THEN
            RETURN NULL;  -- it waits for no fan-out of this child's (joined, ended, a later one)
        END IF;
        fail_now := child_failed AND (parent.fan_out ->> 'fail_fast')::boolean;
        IF fail_now OR parent.children_pending = 0 THEN
            UPDATE "conveyor".pipeline_runs p
               SET status = CASE WHEN fail_now THEN 'FAILED' ELSE p.fan_out ->> 'join' END,
                   last_error = CASE WHEN fail_now
                                     THEN format('child %s (run %s) ended %s: %s',
                                                 NEW.child_index - (p.fan_out ->> 'first')::int,
                                                 NEW.id, NEW.status,
                                                 coalesce(NEW.last_error, 'cancelled'))
                                     ELSE p.last_error END,
                   finished_at = CASE WHEN fail_now THEN now() END,
                   run_after = now(),
                   updated_at = now()
             WHERE p.id = parent.id
            RETURNING p.status, p.last_error INTO moved_to, moved_error;
            INSERT INTO "conveyor".run_events (run_id, pipeline, from_status, to_status, error)
            VALUES (parent.id, parent.pipeline, parent.fan_out ->> 'waiting', moved_to,
                    CASE WHEN fail_now THEN moved_error END);
        END IF;
    END IF;
    RETURN NULL;
END
$$;
CREATE FUNCTION conveyor.uuid_v7() RETURNS uuid
    LANGUAGE sql PARALLEL SAFE
    AS $$
    SELECT encode(
        set_bit(set_bit(
            overlay(uuid_send(gen_random_uuid())
                    PLACING substring(int8send(floor(extract(epoch FROM clock_timestamp())
                                                      * 1000)::bigint) FROM 3)
                    FROM 1 FOR 6),
            52, 1), 53, 1),
        'hex')::uuid
$$;
CREATE FUNCTION conveyor.wake_waiting_workers() RETURNS trigger
    LANGUAGE plpgsql SECURITY DEFINER
    AS $$
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
      FROM "conveyor".workers w
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
        IF "conveyor".hand_off(NEW.id, NEW.pipeline, NEW.status,
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
CREATE UNLOGGED TABLE conveyor.limit_places (
    key text NOT NULL,
    bound integer NOT NULL,
    counted_at timestamp with time zone NOT NULL
);
COMMENT ON TABLE conveyor.limit_places IS 'What claims under each capped key may hold at most: a bound that spares counting them.';
CREATE TABLE conveyor.limit_stages (
    key text NOT NULL,
    pipeline text NOT NULL,
    stage text NOT NULL,
    working text NOT NULL,
    channel text NOT NULL,
    CONSTRAINT limit_stages_channel CHECK (((octet_length(channel) >= 1) AND (octet_length(channel) <= 63)))
);
CREATE TABLE conveyor.memory (
    id bigint NOT NULL,
    namespace text DEFAULT 'default'::text NOT NULL,
    kind text DEFAULT 'document'::text NOT NULL,
    content text NOT NULL,
    metadata jsonb DEFAULT '{}'::jsonb NOT NULL,
    search tsvector GENERATED ALWAYS AS (to_tsvector('english'::regconfig, content)) STORED,
    created_at timestamp with time zone DEFAULT now() NOT NULL,
    embedding public.vector,
    CONSTRAINT memory_kind_check CHECK ((kind = ANY (ARRAY['document'::text, 'message'::text, 'fact'::text])))
);
ALTER TABLE conveyor.memory ALTER COLUMN id ADD GENERATED ALWAYS AS IDENTITY (
    SEQUENCE NAME conveyor.memory_id_seq
    START WITH 1
    INCREMENT BY 1
    NO MINVALUE
    NO MAXVALUE
    CACHE 1
);
CREATE TABLE conveyor.pipeline_runs (
    id uuid DEFAULT conveyor.uuid_v7() NOT NULL,
    pipeline text DEFAULT 'agents'::text NOT NULL,
    status text DEFAULT 'NEW'::text NOT NULL,
    input jsonb DEFAULT '{}'::jsonb NOT NULL,
    outputs jsonb DEFAULT '{}'::jsonb NOT NULL,
    priority smallint DEFAULT 0 NOT NULL,
    run_after timestamp with time zone DEFAULT now() NOT NULL,
    attempt integer DEFAULT 0 NOT NULL,
    rescues integer DEFAULT 0 NOT NULL,
    lease_owner text,
    lease_expires_at timestamp with time zone,
    last_error text,
    idempotency_key text,
    created_at timestamp with time zone DEFAULT now() NOT NULL,
    updated_at timestamp with time zone DEFAULT now() NOT NULL,
    finished_at timestamp with time zone,
    visits jsonb,
    parent_id uuid,
    child_index integer,
    children_pending integer,
    fan_out jsonb
)
WITH (autovacuum_vacuum_scale_factor='0.02', autovacuum_vacuum_insert_scale_factor='0.02', autovacuum_analyze_scale_factor='0.02', vacuum_truncate='false');
COMMENT ON COLUMN conveyor.pipeline_runs.visits IS 'Times the run has run each stage on a loop of its pipeline (docs/pipelines.md).';
COMMENT ON COLUMN conveyor.pipeline_runs.parent_id IS 'The run that created this one as a child (docs/pipelines.md, "Fan-out and join").';
COMMENT ON COLUMN conveyor.pipeline_runs.children_pending IS 'Children of the current fan-out not finished yet; the parent joins when it reaches 0.';
COMMENT ON COLUMN conveyor.pipeline_runs.fan_out IS 'The current fan-out: waiting and join statuses, fail_fast, first child index, width.';
CREATE TABLE conveyor.run_events (
    id bigint NOT NULL,
    run_id uuid NOT NULL,
    pipeline text NOT NULL,
    stage text,
    from_status text,
    to_status text NOT NULL,
    attempt integer,
    worker text,
    started_at timestamp with time zone,
    duration interval,
    error text,
    model text,
    prompt_tokens integer,
    completion_tokens integer,
    created_at timestamp with time zone DEFAULT now() NOT NULL
)
WITH (autovacuum_vacuum_scale_factor='0.02', autovacuum_vacuum_insert_scale_factor='0.02', autovacuum_analyze_scale_factor='0.02', vacuum_truncate='false');
ALTER TABLE conveyor.run_events ALTER COLUMN id ADD GENERATED ALWAYS AS IDENTITY (
    SEQUENCE NAME conveyor.run_events_id_seq
    START WITH 1
    INCREMENT BY 1
    NO MINVALUE
    NO MAXVALUE
    CACHE 1
);
CREATE TABLE conveyor.schema_migrations (
    version integer NOT NULL,
    name text NOT NULL,
    applied_at timestamp with time zone DEFAULT now() NOT NULL
);
CREATE UNLOGGED TABLE conveyor.workers (
    worker_id text NOT NULL,
    pipeline text NOT NULL,
    stage text NOT NULL,
    consumes text NOT NULL,
    channel text NOT NULL,
    hostname text NOT NULL,
    pid integer NOT NULL,
    started_at timestamp with time zone DEFAULT now() NOT NULL,
    heartbeat_at timestamp with time zone DEFAULT now() NOT NULL,
    expires_at timestamp with time zone NOT NULL,
    waiting boolean DEFAULT false NOT NULL,
    working text,
    lease_seconds double precision,
    free_slots integer,
    secret bytea,
    CONSTRAINT workers_channel_length CHECK (((octet_length(channel) >= 1) AND (octet_length(channel) <= 63))),
    CONSTRAINT workers_expiry_bounds CHECK ((expires_at <= (heartbeat_at + '7 days'::interval))),
    CONSTRAINT workers_free_slots_bounds CHECK (((free_slots >= 0) AND (free_slots <= 100000))),
    CONSTRAINT workers_id_length CHECK (((octet_length(worker_id) >= 1) AND (octet_length(worker_id) <= 100))),
    CONSTRAINT workers_lease_bounds CHECK (((lease_seconds >= (1)::double precision) AND (lease_seconds <= (604800)::double precision))),
    CONSTRAINT workers_secret_length CHECK (((octet_length(secret) >= 16) AND (octet_length(secret) <= 64)))
);
COMMENT ON COLUMN conveyor.workers.secret IS 'The key hand_off signs this worker''s hand-offs with; never readable by conveyor_reader.';
ALTER TABLE ONLY conveyor.limit_places
    ADD CONSTRAINT limit_places_pkey PRIMARY KEY (key);
ALTER TABLE ONLY conveyor.limit_stages
    ADD CONSTRAINT limit_stages_pkey PRIMARY KEY (key, pipeline, stage);
ALTER TABLE ONLY conveyor.limits
    ADD CONSTRAINT limits_pkey PRIMARY KEY (key);
ALTER TABLE ONLY conveyor.memory
    ADD CONSTRAINT memory_pkey PRIMARY KEY (id);
ALTER TABLE ONLY conveyor.pipeline_runs
    ADD CONSTRAINT pipeline_runs_pkey PRIMARY KEY (id);
ALTER TABLE ONLY conveyor.run_events
    ADD CONSTRAINT run_events_pkey PRIMARY KEY (id);
ALTER TABLE ONLY conveyor.schema_migrations
    ADD CONSTRAINT schema_migrations_pkey PRIMARY KEY (version);
ALTER TABLE ONLY conveyor.workers
    ADD CONSTRAINT workers_pkey PRIMARY KEY (worker_id);
CREATE INDEX memory_document_source ON conveyor.memory USING btree (namespace, ((metadata ->> 'source'::text))) WHERE (kind = 'document'::text);
CREATE UNIQUE INDEX memory_exchange_run ON conveyor.memory USING btree (((metadata ->> 'run_id'::text))) WHERE ((kind = 'message'::text) AND (metadata ? 'run_id'::text));
CREATE INDEX memory_namespace ON conveyor.memory USING btree (namespace, kind, created_at);
CREATE INDEX memory_search ON conveyor.memory USING gin (search);
CREATE UNIQUE INDEX pipeline_runs_children ON conveyor.pipeline_runs USING btree (parent_id, child_index) WHERE (parent_id IS NOT NULL);
CREATE INDEX pipeline_runs_claimable ON conveyor.pipeline_runs USING btree (pipeline, status, priority DESC, run_after) WHERE (finished_at IS NULL);
CREATE INDEX pipeline_runs_failed ON conveyor.pipeline_runs USING btree (pipeline, finished_at) WHERE (status = 'FAILED'::text);
CREATE INDEX pipeline_runs_finished ON conveyor.pipeline_runs USING btree (finished_at) WHERE (finished_at IS NOT NULL);
CREATE UNIQUE INDEX pipeline_runs_idempotency ON conveyor.pipeline_runs USING btree (pipeline, idempotency_key) WHERE (idempotency_key IS NOT NULL);
CREATE INDEX pipeline_runs_untimed_ids ON conveyor.pipeline_runs USING btree (created_at, id) WHERE (NOT (((get_byte(uuid_send(id), 6) >> 4) = 7) AND (id < '0699e991-a800-0000-0000-000000000000'::uuid)));
CREATE INDEX run_events_created ON conveyor.run_events USING btree (created_at);
CREATE INDEX run_events_run ON conveyor.run_events USING btree (run_id, id);
CREATE TRIGGER child_added BEFORE INSERT ON conveyor.pipeline_runs FOR EACH ROW WHEN (((new.parent_id IS NOT NULL) AND (current_setting('conveyor.fan_out'::text, true) IS DISTINCT FROM 'on'::text))) EXECUTE FUNCTION conveyor.child_added();
CREATE TRIGGER child_counted AFTER INSERT ON conveyor.pipeline_runs FOR EACH ROW WHEN (((new.parent_id IS NOT NULL) AND (current_setting('conveyor.fan_out'::text, true) IS DISTINCT FROM 'on'::text))) EXECUTE FUNCTION conveyor.child_counted();
CREATE TRIGGER limit_places_stages AFTER INSERT OR DELETE OR UPDATE ON conveyor.limit_stages FOR EACH ROW EXECUTE FUNCTION conveyor.limit_places_forget();
CREATE TRIGGER limits_in_bounds BEFORE INSERT ON conveyor.limits FOR EACH ROW WHEN ((conveyor.limit_out_of_bounds(new.*) IS NOT NULL)) EXECUTE FUNCTION conveyor.refuse_limit_out_of_bounds();
CREATE TRIGGER limits_in_bounds_updated AFTER UPDATE OF key, max_in_flight, requests_per_minute, tokens_per_minute ON conveyor.limits FOR EACH ROW WHEN ((conveyor.limit_out_of_bounds(new.*) IS NOT NULL)) EXECUTE FUNCTION conveyor.refuse_limit_out_of_bounds();
CREATE TRIGGER pipeline_events_insert AFTER INSERT ON conveyor.pipeline_runs FOR EACH ROW EXECUTE FUNCTION conveyor.notify_pipeline_change();
CREATE TRIGGER pipeline_events_update AFTER UPDATE OF status ON conveyor.pipeline_runs FOR EACH ROW WHEN ((old.status IS DISTINCT FROM new.status)) EXECUTE FUNCTION conveyor.notify_pipeline_change();
CREATE TRIGGER pipeline_runs_input_is_object BEFORE INSERT ON conveyor.pipeline_runs FOR EACH ROW WHEN ((jsonb_typeof(new.input) <> 'object'::text)) EXECUTE FUNCTION conveyor.refuse_input_not_object();
CREATE TRIGGER pipeline_runs_input_is_object_updated AFTER UPDATE OF input ON conveyor.pipeline_runs FOR EACH ROW WHEN ((jsonb_typeof(new.input) <> 'object'::text)) EXECUTE FUNCTION conveyor.refuse_input_not_object();
CREATE TRIGGER run_finished AFTER UPDATE OF finished_at ON conveyor.pipeline_runs FOR EACH ROW WHEN (((old.finished_at IS NULL) AND (new.finished_at IS NOT NULL) AND (((new.parent_id IS NOT NULL) AND ((current_setting('conveyor.children_counted'::text, true) IS DISTINCT FROM 'on'::text) OR (old.status = (old.fan_out ->> 'waiting'::text)))) OR (new.children_pending > 0)))) EXECUTE FUNCTION conveyor.run_finished();
CREATE CONSTRAINT TRIGGER wake_waiting_workers AFTER INSERT OR UPDATE OF status ON conveyor.pipeline_runs DEFERRABLE INITIALLY DEFERRED FOR EACH ROW WHEN (((new.finished_at IS NULL) AND (new.lease_owner IS NULL))) EXECUTE FUNCTION conveyor.wake_waiting_workers();
ALTER TABLE ONLY conveyor.limit_places
    ADD CONSTRAINT limit_places_key_fkey FOREIGN KEY (key) REFERENCES conveyor.limits(key) ON DELETE CASCADE;
ALTER TABLE ONLY conveyor.limit_stages
    ADD CONSTRAINT limit_stages_key_fkey FOREIGN KEY (key) REFERENCES conveyor.limits(key) ON DELETE CASCADE;
