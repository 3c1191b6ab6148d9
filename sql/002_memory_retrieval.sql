-- 002: what the agents need beyond 001's memory table.
-- @schema@ is replaced by the quoted, validated schema name when the migration is applied.

-- Vector similarity when the server has pgvector (the embedded server ships it). Everything else
-- works without it: when the extension cannot be created (not installed, no privilege), the
-- migration still succeeds, memory has no embedding column, and retrieval is full-text only.
-- The column has no fixed dimension, so any embeddings model fits; searches compare only rows
-- embedded by the configured model (metadata->>'embedding_model').
DO $$
DECLARE
    vector_schema name;
BEGIN
    BEGIN
        CREATE EXTENSION IF NOT EXISTS vector;
    EXCEPTION WHEN OTHERS THEN
        RAISE NOTICE 'pgvector is not available (%); memory search will be full-text only',
            SQLERRM;
    END;
    SELECT n.nspname INTO vector_schema
      FROM pg_extension e JOIN pg_namespace n ON n.oid = e.extnamespace
     WHERE e.extname = 'vector';
    IF vector_schema IS NOT NULL THEN
        EXECUTE format('ALTER TABLE @schema@.memory ADD COLUMN IF NOT EXISTS embedding %I.vector',
                       vector_schema);
    END IF;
END
$$;

-- A document is replaced as a whole when its file changes: find its chunks by source.
CREATE INDEX IF NOT EXISTS memory_document_source
    ON @schema@.memory (namespace, (metadata->>'source'))
    WHERE kind = 'document';

-- The answer stage writes each run's exchange back once, even when the stage runs twice (a crash
-- or a lost lease): the second write meets this index and does nothing.
CREATE UNIQUE INDEX IF NOT EXISTS memory_exchange_run
    ON @schema@.memory ((metadata->>'run_id'))
    WHERE kind = 'message' AND metadata ? 'run_id';
