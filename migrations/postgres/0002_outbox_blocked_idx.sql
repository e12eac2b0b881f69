-- natspubsub schema, version 2 (PostgreSQL): an index of the rows that block their key for long.
--
-- A keyed row can be published only after every earlier row of its key is sent. What keeps a
-- key waiting for long is a row that is failed (until an operator acts) or waiting out a backoff
-- (pending with a next_attempt_at in the future: attempts > 0 after a failed publish, or a row
-- written with a later next_attempt_at). This index holds only such rows, so a claim can leave
-- out the keys behind them cheaply and look at a bounded window of rows in id order without
-- letting one blocked key starve the others (src/store/postgres_outbox.cpp). A row whose backoff
-- is over stays in the index until it is claimed; the claim checks next_attempt_at itself.
--
-- Applied in one transaction by the migration runner; CREATE INDEX (not CONCURRENTLY) holds a
-- lock that blocks writes to natspubsub_outbox while it reads the table once (seconds for
-- millions of rows). To build it without that lock on a large table, run first, outside a
-- transaction:
--   CREATE INDEX CONCURRENTLY IF NOT EXISTS natspubsub_outbox_blocked_idx ON natspubsub_outbox (partition_key, id)
--     WHERE status = 'failed' OR (status = 'pending' AND (attempts > 0 OR next_attempt_at > created_at));
CREATE INDEX IF NOT EXISTS natspubsub_outbox_blocked_idx
  ON natspubsub_outbox (partition_key, id)
  WHERE status = 'failed' OR (status = 'pending' AND (attempts > 0 OR next_attempt_at > created_at));
