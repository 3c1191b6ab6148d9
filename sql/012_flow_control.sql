-- 012: flow control. Limits held in the database, shared by every worker of every pod: how many
-- runs may be in flight under a key, how many requests and tokens per minute it allows, and
-- whether it is closed (a provider answered 429) until some instant.
-- @schema@ is replaced by the quoted, validated schema name when the migration is applied.

-- One row per key: a stage's own cap (`stage:<pipeline>:<stage>`), a model route
-- (`openai:gpt-4o`), any name. NULL is no limit of that kind. Operators may change a row at run
-- time; a worker that declares the key writes its declaration again when it starts.
-- The rates are kept as GCRA state: `*_tat` is the theoretical arrival time, the instant the
-- bucket would be full again at the limit's pace. A bucket holds one second of its rate (at
-- least one unit): at 120 requests per minute, two at once, then one every half second.
CREATE TABLE @schema@.limits (
    key                 text PRIMARY KEY
                        CONSTRAINT limits_key_length CHECK (octet_length(key) BETWEEN 1 AND 200),
    max_in_flight       integer CONSTRAINT limits_max_in_flight CHECK (max_in_flight >= 0),
    requests_per_minute double precision
                        CONSTRAINT limits_rpm CHECK (requests_per_minute > 0
                                                     AND requests_per_minute <= 1e9),
    tokens_per_minute   double precision
                        CONSTRAINT limits_tpm CHECK (tokens_per_minute > 0
                                                     AND tokens_per_minute <= 1e12),
    closed_until        timestamptz,  -- no run under this key starts before then
    closed_reason       text,
    closures            integer NOT NULL DEFAULT 0,  -- in a row, for the shared backoff
    requests_tat        timestamptz,
    tokens_tat          timestamptz,
    updated_at          timestamptz NOT NULL DEFAULT now()
);

COMMENT ON TABLE @schema@.limits IS
    'Flow control shared by every worker: caps, rates and closures per key (docs/flow-control.md).';

-- Which stages run under which key: a run of such a stage holds one of the key's places while
-- it is leased (its lease unexpired), and each claim of it takes one request.
CREATE TABLE @schema@.limit_stages (
    key      text NOT NULL REFERENCES @schema@.limits (key) ON DELETE CASCADE,
    pipeline text NOT NULL,
    stage    text NOT NULL,
    working  text NOT NULL,
    channel  text NOT NULL CONSTRAINT limit_stages_channel CHECK (octet_length(channel)
                                                                  BETWEEN 1 AND 63),
    PRIMARY KEY (key, pipeline, stage)
);

-- A bucket's arithmetic. Full, it holds one second of its rate, at least one unit; `tat` past
-- `at` is what has been taken beyond what has flowed back since.
CREATE FUNCTION @schema@.bucket_free(tat timestamptz, per_minute float8, at timestamptz)
RETURNS float8
LANGUAGE sql IMMUTABLE AS $$
    SELECT greatest(per_minute / 60.0, 1.0)
           - extract(epoch FROM greatest(tat, at) - at)::float8 * per_minute / 60.0
$$;

-- The instant a bucket holds `units` again.
CREATE FUNCTION @schema@.bucket_ready_at(tat timestamptz, per_minute float8, units float8)
RETURNS timestamptz
LANGUAGE sql IMMUTABLE AS $$
    SELECT tat - make_interval(secs => (greatest(per_minute / 60.0, 1.0) - units)
                                       * 60.0 / per_minute)
$$;

-- How many runs a claim of `wanted` may take under `keys`, and, when none, until when (NULL:
-- until a place is given back, which notifies) and because of which key. Holds each key's lock
-- until the claim's transaction ends: claims under one key follow one another, and each sees
-- the places the one before it took.
CREATE FUNCTION @schema@.limit_room(keys text[], wanted integer)
RETURNS TABLE (room integer, throttled_until timestamptz, throttled_by text)
LANGUAGE plpgsql AS $$
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
            -- stage by stage, each count through the claim's index: only leased runs are read
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

-- Takes `requests` requests and `tokens` tokens from every key of `keys` that counts them (after
-- a claim: one request per run claimed; a handler's acquire: what it is about to send).
-- Unconditional: limit_room or limit_acquire decided; the bucket may go into deficit, which
-- later claims wait out.
CREATE FUNCTION @schema@.limit_take(keys text[], requests integer, tokens float8)
RETURNS void
LANGUAGE sql AS $$
    UPDATE @schema@.limits l
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

-- A handler's acquire: take `requests` requests and `tokens` tokens from `key` if it is open
-- and has them (tokens: while the bucket is not in deficit, a call may take more than it
-- holds). Returns NULL when taken, else the instant to try again. A key never declared gets a
-- row with no limits, where a closure can be kept.
CREATE FUNCTION @schema@.limit_acquire(acquired_key text, requests integer, tokens float8)
RETURNS timestamptz
LANGUAGE plpgsql AS $$
DECLARE
    lim record;
    needed float8;
    now_at timestamptz := clock_timestamp();
BEGIN
    INSERT INTO @schema@.limits (key) VALUES (acquired_key) ON CONFLICT (key) DO NOTHING;
    -- the lock limit_room takes: claims and acquires under a key follow one another
    PERFORM pg_catalog.pg_advisory_xact_lock(pg_catalog.hashtext('conveyor.limit.' || acquired_key));
    SELECT * INTO lim FROM @schema@.limits l WHERE l.key = acquired_key;
    IF lim.closed_until > now_at THEN
        RETURN lim.closed_until;
    END IF;
    -- more requests than the bucket holds wait for it to be full, then go into deficit
    needed := least(requests, greatest(lim.requests_per_minute / 60.0, 1.0));
    IF requests > 0 AND lim.requests_per_minute IS NOT NULL
       AND @schema@.bucket_free(lim.requests_tat, lim.requests_per_minute, now_at)
           < needed - 1e-9 THEN
        RETURN @schema@.bucket_ready_at(lim.requests_tat, lim.requests_per_minute, needed);
    END IF;
    IF tokens > 0 AND lim.tokens_per_minute IS NOT NULL
       AND @schema@.bucket_free(lim.tokens_tat, lim.tokens_per_minute, now_at) < 1 THEN
        RETURN @schema@.bucket_ready_at(lim.tokens_tat, lim.tokens_per_minute, 1);
    END IF;
    PERFORM @schema@.limit_take(ARRAY[acquired_key], requests, tokens);
    RETURN NULL;
END
$$;

-- After a call: `tokens` more (or, negative, fewer) than were taken for it; a key that
-- `answered` starts its shared backoff over.
CREATE FUNCTION @schema@.limit_settle(settled_key text, tokens float8, answered boolean)
RETURNS void
LANGUAGE sql AS $$
    UPDATE @schema@.limits l
       SET tokens_tat = CASE WHEN l.tokens_per_minute IS NULL OR tokens = 0 THEN l.tokens_tat
                             ELSE greatest(l.tokens_tat, clock_timestamp())
                                  + make_interval(secs => tokens * 60.0 / l.tokens_per_minute)
                             END,
           closures = CASE WHEN answered THEN 0 ELSE l.closures END
     WHERE l.key = settled_key AND ((answered AND l.closures > 0)
                                    OR (l.tokens_per_minute IS NOT NULL AND tokens <> 0));
$$;

-- Close `key` for everyone until `until` (a provider's Retry-After), or, with NULL, for the
-- shared backoff: 1 s, then 2, 4 ... up to 60 s while closures follow one another (429s met
-- while it is closed add none). A closure never shortens one already in place. Returns how
-- many seconds from now the key opens again.
CREATE FUNCTION @schema@.limit_close(closed_key text, until timestamptz, reason text)
RETURNS float8
LANGUAGE sql AS $$
    INSERT INTO @schema@.limits AS l (key, closed_until, closed_reason, closures, updated_at)
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

REVOKE ALL ON FUNCTION @schema@.limit_room(text[], integer),
                       @schema@.limit_take(text[], integer, float8),
                       @schema@.limit_acquire(text, integer, float8),
                       @schema@.limit_settle(text, float8, boolean),
                       @schema@.limit_close(text, timestamptz, text) FROM PUBLIC;
