-- 020: a limit's bounds are checked when they are written, not at every update of its row.
-- PostgreSQL compiles and evaluates every CHECK constraint of a table at every UPDATE, whatever
-- columns it sets, and `limits` is updated by every claim under a rate (its bucket) and by every
-- Run.acquire and settle: its four constraints cost each of them some 20 us (pgbench, on the
-- 2-core machine: 0.097 ms per bucket update with them, 0.077 without). As in 019, two
-- triggers do the same checks only when the checked columns are written, with the same SQLSTATE
-- (23514, check_violation) and the name of the constraint each check replaces: BEFORE INSERT,
-- and AFTER UPDATE OF the checked columns (an AFTER trigger does not lock the row first).
-- The constraints are dropped first: their ACCESS EXCLUSIVE lock is the strongest this
-- migration takes (see 019). No table rewrite.

ALTER TABLE @schema@.limits
    DROP CONSTRAINT limits_key_length,
    DROP CONSTRAINT limits_max_in_flight,
    DROP CONSTRAINT limits_rpm,
    DROP CONSTRAINT limits_tpm;

-- The name of the bound a limit's row breaks, NULL if none. A standard SQL body: parsed here,
-- with its operators resolved once (and named in pg_catalog), not under the search_path of
-- whoever writes a limit. The rates have a floor as well as a ceiling: below a thousandth of a
-- unit per minute, the intervals the buckets compute overflow, and every claim under the key
-- would fail.
CREATE FUNCTION @schema@.limit_out_of_bounds(limit_row @schema@.limits) RETURNS text
LANGUAGE sql IMMUTABLE
RETURN CASE
    WHEN NOT coalesce(pg_catalog.octet_length(limit_row.key) OPERATOR(pg_catalog.>=) 1
                      AND pg_catalog.octet_length(limit_row.key) OPERATOR(pg_catalog.<=) 200,
                      true)
        THEN 'limits_key_length'
    WHEN NOT coalesce(limit_row.max_in_flight OPERATOR(pg_catalog.>=) 0, true)
        THEN 'limits_max_in_flight'
    WHEN NOT coalesce(limit_row.requests_per_minute OPERATOR(pg_catalog.>=) 0.001::float8
                      AND limit_row.requests_per_minute OPERATOR(pg_catalog.<=) 1e9::float8,
                      true)
        THEN 'limits_rpm'
    WHEN NOT coalesce(limit_row.tokens_per_minute OPERATOR(pg_catalog.>=) 0.001::float8
                      AND limit_row.tokens_per_minute OPERATOR(pg_catalog.<=) 1e12::float8,
                      true)
        THEN 'limits_tpm'
END;

CREATE FUNCTION @schema@.refuse_limit_out_of_bounds() RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
    broken pg_catalog.text := @schema@.limit_out_of_bounds(NEW);
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

CREATE TRIGGER limits_in_bounds
    BEFORE INSERT ON @schema@.limits
    FOR EACH ROW
    WHEN (@schema@.limit_out_of_bounds(NEW) IS NOT NULL)
    EXECUTE FUNCTION @schema@.refuse_limit_out_of_bounds();

CREATE TRIGGER limits_in_bounds_updated
    AFTER UPDATE OF key, max_in_flight, requests_per_minute, tokens_per_minute
    ON @schema@.limits
    FOR EACH ROW
    WHEN (@schema@.limit_out_of_bounds(NEW) IS NOT NULL)
    EXECUTE FUNCTION @schema@.refuse_limit_out_of_bounds();
