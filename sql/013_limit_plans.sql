-- 013: flow control's functions keep their plans. PostgreSQL's plan cache kept planning anew,
-- at every claim, each statement that filters on `key = ANY(keys)`, which cost more than running
-- it. These functions now keep one generic plan per statement. The count of a stage's leased
-- runs is held to the claim index (a generic plan does not know how few runs a working status
-- has, and would read the whole table).

ALTER FUNCTION @schema@.limit_take(text[], integer, float8)
    SET plan_cache_mode = force_generic_plan;

CREATE OR REPLACE FUNCTION @schema@.limit_room(keys text[], wanted integer)
RETURNS TABLE (room integer, throttled_until timestamptz, throttled_by text)
LANGUAGE plpgsql
SET plan_cache_mode = force_generic_plan
SET enable_seqscan = off
SET enable_bitmapscan = off
AS $$
DECLARE
    lim record;
    stage_row record;
    held integer;
    free integer;
    next_due timestamptz;
    next_key text;
    now_at timestamptz := clock_timestamp();
BEGIN
    room := wanted;
    -- Claims under a key follow one another: an advisory lock per key, taken in key order
    -- (row locks would write to the table, and its WAL, at every claim).
    PERFORM pg_catalog.pg_advisory_xact_lock(pg_catalog.hashtext('conveyor.limit.' || k))
       FROM (SELECT DISTINCT k FROM unnest(keys) k ORDER BY k) ordered;
    FOR lim IN SELECT * FROM @schema@.limits l WHERE l.key = ANY(keys) ORDER BY l.key
    LOOP
        IF lim.closed_until > now_at THEN
            RETURN QUERY SELECT 0, lim.closed_until, lim.key;
            RETURN;
        END IF;
        IF lim.max_in_flight IS NOT NULL THEN
            -- stage by stage, each count through the claim's index (the function's settings
            -- keep its generic plan there): only leased runs are read
            held := 0;
            FOR stage_row IN SELECT s.pipeline, s.working FROM @schema@.limit_stages s
                              WHERE s.key = lim.key
            LOOP
                held := held + (SELECT count(*) FROM @schema@.pipeline_runs r
                                 WHERE r.pipeline = stage_row.pipeline
                                   AND r.status = stage_row.working
                                   AND r.finished_at IS NULL AND r.lease_expires_at > now_at);
            END LOOP;
            IF held >= lim.max_in_flight THEN
                RETURN QUERY SELECT 0, NULL::timestamptz, lim.key;
                RETURN;
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
    -- With room, `throttled_until` is when a rate that bounded the claim has its next request.
    RETURN QUERY SELECT room, next_due, next_key;
END
$$;
