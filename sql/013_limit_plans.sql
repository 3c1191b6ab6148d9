-- 013: flow control's functions keep their plans. PostgreSQL's plan cache kept planning anew,
-- at every claim, each statement that filters on `key = ANY(keys)`, which cost more than running
-- it. These functions now keep one generic plan per statement. In limit_room, the count of a
-- stage's leased runs is held to the claim index (a generic plan does not know how few runs a
-- working status has, and would read the whole table).

ALTER FUNCTION @schema@.limit_take(text[], integer, float8)
    SET plan_cache_mode = force_generic_plan;

ALTER FUNCTION @schema@.limit_room(text[], integer)
    SET plan_cache_mode = force_generic_plan
    SET enable_seqscan = off
    SET enable_bitmapscan = off;
