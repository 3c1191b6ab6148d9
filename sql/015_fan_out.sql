-- 015: fan-out and join. A stage may end its run's turn by creating child runs; the parent waits
-- in its stage's waiting status until every child has finished, then moves on to the stage that
-- joins them. Children are ordinary runs with the parent's id and their index among its children.
-- The join is counted, never searched for: the parent keeps how many children are still
-- running, and each child takes one off as it finishes (run_finished).
-- @schema@ is replaced by the quoted, validated schema name when the migration is applied.
ALTER TABLE @schema@.pipeline_runs
    ADD COLUMN parent_id uuid,
    ADD COLUMN child_index integer,
    ADD COLUMN children_pending integer,
    ADD COLUMN fan_out jsonb;

COMMENT ON COLUMN @schema@.pipeline_runs.parent_id IS
    'The run that created this one as a child (docs/pipelines.md, "Fan-out and join").';
COMMENT ON COLUMN @schema@.pipeline_runs.children_pending IS
    'Children of the current fan-out not finished yet; the parent joins when it reaches 0.';
COMMENT ON COLUMN @schema@.pipeline_runs.fan_out IS
    'The current fan-out: waiting and join statuses, fail_fast, first child index, width.';

-- One child per index per parent: a fan-out is created once, and the join reads it in order.
CREATE UNIQUE INDEX pipeline_runs_children ON @schema@.pipeline_runs (parent_id, child_index)
    WHERE parent_id IS NOT NULL;

-- A run finished (its finished_at set, by whichever statement: a completion, a final failure,
-- a rescue given up, a cancel).
-- * A child: its parent, if it waits for this fan-out, has one child fewer to wait for. The last
--   one moves the parent to its join status; a failed or cancelled one, under fail_fast, fails
--   the parent at once.
-- * A parent that ends while children of its fan-out still run (cancelled, or failed by one of
--   them): those children are cancelled, and theirs in turn.
-- Completions that may end children lock the parents first, in id order (complete_if_leased's
-- `parents`), so two batches never wait for each other's parent rows the other way round.
CREATE FUNCTION @schema@.run_finished() RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
    child_failed boolean := NEW.status IN ('FAILED', 'CANCELLED');
    fail_now boolean;
    parent record;
    moved_to text;
    moved_error text;
BEGIN
    IF NEW.children_pending > 0 THEN
        WITH cancelled AS (
            UPDATE @schema@.pipeline_runs c
               SET status = 'CANCELLED', lease_owner = NULL, lease_expires_at = NULL,
                   last_error = format('cancelled: its parent run %s ended %s', NEW.id,
                                       NEW.status),
                   updated_at = now(), finished_at = now()
              FROM (SELECT id, status FROM @schema@.pipeline_runs
                     WHERE parent_id = NEW.id AND finished_at IS NULL
                     ORDER BY id FOR UPDATE) running
             WHERE c.id = running.id
            RETURNING c.id, c.pipeline, running.status AS from_status, c.last_error
        )
        INSERT INTO @schema@.run_events (run_id, pipeline, from_status, to_status, error)
        SELECT id, pipeline, from_status, 'CANCELLED', last_error FROM cancelled;
    END IF;
    IF NEW.parent_id IS NOT NULL
       AND (current_setting('conveyor.children_counted', true) IS DISTINCT FROM 'on'
            OR OLD.status = OLD.fan_out ->> 'waiting') THEN
        -- Counted apart from the move: most children change neither the parent's status nor
        -- an indexed column, so their update stays cheap (a HOT update, no wake-up queued).
        UPDATE @schema@.pipeline_runs p
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
            UPDATE @schema@.pipeline_runs p
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
            INSERT INTO @schema@.run_events (run_id, pipeline, from_status, to_status, error)
            VALUES (parent.id, parent.pipeline, parent.fan_out ->> 'waiting', moved_to,
                    CASE WHEN fail_now THEN moved_error END);
        END IF;
    END IF;
    RETURN NULL;
END
$$;

-- The engine's completions (complete_if_leased, fail_if_leased) count their children on the
-- parents themselves, once per parent per statement, and say so for their transaction with
-- conveyor.children_counted; a waiting parent that ends is still counted here, as is every
-- child ended by any other statement (a cancel, a rescue given up, plain SQL).
CREATE TRIGGER run_finished AFTER UPDATE OF finished_at ON @schema@.pipeline_runs
    FOR EACH ROW
    WHEN (OLD.finished_at IS NULL AND NEW.finished_at IS NOT NULL
          AND ((NEW.parent_id IS NOT NULL
                AND (current_setting('conveyor.children_counted', true) IS DISTINCT FROM 'on'
                     OR OLD.status = OLD.fan_out ->> 'waiting'))
               OR NEW.children_pending > 0))
    EXECUTE FUNCTION @schema@.run_finished();

-- A child inserted by hand (plain SQL, with a parent_id) joins like the others while its parent
-- waits for its fan-out: child_added numbers it (its child_index is the engine's to give) and
-- child_counted counts it on the parent once it is really inserted (an INSERT ... ON CONFLICT DO
-- NOTHING that skips it counts nothing). Any other parent refuses it with an error. The
-- engine's own children (the fan_out statement, which sets conveyor.fan_out for its
-- transaction) are numbered and counted by that statement.
CREATE FUNCTION @schema@.child_added() RETURNS trigger
LANGUAGE plpgsql AS $$
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
      FROM @schema@.pipeline_runs p WHERE p.id = NEW.parent_id
       FOR NO KEY UPDATE;
    IF parent.id IS NULL OR parent.finished_at IS NOT NULL OR parent.fan_out IS NULL
       OR parent.status IS DISTINCT FROM parent.fan_out ->> 'waiting' THEN
        RAISE EXCEPTION 'run % is not waiting for children: a child may be added only while its parent waits for its fan-out',
                        NEW.parent_id
              USING ERRCODE = 'check_violation';
    END IF;
    NEW.child_index := (SELECT coalesce(max(c.child_index) + 1, 0)
                          FROM @schema@.pipeline_runs c WHERE c.parent_id = NEW.parent_id);
    RETURN NEW;
END
$$;

CREATE FUNCTION @schema@.child_counted() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    UPDATE @schema@.pipeline_runs SET children_pending = children_pending + 1, updated_at = now()
     WHERE id = NEW.parent_id;
    RETURN NULL;
END
$$;

CREATE TRIGGER child_added BEFORE INSERT ON @schema@.pipeline_runs
    FOR EACH ROW
    WHEN (NEW.parent_id IS NOT NULL
          AND current_setting('conveyor.fan_out', true) IS DISTINCT FROM 'on')
    EXECUTE FUNCTION @schema@.child_added();

CREATE TRIGGER child_counted AFTER INSERT ON @schema@.pipeline_runs
    FOR EACH ROW
    WHEN (NEW.parent_id IS NOT NULL
          AND current_setting('conveyor.fan_out', true) IS DISTINCT FROM 'on')
    EXECUTE FUNCTION @schema@.child_counted();

-- Retention keeps a finished child while its parent has not finished: the join reads it.
CREATE OR REPLACE FUNCTION @schema@.prune_finished(older_than_seconds float8, only_pipeline text)
RETURNS SETOF uuid
LANGUAGE sql SECURITY DEFINER AS $$
    WITH doomed AS (
        SELECT r.id FROM @schema@.pipeline_runs r
         WHERE r.finished_at OPERATOR(pg_catalog.<) (pg_catalog.now() OPERATOR(pg_catalog.-)
               pg_catalog.make_interval(secs => greatest(older_than_seconds, 0)))
           AND (only_pipeline IS NULL OR r.pipeline OPERATOR(pg_catalog.=) only_pipeline)
           AND (r.parent_id IS NULL
                OR NOT EXISTS (SELECT 1 FROM @schema@.pipeline_runs p
                                WHERE p.id OPERATOR(pg_catalog.=) r.parent_id
                                  AND p.finished_at IS NULL))
         LIMIT 1000
           FOR UPDATE SKIP LOCKED
    ), events AS (
        DELETE FROM @schema@.run_events e USING doomed d
         WHERE e.run_id OPERATOR(pg_catalog.=) d.id
    )
    DELETE FROM @schema@.pipeline_runs r USING doomed d
     WHERE r.id OPERATOR(pg_catalog.=) d.id
    RETURNING r.id
$$;
REVOKE ALL ON FUNCTION @schema@.prune_finished(float8, text) FROM PUBLIC;
