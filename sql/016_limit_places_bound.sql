-- 016: a claim under a cap counts the key's leased runs only when the cap may bind. A run is
-- leased under a key by a claim that asked limit_room first, and limit_room keeps what it let
-- those claims take since its last count (`limit_places`): the count then, plus every room
-- granted since, is at least the runs leased now (runs that finish only lower it). While that
-- bound leaves room for the claim, the claim takes it without counting; once it would not, or
-- once the count is a second old, limit_room counts again and starts the bound over from the
-- count. The second bounds what a lease made some other way (a worker of the stage that does
-- not declare the key, a lease extended after it expired) can go unseen. A cap far above what
-- the workers hold is counted about once a second; a cap that binds, at every claim.

-- UNLOGGED: a bound is a cache. After a crash the table is empty, and the next claim counts.
CREATE UNLOGGED TABLE @schema@.limit_places (
    key        text PRIMARY KEY REFERENCES @schema@.limits (key) ON DELETE CASCADE,
    bound      integer NOT NULL,     -- at least the runs leased under the key now
    counted_at timestamptz NOT NULL  -- the count the bound started from
);

COMMENT ON TABLE @schema@.limit_places IS
    'What claims under each capped key may hold at most: a bound that spares counting them.';

-- A bound holds only while every run leased under the key was leased by a claim that kept it:
-- a stage that joins or leaves the key (its runs leased before) starts it over from a count.
-- Workers change limit_stages holding the keys' advisory locks (FlowControl.declare_on), as
-- claims do before they write the bound: the two follow one another.
CREATE FUNCTION @schema@.limit_places_forget() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    DELETE FROM @schema@.limit_places
     WHERE key IN (SELECT (CASE WHEN TG_OP = 'DELETE' THEN OLD ELSE NEW END).key
                   UNION SELECT (CASE WHEN TG_OP = 'INSERT' THEN NEW ELSE OLD END).key);
    RETURN NULL;
END
$$;

CREATE TRIGGER limit_places_stages AFTER INSERT OR UPDATE OR DELETE ON @schema@.limit_stages
    FOR EACH ROW EXECUTE FUNCTION @schema@.limit_places_forget();

CREATE OR REPLACE FUNCTION @schema@.limit_room(keys text[], wanted integer)
RETURNS TABLE (room integer, throttled_until timestamptz, throttled_by text)
LANGUAGE plpgsql AS $$
DECLARE
    lim record;
    stage_row record;
    held integer;
    free integer;
    next_due timestamptz;
    next_key text;
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
    FOR lim IN SELECT l.*, p.bound, p.counted_at AS bound_counted_at FROM @schema@.limits l
                 LEFT JOIN @schema@.limit_places p ON p.key = l.key
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
                FOR stage_row IN SELECT s.pipeline, s.working FROM @schema@.limit_stages s
                                  WHERE s.key = lim.key
                LOOP
                    held := held + (SELECT count(*) FROM @schema@.pipeline_runs r
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
            free := floor(@schema@.bucket_free(lim.requests_tat, lim.requests_per_minute, now_at)
                          + 1e-9);
            IF free < 1 THEN
                RETURN QUERY SELECT 0, @schema@.bucket_ready_at(lim.requests_tat,
                                                                lim.requests_per_minute, 1),
                                    lim.key;
                RETURN;
            END IF;
            IF free < room THEN  -- the rate bounds this claim: when is the next request due
                room := free;
                next_due := @schema@.bucket_ready_at(
                    greatest(lim.requests_tat, now_at)
                        + make_interval(secs => room * 60.0 / lim.requests_per_minute),
                    lim.requests_per_minute, 1);
                next_key := lim.key;
            END IF;
        END IF;
        -- tokens are taken by the handlers (limit_acquire); a claim waits out a deficit
        IF lim.tokens_per_minute IS NOT NULL
           AND @schema@.bucket_free(lim.tokens_tat, lim.tokens_per_minute, now_at) < 1 THEN
            RETURN QUERY SELECT 0, @schema@.bucket_ready_at(lim.tokens_tat,
                                                            lim.tokens_per_minute, 1),
                                lim.key;
            RETURN;
        END IF;
    END LOOP;
    -- The bound of every capped key read so far: what was held, and the room this claim may
    -- take (a claim that takes less leaves the bound a little high, which is safe).
    IF cardinality(capped) > 0 THEN
        INSERT INTO @schema@.limit_places AS p (key, bound, counted_at)
        SELECT c.key, c.held + room, c.counted_at
          FROM unnest(capped, capped_held, capped_counted) AS c(key, held, counted_at)
        ON CONFLICT (key) DO UPDATE SET bound = excluded.bound, counted_at = excluded.counted_at;
    END IF;
    IF cardinality(uncapped) > 0 THEN
        DELETE FROM @schema@.limit_places WHERE key = ANY(uncapped);
    END IF;
    IF room < 1 THEN  -- a cap is full: until a place is given back, which notifies
        RETURN QUERY SELECT 0, NULL::timestamptz, capped[cardinality(capped)];
        RETURN;
    END IF;
    -- With room, `throttled_until` is when a rate that bounded the claim has its next request.
    RETURN QUERY SELECT room, next_due, next_key;
END
$$;

ALTER FUNCTION @schema@.limit_room(text[], integer)
    SET plan_cache_mode = force_generic_plan
    SET enable_seqscan = off
    SET enable_bitmapscan = off;
