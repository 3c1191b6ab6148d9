-- 001: the three tables of the brief, the worker registry and the triggers.
-- @schema@ is replaced by the quoted, validated schema name when the migration is applied.

CREATE TABLE @schema@.pipeline_runs (
    id               uuid        PRIMARY KEY DEFAULT gen_random_uuid(),
    pipeline         text        NOT NULL DEFAULT 'agents',
    status           text        NOT NULL DEFAULT 'NEW',
    input            jsonb       NOT NULL DEFAULT '{}',
    -- one key per completed stage: {"analyze": {...}, "assemble": {...}}
    outputs          jsonb       NOT NULL DEFAULT '{}',
    priority         smallint    NOT NULL DEFAULT 0,      -- higher runs sooner
    run_after        timestamptz NOT NULL DEFAULT now(),  -- delay and retry backoff
    attempt          integer     NOT NULL DEFAULT 0,      -- executions started in the current stage
    rescues          integer     NOT NULL DEFAULT 0,      -- times its worker died under it
    lease_owner      text,
    lease_expires_at timestamptz,
    last_error       text,
    idempotency_key  text,
    created_at       timestamptz NOT NULL DEFAULT now(),
    updated_at       timestamptz NOT NULL DEFAULT now(),  -- the last transition
    finished_at      timestamptz,                         -- set on a terminal status
    CONSTRAINT pipeline_runs_input_is_object CHECK (jsonb_typeof(input) = 'object'),
    CONSTRAINT pipeline_runs_idempotency UNIQUE (pipeline, idempotency_key)
);

-- The claim's index: only unfinished rows, so a million finished runs never slow a claim.
CREATE INDEX pipeline_runs_claimable
    ON @schema@.pipeline_runs (pipeline, status, priority DESC, run_after)
    WHERE finished_at IS NULL;

-- Operators' views of failures (`retry --failed`, the console) without scanning history.
CREATE INDEX pipeline_runs_failed ON @schema@.pipeline_runs (pipeline, finished_at)
    WHERE status = 'FAILED';

-- History and pruning.
CREATE INDEX pipeline_runs_finished ON @schema@.pipeline_runs (finished_at)
    WHERE finished_at IS NOT NULL;

CREATE TABLE @schema@.run_events (
    id                bigint      GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    run_id            uuid        NOT NULL,
    pipeline          text        NOT NULL,
    stage             text,
    from_status       text,
    to_status         text        NOT NULL,
    attempt           integer,
    worker            text,
    started_at        timestamptz,           -- when the attempt was claimed
    duration          interval,              -- handler time of the attempt
    error             text,
    model             text,
    prompt_tokens     integer,
    completion_tokens integer,
    created_at        timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX run_events_run ON @schema@.run_events (run_id, id);

CREATE TABLE @schema@.memory (
    id         bigint      GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    namespace  text        NOT NULL DEFAULT 'default',
    kind       text        NOT NULL DEFAULT 'document'
               CHECK (kind IN ('document', 'message', 'fact')),
    content    text        NOT NULL,
    metadata   jsonb       NOT NULL DEFAULT '{}',
    search     tsvector    GENERATED ALWAYS AS (to_tsvector('english', content)) STORED,
    created_at timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX memory_search ON @schema@.memory USING gin (search);
CREATE INDEX memory_namespace ON @schema@.memory (namespace, kind, created_at);

-- Live worker processes, kept fresh by heartbeats. Unlogged: it is rebuilt by the next beats
-- after a crash, and its writes should not cost WAL. A worker with free slots and nothing to do
-- sets waiting_for, which is what makes the wake-up trigger notify at all.
CREATE UNLOGGED TABLE @schema@.workers (
    worker_id    text        PRIMARY KEY,
    pipeline     text        NOT NULL,
    stage        text        NOT NULL,
    consumes     text        NOT NULL,
    channel      text        NOT NULL,
    hostname     text        NOT NULL,
    pid          integer     NOT NULL,
    started_at   timestamptz NOT NULL DEFAULT now(),
    heartbeat_at timestamptz NOT NULL DEFAULT now(),
    expires_at   timestamptz NOT NULL,
    waiting      boolean     NOT NULL DEFAULT false
);

-- Wake-up: a deferred constraint trigger runs just before commit, and notifies a stage's channel
-- only when one of its workers is waiting. Under load nobody waits, so inserts never take the
-- commit-time NOTIFY lock; identical notifications in one transaction are folded into one by
-- PostgreSQL, so a 10,000-row insert sends one message per waiting channel.
CREATE FUNCTION @schema@.wake_waiting_workers() RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
    waiting_channel text;
BEGIN
    IF NEW.finished_at IS NULL THEN
        SELECT w.channel INTO waiting_channel
          FROM @schema@.workers w
         WHERE w.waiting AND w.pipeline = NEW.pipeline AND w.consumes = NEW.status
           AND w.expires_at > now()
         LIMIT 1;
        IF waiting_channel IS NOT NULL THEN
            PERFORM pg_notify(waiting_channel, '');
        END IF;
    END IF;
    RETURN NULL;
END
$$;

CREATE CONSTRAINT TRIGGER wake_waiting_workers
    AFTER INSERT OR UPDATE OF status ON @schema@.pipeline_runs
    DEFERRABLE INITIALLY DEFERRED
    FOR EACH ROW EXECUTE FUNCTION @schema@.wake_waiting_workers();

-- The origin design's observer channel: one {id, status, operation} per changed run on
-- `pipeline_events`. On by default; `conveyor observer off` turns it off for a database
-- (README, "Performance").
CREATE FUNCTION @schema@.notify_pipeline_change() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('pipeline_events',
        json_build_object('id', NEW.id, 'status', NEW.status, 'operation', TG_OP)::text);
    RETURN NULL;
END
$$;

CREATE TRIGGER pipeline_events_insert
    AFTER INSERT ON @schema@.pipeline_runs
    FOR EACH ROW EXECUTE FUNCTION @schema@.notify_pipeline_change();

CREATE TRIGGER pipeline_events_update
    AFTER UPDATE OF status ON @schema@.pipeline_runs
    FOR EACH ROW WHEN (OLD.status IS DISTINCT FROM NEW.status)
    EXECUTE FUNCTION @schema@.notify_pipeline_change();
