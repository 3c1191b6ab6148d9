-- 022: run ids from PostgreSQL's own uuidv7() on servers that have it (PostgreSQL 18 on).
-- Same layout as 006's (the creation time's milliseconds in the first 48 bits, version 7,
-- random bits), and PostgreSQL's also counts within the millisecond, so the ids one session
-- makes always increase: runs submitted together are listed by id in the order they were
-- inserted (the console's runs list). It is also a little cheaper (3.2 us an id against 4.0
-- on the 2-core machine, most of both the strong random bits). Elsewhere 006's function
-- stays. The body names the function as text, resolved when called: a dump of the schema
-- still restores on a server without it (whose new ids then fail until 006's is put back).
DO $$
BEGIN
    IF to_regprocedure('pg_catalog.uuidv7()') IS NOT NULL THEN
        CREATE OR REPLACE FUNCTION @schema@.uuid_v7() RETURNS uuid
            LANGUAGE sql VOLATILE PARALLEL SAFE
            AS 'SELECT pg_catalog.uuidv7()';
    END IF;
END
$$;
