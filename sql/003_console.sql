-- 003: indexes for the operators' console (`conveyor console`).
-- @schema@ is replaced by the quoted, validated schema name when the migration is applied.

-- The runs list, newest first, paged by (created_at, id) without OFFSET: page 1,000 costs what
-- page 1 costs. Also the overview's "latest runs". A backward scan serves DESC order.
CREATE INDEX pipeline_runs_created ON @schema@.pipeline_runs (created_at, id);

-- Throughput and failures over the last minutes, read newest-first and stopped after a bounded
-- sample (the overview never counts run_events history). Append-only table, monotonic key: the
-- index only ever grows at its right edge.
CREATE INDEX run_events_created ON @schema@.run_events (created_at);
