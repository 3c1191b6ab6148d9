-- 018: limit_room answers the common case (nothing closed, the caps' bounds fresh with room,
-- the buckets full enough for the whole claim) from one read of the keys, and goes key by key
-- only when a limit may bind.

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
                    OR @schema@.bucket_free(l.requests_tat, l.requests_per_minute, now_at)
                       + 1e-9 >= wanted)
               AND (l.tokens_per_minute IS NULL
                    OR @schema@.bucket_free(l.tokens_tat, l.tokens_per_minute, now_at) >= 1),
               false)), false),
           array_agg(l.key) FILTER (WHERE l.max_in_flight IS NOT NULL)
      INTO fits, fitting_caps
      FROM @schema@.limits l LEFT JOIN @schema@.limit_places p ON p.key = l.key
     WHERE l.key = ANY(keys);
    IF fits THEN
        UPDATE @schema@.limit_places SET bound = bound + wanted WHERE key = ANY(fitting_caps);
        RETURN QUERY SELECT wanted, NULL::timestamptz, NULL::text;
        RETURN;
    END IF;
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
