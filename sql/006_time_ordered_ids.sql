-- 006: run ids in creation order (UUID version 7, RFC 9562).
-- @schema@ is replaced by the quoted, validated schema name when the migration is applied.

-- Every claim and completion writes a new version of its row, which puts a new entry in the
-- primary key's index next to the old one. With random ids those entries land all over the
-- index: once history outgrows shared_buffers, every move reads and dirties a page of its own
-- (and logs it whole after each checkpoint). Ids that grow with time keep the runs in flight
-- together at the index's right edge. The first 48 bits are the Unix time in milliseconds, then
-- the version (7), then random bits (74 of them), so ids stay unguessable enough for links and
-- unique without coordination. PostgreSQL 18 has uuidv7() built in; this one runs on every
-- supported version. Existing ids are left as they are.
CREATE FUNCTION @schema@.uuid_v7() RETURNS uuid
    LANGUAGE sql VOLATILE PARALLEL SAFE
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

ALTER TABLE @schema@.pipeline_runs ALTER COLUMN id SET DEFAULT @schema@.uuid_v7();
