-- The protocol, in one place. Each statement sits under a `-- name --` header; `@schema@` is
-- replaced by the quoted schema name when the file is loaded. Every guard that makes a transition
-- safe is in the statement itself: the claim's SKIP LOCKED, and the fence
-- `status = <working> AND lease_owner = <me>` on everything a worker does to a run it leased.

-- claim_batch --
-- Lease up to `batch` due runs of one stage: best priority first, then the longest waiting.
-- One statement, one short transaction; ready_at (when the run became claimable) feeds the
-- wake-up latency metric.
-- A run that has been rescued (its worker died under it) may have killed that worker, so it runs
-- alone: only a worker with nothing in flight may take one (`alone`), and then takes only it. The
-- runs that shared the dead worker with it are not claimed beside it again, and cannot be killed
-- with it a second time.
-- The claim commits without waiting for its WAL flush (synchronous_commit off for this
-- transaction only): a claim lost in a server crash just puts the run back where it was, which
-- the at-least-once contract allows, and any later flushed commit (the one that ends the run at
-- the latest) makes the claim before it durable too. It saves a disk flush on the path from
-- commit to handler.
-- The worker writes the number of runs it asks for into the statement in place of %(batch)s
-- (StageProtocol.claim, a handful of sizes per stage), and PostgreSQL then keeps one plan for
-- it. With a parameter there, its generic plan would guess a tenth of the queue, so it planned
-- every claim anew instead (~0.2-0.3 ms on the path from commit to handler).
WITH candidates AS (
    SELECT id, greatest(run_after, updated_at) AS ready_at, rescues > 0 AS rescued, priority,
           run_after
      FROM @schema@.pipeline_runs
     WHERE pipeline = %(pipeline)s AND status = %(consumes)s
       AND finished_at IS NULL AND run_after <= now()
       AND (rescues = 0 OR %(alone)s)
     ORDER BY priority DESC, run_after
     LIMIT %(batch)s
       FOR UPDATE SKIP LOCKED
), picked AS (
    -- the first rescued candidate alone when there is one, else every candidate
    SELECT * FROM candidates WHERE NOT EXISTS (SELECT 1 FROM candidates WHERE rescued)
    UNION ALL
    (SELECT * FROM candidates WHERE rescued ORDER BY priority DESC, run_after LIMIT 1)
)
UPDATE @schema@.pipeline_runs r
   SET status = %(working)s,
       lease_owner = %(worker)s,
       lease_expires_at = now() + make_interval(secs => %(lease_seconds)s),
       attempt = r.attempt + 1,
       updated_at = now()
  FROM picked
 WHERE r.id = picked.id
   AND set_config('synchronous_commit', 'off', true) IS NOT NULL
RETURNING r.id, r.input, r.outputs, r.attempt,
          extract(epoch FROM clock_timestamp() - picked.ready_at)::float8 AS waited_seconds,
          picked.rescued;

-- declare_limit --
-- A limit as a stage (or the environment) declares it, written when a worker starts; the state
-- of its buckets and closures is kept.
INSERT INTO @schema@.limits AS l
       (key, max_in_flight, requests_per_minute, tokens_per_minute, updated_at)
VALUES (%(key)s, %(max_in_flight)s, %(requests_per_minute)s, %(tokens_per_minute)s, now())
ON CONFLICT (key) DO UPDATE
   SET max_in_flight = excluded.max_in_flight,
       requests_per_minute = excluded.requests_per_minute,
       tokens_per_minute = excluded.tokens_per_minute,
       updated_at = now()
 WHERE (l.max_in_flight, l.requests_per_minute, l.tokens_per_minute)
       IS DISTINCT FROM (excluded.max_in_flight, excluded.requests_per_minute,
                         excluded.tokens_per_minute);

-- lock_limit_keys --
-- First in the transaction that writes a stage's limits (FlowControl.declare_on): the advisory
-- locks a claim under those keys takes (limit_room), in key order, for the keys the stage
-- declares and those it is listed under. Claims write the keys' bounds (limit_places), which
-- a change to limit_stages clears: the two then follow one another, never each waiting for a
-- row the other holds.
SELECT count(pg_catalog.pg_advisory_xact_lock(pg_catalog.hashtext('conveyor.limit.' || k)))
  FROM (SELECT k FROM unnest(%(keys)s::text[]) k
        UNION
        SELECT s.key FROM @schema@.limit_stages s
         WHERE s.pipeline = %(pipeline)s AND s.stage = %(stage)s
        ORDER BY 1) ordered;

-- forget_limit_stages --
-- Keys a stage no longer declares: its runs no longer hold their places.
DELETE FROM @schema@.limit_stages
 WHERE pipeline = %(pipeline)s AND stage = %(stage)s AND key <> ALL(%(keys)s::text[]);

-- declare_limit_stage --
INSERT INTO @schema@.limit_stages (key, pipeline, stage, working, channel)
VALUES (%(key)s, %(pipeline)s, %(stage)s, %(working)s, %(channel)s)
ON CONFLICT (key, pipeline, stage) DO UPDATE
   SET working = excluded.working, channel = excluded.channel;

-- limit_room --
-- In the claim's transaction, before claim_batch: how many runs the stage's keys allow now
-- (sql/012_flow_control.sql), each key's lock held until the claim commits. Instants go to
-- the worker as seconds from now: its clock need not agree with the server's.
SELECT room, extract(epoch FROM throttled_until - clock_timestamp())::float8, throttled_by
  FROM @schema@.limit_room(%(keys)s::text[], %(wanted)s);

-- limit_take --
-- After the claim, in its transaction: one request per run claimed.
SELECT @schema@.limit_take(%(keys)s::text[], %(requests)s, 0);

-- limit_acquire_row --
INSERT INTO @schema@.limits (key) VALUES (%(key)s) ON CONFLICT (key) DO NOTHING;

-- limit_acquire --
-- NULL when taken, else in how many seconds to try again.
SELECT extract(epoch FROM @schema@.limit_acquire(%(key)s, %(requests)s, %(tokens)s)
                          - clock_timestamp())::float8;

-- limit_settle --
SELECT @schema@.limit_settle(%(key)s, %(tokens)s, %(answered)s);

-- limit_close --
-- Seconds until the key opens again; `retry_after` NULL: the shared backoff.
SELECT @schema@.limit_close(
           %(key)s, clock_timestamp() + make_interval(secs => %(retry_after)s::float8),
           %(reason)s);

-- limit_places_freed --
-- Runs under capped keys (a cap as the table holds it now) or of a stage with groups have
-- finished: wake the workers of every stage that shares the keys, and of the stage itself
-- (a plain wake-up on each stage's channel; they claim, and the caps decide).
SELECT pg_notify(channel, '')
  FROM (SELECT s.channel
          FROM @schema@.limit_stages s
          JOIN @schema@.limits l ON l.key = s.key
         WHERE s.key = ANY(%(keys)s::text[]) AND l.max_in_flight IS NOT NULL
        UNION
        SELECT %(own_channel)s WHERE %(grouped)s) channels;

-- fair_candidates --
-- claim_batch for a stage that shares itself fairly between groups (Stage.group_by: the input
-- field that names a run's group, a tenant or a customer). Claims interleave the groups (the
-- first waiting run of every group, then the second...), and no group has more than
-- `per_group` runs leased at once. Claims of the stage follow one another (an advisory lock
-- taken before it, in the same transaction), so each counts what the one before it leased.
-- It ranks the stage's whole backlog: a cost the ungrouped claim does not pay. Not a statement
-- of its own: the CTEs that stand for claim_batch's candidates; conveyor/claims.py puts
-- claim_batch's picked and UPDATE after them (claim_fair).
WITH busy AS (
    SELECT input ->> %(group_field)s AS grp, count(*) AS held
      FROM @schema@.pipeline_runs
     WHERE pipeline = %(pipeline)s AND status = %(working)s AND finished_at IS NULL
       AND lease_expires_at > now()
     GROUP BY 1
), queued AS (
    SELECT id, rescues > 0 AS rescued, priority, run_after,
           greatest(run_after, updated_at) AS ready_at, input ->> %(group_field)s AS grp,
           row_number() OVER (PARTITION BY input ->> %(group_field)s
                              ORDER BY priority DESC, run_after) AS nth
      FROM @schema@.pipeline_runs
     WHERE pipeline = %(pipeline)s AND status = %(consumes)s
       AND finished_at IS NULL AND run_after <= now()
       AND (rescues = 0 OR %(alone)s)
), chosen AS (
    SELECT q.*
      FROM queued q LEFT JOIN busy b ON b.grp IS NOT DISTINCT FROM q.grp
     WHERE q.nth + coalesce(b.held, 0) <= %(per_group)s
     ORDER BY q.rescued DESC, q.nth, q.priority DESC, q.run_after
     LIMIT %(batch)s
), candidates AS (
    SELECT c.*
      FROM @schema@.pipeline_runs r JOIN chosen c ON c.id = r.id
     WHERE r.status = %(consumes)s AND r.finished_at IS NULL
       FOR UPDATE OF r SKIP LOCKED

-- lock_fair_claims --
SELECT pg_advisory_xact_lock(hashtext(%(lock)s));

-- run_tokens_spent --
-- A run's token budget: what its attempts recorded so far (Run.record_usage).
SELECT coalesce(sum(coalesce(prompt_tokens, 0) + coalesce(completion_tokens, 0)), 0)::int8
  FROM @schema@.run_events
 WHERE run_id = %(id)s;

-- group_tokens_spent_today --
-- A group's daily token budget: what the group's runs of the pipeline recorded since midnight
-- UTC (through run_events_created).
SELECT coalesce(sum(coalesce(e.prompt_tokens, 0) + coalesce(e.completion_tokens, 0)), 0)::int8
  FROM @schema@.run_events e
  JOIN @schema@.pipeline_runs r ON r.id = e.run_id
 WHERE e.created_at >= date_trunc('day', now(), 'UTC')
   AND e.pipeline = %(pipeline)s AND e.prompt_tokens IS NOT NULL
   AND r.input -> %(group_field)s = %(group)s::jsonb;

-- rescued_waiting --
-- Whether a rescued run of the stage is due: a busy worker then stops claiming until it is empty
-- and can take that run alone (claim_batch with `alone`). Asked once per sweep by busy workers.
SELECT EXISTS (
    SELECT 1 FROM @schema@.pipeline_runs
     WHERE pipeline = %(pipeline)s AND status = %(consumes)s
       AND finished_at IS NULL AND run_after <= now() AND rescues > 0
);

-- complete_if_leased --
-- Apply a batch of successful attempts, fenced: a run whose lease was lost (rescued, cancelled)
-- or that has moved on to a later attempt (rescued and claimed again, by this worker too) is
-- not touched, and its id is missing from the result. One run_events row per applied run; the
-- handlers' writes of exactly the runs returned commit in the same transaction
-- (StageProtocol.apply).
-- Only a batch that ends runs (`durable`: DONE, FAILED) waits for its WAL flush. A move to the
-- next stage commits without waiting (synchronous_commit off for this transaction): a server
-- crash can lose the last such moves (~0.6 s of them), which leaves those runs leased in their
-- working status as if the attempt had not finished; the rescue then runs the stage again, as
-- after any crash (at-least-once execution, exactly-once transition). WAL is one sequence, so
-- any flushed commit makes every move before it durable too. This saves a disk flush per stage
-- on the way through the pipeline, and the wake-up of the next stage (sent at commit) with it.
-- Start times (since the epoch) and durations come as whole microseconds
-- (protocol.microseconds_array). What handlers recorded with Run.record_usage fills the event's
-- model, prompt_tokens and completion_tokens; those arrays may be empty (no handler of the batch
-- recorded any), and unnest pads them with NULLs.
-- A stage that routes (Stage.routes) sends each run to its own status: `targets` holds it per
-- run (NULL: the stage's `produces`), with whether it ends the run (`ends`) and, when it enters
-- a stage on a loop, that stage (`loop_stages`): a run that has run that stage max_visits times
-- already fails instead, with the error `loop_errors` holds for it (a format() string, %s the
-- visits). `loop_limits` is the count in `visits` at which it does: max_visits, less the visit
-- this completion adds when the stage sends a run back to itself. A stage on a loop counts its own visits (`counts_visits`). The
-- arrays are empty for a stage without routes or loops.
WITH finished AS (
    SELECT *
      FROM unnest(%(ids)s::uuid[], %(outputs)s::text[], %(attempts)s::int[],
                  %(started_us)s::int8[], %(durations_us)s::int8[], %(models)s::text[],
                  %(prompt_tokens)s::int[], %(completion_tokens)s::int[],
                  %(targets)s::text[], %(ends)s::bool[], %(loop_stages)s::text[],
                  %(loop_limits)s::int[], %(loop_errors)s::text[])
           AS f(id, output, attempt, started_us, duration_us, model,
                prompt_tokens, completion_tokens, target, ends, loop_stage, loop_limit,
                loop_error)
), parents AS MATERIALIZED (
    -- The parents of the runs in `lock_ids` (a batch that may end child runs, in a pipeline
    -- that fans out), locked in id order before any of those runs: each ending child counts
    -- its parent down (ended_children below; run_finished, migration 015), and two batches
    -- ending children of the same parents then queue on them in one order, never each for a
    -- parent the other holds. Empty for any other batch. (One primary-key lookup per run: a
    -- join here could be planned as a scan of every child.)
    SELECT p.id FROM @schema@.pipeline_runs p
     WHERE p.id IN (SELECT (SELECT r.parent_id FROM @schema@.pipeline_runs r WHERE r.id = l.id)
                      FROM unnest(%(lock_ids)s::uuid[]) AS l(id))
     ORDER BY p.id
       FOR NO KEY UPDATE OF p
), moved AS (
    UPDATE @schema@.pipeline_runs r
       SET status = CASE WHEN coalesce((r.visits ->> f.loop_stage)::int, 0) >= f.loop_limit
                         THEN 'FAILED' ELSE coalesce(f.target, %(produces)s) END,
           outputs = r.outputs || jsonb_build_object(%(stage)s::text, f.output::jsonb),
           attempt = 0,
           rescues = 0,
           lease_owner = NULL,
           lease_expires_at = NULL,
           last_error = CASE WHEN coalesce((r.visits ->> f.loop_stage)::int, 0) >= f.loop_limit THEN
               format(f.loop_error, coalesce((r.visits ->> f.loop_stage)::int, 0)
                                    + (f.loop_stage = %(stage)s)::int) END,
           run_after = now(),
           updated_at = now(),
           finished_at = CASE WHEN coalesce(f.ends, %(terminal)s)
                                   OR coalesce((r.visits ->> f.loop_stage)::int, 0) >= f.loop_limit
                              THEN now() END,
           visits = CASE WHEN %(counts_visits)s
                         THEN coalesce(r.visits, '{}'::jsonb) || jsonb_build_object(
                                  %(stage)s::text,
                                  coalesce((r.visits ->> %(stage)s)::int, 0) + 1)
                         ELSE r.visits END
      FROM finished f
     WHERE r.id = f.id AND r.status = %(working)s AND r.lease_owner = %(worker)s
       AND r.attempt = f.attempt
       AND (%(durable)s OR set_config('synchronous_commit', 'off', true) IS NOT NULL)
       AND (SELECT set_config('conveyor.children_counted', 'on', true)
              FROM (SELECT count(*) FROM parents) locked) IS NOT NULL
    RETURNING r.id, r.pipeline, r.status, r.last_error, f.attempt, f.started_us,
              f.duration_us, f.model, f.prompt_tokens, f.completion_tokens, r.parent_id,
              r.child_index, r.finished_at
), ended_children AS (
    -- Children this statement ended, by parent, where the parent still waits for them: each
    -- parent is counted down once per statement, not once per child (run_finished leaves the
    -- children of this statement to it: conveyor.children_counted).
    -- `fails`: a child failed and the parent fails at once (on_child_failure "fail")
    SELECT e.*, e.failure IS NOT NULL AND e.fail_fast AS fails
      FROM (SELECT m.parent_id, count(*) AS ended,
                   bool_and((p.fan_out ->> 'fail_fast')::boolean) AS fail_fast,
                   (array_agg(format('child %%s (run %%s) ended %%s: %%s',
                                     m.child_index - (p.fan_out ->> 'first')::int, m.id,
                                     m.status, coalesce(m.last_error, 'cancelled'))
                              ORDER BY m.child_index)
                       FILTER (WHERE m.status IN ('FAILED', 'CANCELLED')))[1] AS failure
              FROM moved m
              JOIN @schema@.pipeline_runs p ON p.id = m.parent_id
             WHERE m.finished_at IS NOT NULL AND m.child_index >= (p.fan_out ->> 'first')::int
             GROUP BY m.parent_id) e
), counted AS (
    UPDATE @schema@.pipeline_runs p
       SET children_pending = p.children_pending - e.ended,
           status = CASE WHEN e.fails THEN 'FAILED'
                         WHEN p.children_pending = e.ended THEN p.fan_out ->> 'join'
                         ELSE p.status END,
           last_error = CASE WHEN e.fails THEN e.failure ELSE p.last_error END,
           finished_at = CASE WHEN e.fails THEN now() END,
           run_after = CASE WHEN e.fails OR p.children_pending = e.ended THEN now()
                            ELSE p.run_after END,
           updated_at = now()
      FROM ended_children e
     WHERE p.id = e.parent_id AND p.status = p.fan_out ->> 'waiting'  -- (so not finished)
    RETURNING p.id, p.pipeline, p.fan_out ->> 'waiting' AS waiting, p.status, p.last_error
), joined AS (
    INSERT INTO @schema@.run_events (run_id, pipeline, from_status, to_status, error)
    SELECT id, pipeline, waiting, status, CASE WHEN status = 'FAILED' THEN last_error END
      FROM counted WHERE status <> waiting
)
INSERT INTO @schema@.run_events
       (run_id, pipeline, stage, from_status, to_status, attempt, worker, started_at, duration,
        error, model, prompt_tokens, completion_tokens)
SELECT id, pipeline, %(stage)s, %(consumes)s, status, attempt, %(worker)s,
       'epoch'::timestamptz + started_us * interval '1 us',
       duration_us * interval '1 us', last_error, model, prompt_tokens,
       completion_tokens
  FROM moved
RETURNING run_id, to_status;

-- fail_if_leased --
-- Apply a batch of failed attempts, fenced like completion (lease and attempt): back to the
-- input status after `retry_in` seconds, or FAILED (terminal, error kept) when retry_in is
-- NULL. Retries alone commit without waiting for their flush, as moves between stages do
-- (complete_if_leased). An `uncounted` one waited for a limit (Throttled): its attempt is
-- given back. What handlers recorded with Run.record_usage is kept on the events, as on
-- completion. Those arrays may be empty (none was, none recorded), and unnest pads them.
WITH failed AS (
    SELECT *
      FROM unnest(%(ids)s::uuid[], %(errors)s::text[], %(attempts)s::int[],
                  %(retry_in)s::float8[], %(started_us)s::int8[], %(durations_us)s::int8[],
                  %(uncounted)s::bool[], %(models)s::text[], %(prompt_tokens)s::int[],
                  %(completion_tokens)s::int[])
           AS f(id, error, attempt, retry_in, started_us, duration_us, uncounted, model,
                prompt_tokens, completion_tokens)
), parents AS MATERIALIZED (
    -- as in complete_if_leased
    SELECT p.id FROM @schema@.pipeline_runs p
     WHERE p.id IN (SELECT (SELECT r.parent_id FROM @schema@.pipeline_runs r WHERE r.id = l.id)
                      FROM unnest(%(lock_ids)s::uuid[]) AS l(id))
     ORDER BY p.id
       FOR NO KEY UPDATE OF p
), moved AS (
    UPDATE @schema@.pipeline_runs r
       SET status = CASE WHEN f.retry_in IS NULL THEN 'FAILED' ELSE %(consumes)s END,
           attempt = CASE WHEN f.uncounted THEN greatest(r.attempt - 1, 0) ELSE r.attempt END,
           run_after = CASE WHEN f.retry_in IS NULL THEN r.run_after
                            ELSE now() + make_interval(secs => f.retry_in) END,
           lease_owner = NULL,
           lease_expires_at = NULL,
           last_error = f.error,
           updated_at = now(),
           finished_at = CASE WHEN f.retry_in IS NULL THEN now() END
      FROM failed f
     WHERE r.id = f.id AND r.status = %(working)s AND r.lease_owner = %(worker)s
       AND r.attempt = f.attempt
       AND (%(durable)s OR set_config('synchronous_commit', 'off', true) IS NOT NULL)
       AND (SELECT set_config('conveyor.children_counted', 'on', true)
              FROM (SELECT count(*) FROM parents) locked) IS NOT NULL
    RETURNING r.id, r.pipeline, r.status, f.attempt, f.error, f.started_us, f.duration_us,
              f.model, f.prompt_tokens, f.completion_tokens, r.parent_id, r.child_index,
              r.finished_at, r.last_error
), ended_children AS (
    -- as in complete_if_leased
    -- `fails`: a child failed and the parent fails at once (on_child_failure "fail")
    SELECT e.*, e.failure IS NOT NULL AND e.fail_fast AS fails
      FROM (SELECT m.parent_id, count(*) AS ended,
                   bool_and((p.fan_out ->> 'fail_fast')::boolean) AS fail_fast,
                   (array_agg(format('child %%s (run %%s) ended %%s: %%s',
                                     m.child_index - (p.fan_out ->> 'first')::int, m.id,
                                     m.status, coalesce(m.last_error, 'cancelled'))
                              ORDER BY m.child_index)
                       FILTER (WHERE m.status IN ('FAILED', 'CANCELLED')))[1] AS failure
              FROM moved m
              JOIN @schema@.pipeline_runs p ON p.id = m.parent_id
             WHERE m.finished_at IS NOT NULL AND m.child_index >= (p.fan_out ->> 'first')::int
             GROUP BY m.parent_id) e
), counted AS (
    UPDATE @schema@.pipeline_runs p
       SET children_pending = p.children_pending - e.ended,
           status = CASE WHEN e.fails THEN 'FAILED'
                         WHEN p.children_pending = e.ended THEN p.fan_out ->> 'join'
                         ELSE p.status END,
           last_error = CASE WHEN e.fails THEN e.failure ELSE p.last_error END,
           finished_at = CASE WHEN e.fails THEN now() END,
           run_after = CASE WHEN e.fails OR p.children_pending = e.ended THEN now()
                            ELSE p.run_after END,
           updated_at = now()
      FROM ended_children e
     WHERE p.id = e.parent_id AND p.status = p.fan_out ->> 'waiting'  -- (so not finished)
    RETURNING p.id, p.pipeline, p.fan_out ->> 'waiting' AS waiting, p.status, p.last_error
), joined AS (
    INSERT INTO @schema@.run_events (run_id, pipeline, from_status, to_status, error)
    SELECT id, pipeline, waiting, status, CASE WHEN status = 'FAILED' THEN last_error END
      FROM counted WHERE status <> waiting
)
INSERT INTO @schema@.run_events
       (run_id, pipeline, stage, from_status, to_status, attempt, worker, started_at, duration,
        error, model, prompt_tokens, completion_tokens)
SELECT id, pipeline, %(stage)s, %(working)s, status, attempt, %(worker)s,
       'epoch'::timestamptz + started_us * interval '1 us',
       duration_us * interval '1 us', error, model, prompt_tokens, completion_tokens
  FROM moved
RETURNING run_id, to_status;

-- fan_out --
-- After complete_if_leased, in its transaction, for the runs it stored of a stage that fans out:
-- the children of those that fanned out (`widths` > 0), in one statement whatever the width,
-- numbered on from the parent's earlier children and counted on the parent, which joins when
-- the last of them finishes (run_finished, migration 015). They take the parent's priority.
-- A run that created no children this time forgets an earlier fan-out, so that its join sees
-- none of those. `conveyor.fan_out` tells the hand-insert triggers (child_added, child_counted)
-- that these children are numbered and counted here.
WITH parents AS (
    UPDATE @schema@.pipeline_runs p
       SET children_pending = f.width,
           fan_out = CASE WHEN f.width > 0 THEN
                         jsonb_build_object('waiting', %(waiting)s::text,
                                            'join', %(produces)s::text,
                                            'fail_fast', %(fail_fast)s::boolean,
                                            'first', n.first, 'width', f.width) END
      FROM unnest(%(parents)s::uuid[], %(widths)s::int[]) AS f(id, width),
           LATERAL (SELECT coalesce(max(c.child_index) + 1, 0) AS first
                      FROM @schema@.pipeline_runs c WHERE c.parent_id = f.id) n
     WHERE p.id = f.id
       AND CASE WHEN f.width > 0 THEN p.status = %(waiting)s ELSE p.fan_out IS NOT NULL END
       AND set_config('conveyor.fan_out', 'on', true) IS NOT NULL
    RETURNING p.id, p.priority, n.first
)
INSERT INTO @schema@.pipeline_runs (pipeline, status, input, priority, parent_id, child_index)
SELECT c.pipeline, c.status, c.input::jsonb, p.priority, c.parent_id, p.first + c.index
  FROM unnest(%(child_parents)s::uuid[], %(child_indexes)s::int[], %(child_pipelines)s::text[],
              %(child_statuses)s::text[], %(child_inputs)s::text[])
           AS c(parent_id, index, pipeline, status, input)
  JOIN parents p ON p.id = c.parent_id;

-- children_of --
-- The children of a run's current fan-out, in order: what the stage that joins them sees.
SELECT c.child_index - (p.fan_out ->> 'first')::int, c.id, c.status, c.outputs, c.last_error
  FROM @schema@.pipeline_runs p
  JOIN @schema@.pipeline_runs c ON c.parent_id = p.id
                               AND c.child_index >= (p.fan_out ->> 'first')::int
 WHERE p.id = %(id)s
 ORDER BY c.child_index;

-- release_if_leased --
-- Give back runs this worker will not finish (shutdown, or a hand-off it cannot take): due at
-- once, and the interrupted attempt is not counted against the run.
WITH moved AS (
    UPDATE @schema@.pipeline_runs r
       SET status = %(consumes)s,
           attempt = greatest(r.attempt - 1, 0),
           lease_owner = NULL,
           lease_expires_at = NULL,
           run_after = now(),
           updated_at = now()
     WHERE r.id = ANY(%(ids)s::uuid[]) AND r.status = %(working)s AND r.lease_owner = %(worker)s
    RETURNING r.id, r.pipeline, r.attempt
)
INSERT INTO @schema@.run_events
       (run_id, pipeline, stage, from_status, to_status, attempt, worker, error)
SELECT id, pipeline, %(stage)s, %(working)s, %(consumes)s, attempt + 1, %(worker)s,
       'released: ' || %(reason)s
  FROM moved
RETURNING run_id;

-- leased_to_worker --
-- The runs this worker holds a lease on, as the database sees it: after its listener was away,
-- those it never heard were handed to it (migration 007) and are released. Each with its
-- attempt and lease expiry written as hand_off() writes them: a hand-off of that lease heard
-- after the release is then refused as a replay (a lease written by hand without an expiry:
-- 0, which no hand-off carries).
-- Through pipeline_runs_claimable: the runs in flight at the stage, a bounded number.
SELECT id, attempt, coalesce(extract(epoch FROM lease_expires_at)::text, '0')
  FROM @schema@.pipeline_runs
 WHERE pipeline = %(pipeline)s AND status = %(working)s AND finished_at IS NULL
   AND lease_owner = %(worker)s;

-- extend_leases --
-- Heartbeat for in-flight runs. An id missing from the result has been taken away (rescued or
-- cancelled): its handler is interrupted and its result would be refused anyway.
-- A run whose row another transaction holds is skipped, not waited for: as a rule it is this
-- worker's own completer committing its result, which locks the same rows in another order,
-- and waiting for it can deadlock. A skipped run whose lease has not expired counts as held
-- (its lease is extended at the next beat, a third of a lease later); one whose lease has
-- expired is what a rescue takes, and counts as gone.
WITH owned AS (
    SELECT id, lease_expires_at FROM @schema@.pipeline_runs
     WHERE id = ANY(%(ids)s::uuid[]) AND status = %(working)s AND lease_owner = %(worker)s
), free AS (
    SELECT id FROM @schema@.pipeline_runs
     WHERE id IN (SELECT id FROM owned) AND status = %(working)s AND lease_owner = %(worker)s
       FOR UPDATE SKIP LOCKED
), extended AS (
    UPDATE @schema@.pipeline_runs r
       SET lease_expires_at = now() + make_interval(secs => %(lease_seconds)s)
      FROM free
     WHERE r.id = free.id
    RETURNING r.id
)
SELECT id FROM owned
 WHERE id IN (SELECT id FROM extended) OR lease_expires_at > now();

-- rescue_expired --
-- Runs whose lease ran out go back to the stage's input status. When their worker stopped
-- beating (it died or hung), the run may be what killed it: that counts as a rescue, the run
-- then runs alone (claim_batch), and after `max_rescues` of them it is FAILED, so a handler that
-- kills its worker every time cannot loop forever. When the worker is still alive in the
-- registry, it no longer holds the run: its move to the next stage was committed without a
-- flush and lost in a server crash or failover (complete_if_leased). The run did nothing wrong;
-- it goes back without a rescue counted against it, while its attempts last (each claim counts
-- one): a run that keeps coming back this way is counted again. Alive means it beat within the
-- last half of its TTL (= the lease): a live worker beats every third of it, while the last beat
-- of a dead one is at least two thirds of a lease older than the expiry of the leases it left
-- behind. The registry is unlogged, so it is empty after a crash until the workers beat again:
-- a new leader waits half a lease before its first rescue (conveyor/maintenance.py). The fence
-- is the expired lease itself, re-checked under lock.
WITH expired AS (
    SELECT id, lease_owner, owner_alive, owner_alive AND attempt < %(max_attempts)s AS forgiven
      FROM (SELECT id, lease_owner, attempt,
                   EXISTS (SELECT 1 FROM @schema@.workers w
                            WHERE w.worker_id = lease_owner
                              AND now() - w.heartbeat_at < (w.expires_at - w.heartbeat_at) / 2
                          ) AS owner_alive
              FROM @schema@.pipeline_runs
             WHERE pipeline = %(pipeline)s AND status = %(working)s
               AND finished_at IS NULL AND lease_expires_at < now()
             LIMIT 1000
               FOR UPDATE SKIP LOCKED) locked
), moved AS (
    UPDATE @schema@.pipeline_runs r
       SET status = CASE WHEN NOT e.forgiven AND r.rescues >= %(max_rescues)s THEN 'FAILED'
                         ELSE %(consumes)s END,
           rescues = r.rescues + CASE WHEN e.forgiven THEN 0 ELSE 1 END,
           lease_owner = NULL,
           lease_expires_at = NULL,
           last_error = 'lease expired: worker ' || e.lease_owner
                        || CASE WHEN e.owner_alive THEN ' is alive but no longer held the run'
                                ELSE ' stopped beating' END,
           run_after = now(),
           updated_at = now(),
           finished_at = CASE WHEN NOT e.forgiven AND r.rescues >= %(max_rescues)s
                              THEN now() END
      FROM expired e
     WHERE r.id = e.id
    RETURNING r.id, r.pipeline, r.status, r.attempt, r.last_error, e.lease_owner
)
INSERT INTO @schema@.run_events
       (run_id, pipeline, stage, from_status, to_status, attempt, worker, error)
SELECT id, pipeline, %(stage)s, %(working)s, status, attempt, lease_owner, last_error
  FROM moved
RETURNING run_id, to_status, attempt, worker;

-- beat_worker --
-- Register or refresh this worker in the registry; `waiting` arms the wake-up trigger, which
-- hands a run that becomes claimable to a waiting worker with its working status and lease, up
-- to `free_slots` runs, signed with `secret` (hand_off in sql/schema.sql). The secret is
-- written once, with the row.
INSERT INTO @schema@.workers
       (worker_id, pipeline, stage, consumes, channel, hostname, pid, expires_at, waiting,
        working, lease_seconds, free_slots, secret)
VALUES (%(worker)s, %(pipeline)s, %(stage)s, %(consumes)s, %(channel)s, %(hostname)s, %(pid)s,
        now() + make_interval(secs => %(ttl_seconds)s), %(waiting)s, %(working)s,
        %(lease_seconds)s, %(free_slots)s, %(secret)s)
ON CONFLICT (worker_id) DO UPDATE
   SET heartbeat_at = now(), expires_at = excluded.expires_at, waiting = excluded.waiting,
       working = excluded.working, lease_seconds = excluded.lease_seconds,
       free_slots = excluded.free_slots;

-- end_dead_process_leases --
-- A worker process its supervisor saw die (SIGKILL, out of memory) left its leases behind.
-- The process that replaces it ends them now, instead of a lease later: it takes the dead
-- one's registry row away and makes its leases expire, and the rescue frees those runs at its
-- next pass (a rescue counted against each: the run may be what killed it). The dead process
-- is known by host and pid, which no live process shares with it this soon after its death
-- (Linux hands out pids in order). Through pipeline_runs_claimable: the runs in flight at the
-- stage, a bounded number.
WITH dead AS (
    DELETE FROM @schema@.workers
     WHERE hostname = %(hostname)s AND pid = %(dead_pid)s
       AND pipeline = %(pipeline)s AND stage = %(stage)s AND worker_id <> %(worker)s
    RETURNING worker_id
)
UPDATE @schema@.pipeline_runs
   SET lease_expires_at = now()
 WHERE pipeline = %(pipeline)s AND status = %(working)s AND finished_at IS NULL
   AND lease_owner IN (SELECT worker_id FROM dead)
RETURNING id;

-- forget_worker --
DELETE FROM @schema@.workers WHERE worker_id = %(worker)s;

-- forget_dead_workers --
-- Registry rows of processes that stopped beating long ago (their process is gone).
DELETE FROM @schema@.workers WHERE expires_at < now() - interval '1 hour';

-- cancel_run --
-- Cancel one unfinished run. A run in flight loses its lease, so its worker's heartbeat notices,
-- interrupts the handler, and any late completion is refused by the fence.
WITH moved AS (
    UPDATE @schema@.pipeline_runs r
       SET status = 'CANCELLED', lease_owner = NULL, lease_expires_at = NULL,
           updated_at = now(), finished_at = now()
      FROM (SELECT id, status FROM @schema@.pipeline_runs
             WHERE id = %(id)s AND finished_at IS NULL FOR UPDATE) old
     WHERE r.id = old.id
    RETURNING r.id, r.pipeline, old.status AS from_status
)
INSERT INTO @schema@.run_events (run_id, pipeline, from_status, to_status, worker)
SELECT id, pipeline, from_status, 'CANCELLED', %(actor)s FROM moved
RETURNING run_id;

-- retry_run --
-- Put one FAILED or CANCELLED run back at a stage's input status, keeping the outputs of the
-- stages before it. A child whose parent still waits for its fan-out is waited for again.
WITH moved AS (
    UPDATE @schema@.pipeline_runs r
       SET status = %(consumes)s, attempt = 0, rescues = 0, run_after = now(), last_error = NULL,
           updated_at = now(), finished_at = NULL, lease_owner = NULL, lease_expires_at = NULL,
           visits = NULL,  -- a retried run's loops start over
           children_pending = NULL  -- and a fan-out it waited for is over
      FROM (SELECT id, status FROM @schema@.pipeline_runs
             WHERE id = %(id)s AND status IN ('FAILED', 'CANCELLED') FOR UPDATE) old
     WHERE r.id = old.id
    RETURNING r.id, r.pipeline, old.status AS from_status, r.parent_id, r.child_index
), waited_for_again AS (
    UPDATE @schema@.pipeline_runs p
       SET children_pending = p.children_pending + 1, updated_at = now()
      FROM moved m
     WHERE p.id = m.parent_id AND p.finished_at IS NULL
       AND p.status = p.fan_out ->> 'waiting'
       AND m.child_index >= (p.fan_out ->> 'first')::int
)
INSERT INTO @schema@.run_events (run_id, pipeline, stage, from_status, to_status, worker)
SELECT id, pipeline, %(stage)s, from_status, %(consumes)s, %(actor)s FROM moved
RETURNING run_id;

-- failed_stage --
-- The stage a run last moved in: where a retry without --stage starts again.
SELECT stage FROM @schema@.run_events
 WHERE run_id = %(id)s AND stage IS NOT NULL ORDER BY id DESC LIMIT 1;

-- failed_runs --
-- FAILED runs of a pipeline with the stage each failed in, optionally only one stage's.
SELECT r.id, e.stage
  FROM @schema@.pipeline_runs r
  CROSS JOIN LATERAL (SELECT stage FROM @schema@.run_events
                       WHERE run_id = r.id AND stage IS NOT NULL
                       ORDER BY id DESC LIMIT 1) e
 WHERE r.pipeline = %(pipeline)s AND r.status = 'FAILED'
   AND (%(stage)s::text IS NULL OR e.stage = %(stage)s);

-- submit_run --
-- A convenience over the plain INSERT any service may write; a duplicate idempotency key returns
-- the existing run instead of a second one.
WITH inserted AS (
    INSERT INTO @schema@.pipeline_runs (pipeline, input, priority, run_after, idempotency_key)
    VALUES (%(pipeline)s, %(input)s, %(priority)s,
            now() + make_interval(secs => %(delay_seconds)s), %(idempotency_key)s)
    ON CONFLICT (pipeline, idempotency_key) WHERE idempotency_key IS NOT NULL DO NOTHING
    RETURNING id, true AS created
)
SELECT id, created FROM inserted
UNION ALL
SELECT id, false FROM @schema@.pipeline_runs
 WHERE pipeline = %(pipeline)s AND idempotency_key = %(idempotency_key)s
   AND NOT EXISTS (SELECT 1 FROM inserted);

-- submit_copy --
-- Many runs in one transaction (runs.submit_many): what a multi-row INSERT does, at bulk speed.
-- Each row still fires the triggers, but at commit: one hand-off, and one wake-up per waiting
-- stage, since PostgreSQL sends the identical notifications of a transaction once.
COPY @schema@.pipeline_runs (pipeline, input, priority) FROM STDIN;

-- status_counts --
-- Counts and oldest due age per pipeline and unfinished status (served by the claim index),
-- plus totals of the terminal statuses.
SELECT pipeline, status, count(*) AS runs,
       coalesce(extract(epoch FROM now() - min(run_after) FILTER (WHERE run_after <= now())), 0)
           AS oldest_seconds
  FROM @schema@.pipeline_runs
 WHERE finished_at IS NULL
 GROUP BY pipeline, status
UNION ALL
SELECT pipeline, status, count(*), NULL
  FROM @schema@.pipeline_runs
 WHERE finished_at IS NOT NULL
 GROUP BY pipeline, status
 ORDER BY 1, 2;

-- get_run --
SELECT id, pipeline, status, input, outputs, priority, run_after, attempt, rescues, lease_owner,
       lease_expires_at, last_error, idempotency_key, created_at, updated_at, finished_at,
       parent_id, child_index, children_pending
  FROM @schema@.pipeline_runs WHERE id = %(id)s;

-- run_children --
-- A run's children (of every fan-out), for `conveyor show` and the console: how many there are
-- in each status, and the first %(limit)s in order. Both through pipeline_runs_children.
SELECT status, count(*) AS runs FROM @schema@.pipeline_runs
 WHERE parent_id = %(id)s GROUP BY status ORDER BY status;

-- first_children --
SELECT child_index AS index, id, status FROM @schema@.pipeline_runs
 WHERE parent_id = %(id)s ORDER BY child_index LIMIT %(limit)s;

-- run_history --
SELECT id, stage, from_status, to_status, attempt, worker, started_at,
       extract(epoch FROM duration)::float8 AS duration_seconds, error, model, prompt_tokens,
       completion_tokens, created_at
  FROM @schema@.run_events WHERE run_id = %(id)s ORDER BY id;

-- stage_load --
-- What one stage has to do: due runs waiting at its input status plus runs in flight. The KEDA
-- scaler of k8s/ runs this same statement (with literals); served by pipeline_runs_claimable.
SELECT count(*) AS runs
  FROM @schema@.pipeline_runs
 WHERE pipeline = %(pipeline)s AND finished_at IS NULL
   AND ((status = %(consumes)s AND run_after <= now()) OR status = %(working)s);

-- queue_depth --
-- The maintenance leader's one look at a pipeline's queue, for the queue gauges: per unfinished
-- status, the runs due now, the runs scheduled later (delay, retry backoff) and how long the
-- oldest due run has been due. Every column is in pipeline_runs_claimable, so this reads only
-- that partial index (finished history costs nothing), and only the leader sends it.
SELECT status,
       count(*) FILTER (WHERE run_after <= now()) AS due,
       count(*) FILTER (WHERE run_after > now()) AS scheduled,
       coalesce(extract(epoch FROM now() - min(run_after) FILTER (WHERE run_after <= now())),
                0)::float8 AS oldest_due_seconds
  FROM @schema@.pipeline_runs
 WHERE pipeline = %(pipeline)s AND finished_at IS NULL
 GROUP BY status;

-- live_workers_per_stage --
-- Worker processes per stage whose heartbeat has not expired, on every host.
SELECT stage, count(*) AS workers
  FROM @schema@.workers
 WHERE pipeline = %(pipeline)s AND expires_at > now()
 GROUP BY stage;

-- limit_states --
-- Every limit as the leader publishes it, with the places taken under it now.
SELECT l.key, l.max_in_flight, l.requests_per_minute, l.tokens_per_minute,
       CASE WHEN l.closed_until > now() THEN extract(epoch FROM l.closed_until)::float8
            ELSE 0 END,
       (SELECT count(*)
          FROM @schema@.limit_stages s
          JOIN @schema@.pipeline_runs r ON r.pipeline = s.pipeline AND r.status = s.working
         WHERE s.key = l.key AND r.finished_at IS NULL AND r.lease_expires_at > now())
  FROM @schema@.limits l
 ORDER BY l.key
 LIMIT 1000;

-- notification_queue_usage --
-- The server's NOTIFY queue fill (0-1). It grows while some listener stops draining; when it is
-- full, every transaction that notifies fails at commit.
SELECT pg_notification_queue_usage();

-- newest_event --
SELECT coalesce(max(id), 0) FROM @schema@.run_events;

-- cancelled_since --
-- Cancellations recorded after a run_events id (the leader's mark), with the status each run was
-- cancelled in. A short range scan of run_events' primary key.
SELECT id, from_status
  FROM @schema@.run_events
 WHERE id > %(after)s AND pipeline = %(pipeline)s AND to_status = 'CANCELLED'
 ORDER BY id;

-- prune_finished --
-- Delete up to 1000 finished runs older than the retention, with their history. Called in a
-- loop by the leader (or `conveyor prune`) so no single statement holds many locks for long.
-- Through a function with its owner's rights: the worker role cannot delete history itself.
SELECT id FROM @schema@.prune_finished(%(older_than_seconds)s, %(pipeline)s::text) AS pruned(id);

-- analyze_runs_if_grown --
-- At every leader tick: ANALYZE pipeline_runs once it holds more than twice the larger of the
-- runs last counted in it and least_rows, so that every session plans its statements again for
-- the table it has (migration 022). True when it did.
SELECT @schema@.analyze_runs_if_grown(%(least_rows)s);

-- The operators' console (`conveyor console`). Read-only statements; its actions go through
-- cancel_run and retry_run above, exactly as the CLI's do.

-- console_overview --
-- Everything the overview shows, in one statement, run by one console process at most every few
-- seconds however many browsers are open. Every part is served by an index and bounded, so a
-- million finished runs cost nothing per refresh:
-- * unfinished runs by status through pipeline_runs_claimable (the queue, never the history),
--   with the oldest due age and the runs claimed by a worker that is gone (lease expired, or its
--   owner no longer in the live registry);
-- * finished runs of the last %(finished_window)s seconds, newest first through
--   pipeline_runs_finished, stopped after %(sample)s rows (the page then says "of the last N");
-- * run_events of the last %(events_window)s seconds, newest first through run_events_created,
--   stopped after %(sample)s rows: throughput and failures per stage over the span they cover;
-- * FAILED runs through pipeline_runs_failed, counted up to %(failed_cap)s ("10,000+" beyond);
-- * live workers from the small unlogged registry (expired rows are gone processes);
-- * the latest runs through the primary key and pipeline_runs_untimed_ids (as the runs
--   list reads them); the total is the planner's estimate.
WITH live AS (
    SELECT worker_id, pipeline, stage, hostname, pid, started_at, heartbeat_at, waiting,
           extract(epoch FROM now() - heartbeat_at)::float8 AS beat_age_seconds
      FROM @schema@.workers
     WHERE expires_at > now()
), unfinished AS (
    SELECT pipeline, status, count(*) AS runs,
           count(*) FILTER (WHERE run_after <= now()) AS due,
           extract(epoch FROM now() - min(run_after) FILTER (WHERE run_after <= now()))::float8
               AS oldest_due_seconds,
           count(*) FILTER (WHERE lease_owner IS NOT NULL
                              AND (lease_expires_at < now()
                                   OR lease_owner NOT IN (SELECT worker_id FROM live)))
               AS orphaned
      FROM @schema@.pipeline_runs
     WHERE finished_at IS NULL
     GROUP BY pipeline, status
), finished AS (
    SELECT pipeline, status, finished_at
      FROM @schema@.pipeline_runs
     WHERE finished_at IS NOT NULL
       AND finished_at > now() - make_interval(secs => %(finished_window)s)
     ORDER BY finished_at DESC
     LIMIT %(sample)s
), events AS (
    SELECT pipeline, stage, from_status, to_status, created_at
      FROM @schema@.run_events
     WHERE created_at > now() - make_interval(secs => %(events_window)s)
     ORDER BY created_at DESC
     LIMIT %(sample)s
), failed AS (
    SELECT pipeline
      FROM @schema@.pipeline_runs
     WHERE status = 'FAILED'
     LIMIT %(failed_cap)s
), latest AS (
    -- The newest runs, in the runs list's order (console_runs): the newest by id among the
    -- ids that tell their time, and by created_at among the others.
    SELECT * FROM (
        (SELECT id, pipeline, status, created_at, updated_at,
                left(input::text, 160) AS input_preview,
                'epoch'::timestamptz
                    + ('x' || translate(left(id::text, 13), '-', ''))::bit(48)::bigint
                      * interval '1 millisecond' AS listed_at
           FROM @schema@.pipeline_runs
          WHERE get_byte(uuid_send(id), 6) >> 4 = 7
            AND id < '0699e991-a800-0000-0000-000000000000'::uuid
          ORDER BY id DESC
          LIMIT %(latest)s)
        UNION ALL
        (SELECT id, pipeline, status, created_at, updated_at,
                left(input::text, 160) AS input_preview, created_at AS listed_at
           FROM @schema@.pipeline_runs
          WHERE NOT (get_byte(uuid_send(id), 6) >> 4 = 7
                     AND id < '0699e991-a800-0000-0000-000000000000'::uuid)
          ORDER BY created_at DESC, id DESC
          LIMIT %(latest)s)
    ) both_parts
     ORDER BY listed_at DESC, id DESC
     LIMIT %(latest)s
)
SELECT now() AS generated_at,
       (SELECT coalesce(json_agg(u ORDER BY u.pipeline, u.status), '[]') FROM unfinished u)
           AS unfinished,
       (SELECT coalesce(json_agg(f), '[]')
          FROM (SELECT pipeline, status, count(*) AS runs FROM finished GROUP BY 1, 2) f)
           AS finished,
       (SELECT count(*) FROM finished) AS finished_sampled,
       (SELECT extract(epoch FROM now() - min(finished_at))::float8 FROM finished)
           AS finished_span_seconds,
       (SELECT coalesce(json_agg(e), '[]')
          FROM (SELECT pipeline, stage, from_status, to_status, count(*) AS events
                  FROM events GROUP BY 1, 2, 3, 4) e)
           AS events,
       (SELECT count(*) FROM events) AS events_sampled,
       (SELECT extract(epoch FROM now() - min(created_at))::float8 FROM events)
           AS events_span_seconds,
       (SELECT coalesce(json_agg(x), '[]')
          FROM (SELECT pipeline, count(*) AS runs FROM failed GROUP BY 1) x)
           AS failed,
       (SELECT coalesce(json_agg(w ORDER BY w.pipeline, w.stage, w.worker_id), '[]') FROM live w)
           AS workers,
       (SELECT coalesce(json_agg(r ORDER BY r.listed_at DESC, r.id DESC), '[]') FROM latest r)
           AS latest,
       (SELECT greatest(reltuples, 0)::bigint FROM pg_class
         WHERE oid = '@schema@.pipeline_runs'::regclass)
           AS runs_estimate;

-- console_runs --
-- One page of the runs list, newest first, keyset-paged on (listed_at, id): no OFFSET, so a
-- deep page costs what the first one costs. A run is listed at the time its id gives when
-- uuid_v7() made the id (its first 48 bits, in milliseconds), and those runs are read from the
-- primary key in id order; a run whose id gives no time (made before migration 006, or chosen
-- by whoever inserted the run) is listed at its created_at, read from
-- pipeline_runs_untimed_ids (sql/021_runs_listed_by_id.sql, whose predicate both parts repeat
-- word for word). Each part reads at most a page, and the page is the newest of the two.
-- `id_below` (the cursor's time, a millisecond on) and `id_from` (since's) bound the primary
-- key's range, so that a filter matching few runs reads only the runs of its window. A NULL
-- parameter is no filter; the console sends these unprepared, so each is planned with its
-- values and the unused conditions fold away. `failed_stage` keeps FAILED runs whose last
-- event was in that stage (where `retry` would start them again).
WITH timed AS (
    SELECT r.*, 'epoch'::timestamptz
                    + ('x' || translate(left(r.id::text, 13), '-', ''))::bit(48)::bigint
                      * interval '1 millisecond' AS listed_at
      FROM @schema@.pipeline_runs r
     WHERE get_byte(uuid_send(r.id), 6) >> 4 = 7
       AND r.id < '0699e991-a800-0000-0000-000000000000'::uuid
       AND (%(id_below)s::uuid IS NULL OR r.id < %(id_below)s)
       AND (%(id_from)s::uuid IS NULL OR r.id >= %(id_from)s)
       AND (%(before_at)s::timestamptz IS NULL
            OR ('epoch'::timestamptz
                    + ('x' || translate(left(r.id::text, 13), '-', ''))::bit(48)::bigint
                      * interval '1 millisecond', r.id)
               < (%(before_at)s::timestamptz, %(before_id)s::uuid))
       AND (%(pipeline)s::text IS NULL OR r.pipeline = %(pipeline)s)
       AND (%(statuses)s::text[] IS NULL OR r.status = ANY(%(statuses)s::text[]))
       AND (%(idempotency_key)s::text IS NULL OR r.idempotency_key = %(idempotency_key)s)
       AND (%(since)s::timestamptz IS NULL OR r.created_at >= %(since)s)
       AND (%(failed_stage)s::text IS NULL
            OR (SELECT e.stage FROM @schema@.run_events e
                 WHERE e.run_id = r.id AND e.stage IS NOT NULL
                 ORDER BY e.id DESC LIMIT 1) = %(failed_stage)s)
     ORDER BY r.id DESC
     LIMIT %(limit)s
), untimed AS (
    SELECT r.*, r.created_at AS listed_at
      FROM @schema@.pipeline_runs r
     WHERE NOT (get_byte(uuid_send(r.id), 6) >> 4 = 7
                AND r.id < '0699e991-a800-0000-0000-000000000000'::uuid)
       AND (%(before_at)s::timestamptz IS NULL
            OR (r.created_at, r.id) < (%(before_at)s::timestamptz, %(before_id)s::uuid))
       AND (%(pipeline)s::text IS NULL OR r.pipeline = %(pipeline)s)
       AND (%(statuses)s::text[] IS NULL OR r.status = ANY(%(statuses)s::text[]))
       AND (%(idempotency_key)s::text IS NULL OR r.idempotency_key = %(idempotency_key)s)
       AND (%(since)s::timestamptz IS NULL OR r.created_at >= %(since)s)
       AND (%(failed_stage)s::text IS NULL
            OR (SELECT e.stage FROM @schema@.run_events e
                 WHERE e.run_id = r.id AND e.stage IS NOT NULL
                 ORDER BY e.id DESC LIMIT 1) = %(failed_stage)s)
     ORDER BY r.created_at DESC, r.id DESC
     LIMIT %(limit)s
)
SELECT id, pipeline, status, priority, attempt, created_at, updated_at, finished_at,
       left(input::text, 160) AS input_preview, left(last_error, 160) AS last_error,
       idempotency_key, listed_at
  FROM (SELECT * FROM timed UNION ALL SELECT * FROM untimed) both_parts
 ORDER BY listed_at DESC, id DESC
 LIMIT %(limit)s;

-- live_workers --
-- Worker processes whose heartbeat is fresh; an expired row is a process that is gone. What
-- `conveyor status` prints under the counts (the console's overview reads the same registry).
SELECT pipeline, stage, worker_id, hostname, pid,
       extract(epoch FROM now() - heartbeat_at)::float8 AS beat_age_seconds, waiting
  FROM @schema@.workers
 WHERE expires_at > now()
 ORDER BY pipeline, stage, worker_id;
