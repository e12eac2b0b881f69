-- natspubsub schema, version 1 (SQLite 3.38 or newer): the transactional outbox and the inbox.
--
-- This file is the contract. natspubsub's migration runner applies it in one transaction and
-- records it in natspubsub_schema_migrations. To apply it by hand instead, do the runner's
-- bookkeeping in the same transaction, or the runner will try again:
--
--   BEGIN IMMEDIATE;
--   CREATE TABLE IF NOT EXISTS natspubsub_schema_migrations (
--     version    INTEGER PRIMARY KEY,
--     name       TEXT    NOT NULL,
--     applied_at INTEGER NOT NULL);
--   .read 0001_outbox_inbox.sql
--   INSERT INTO natspubsub_schema_migrations (version, name, applied_at)
--   VALUES (1, '0001_outbox_inbox.sql', CAST(ROUND((julianday('now') - 2440587.5) * 86400000) AS INTEGER));
--   COMMIT;
--
-- TIMESTAMPS: every time column is an INTEGER holding Unix time in milliseconds, UTC
-- (1767225600000 is 2026-01-01T00:00:00Z). Integers compare and index cheaply and mean the
-- same in every language; to read one: datetime(created_at / 1000, 'unixepoch').
-- The defaults compute "now" as
--   CAST(ROUND((julianday('now') - 2440587.5) * 86400000) AS INTEGER)
-- because unixepoch('subsec') needs SQLite 3.42.
--
-- The JSON functions (built in since SQLite 3.38) are required: the CHECK on headers and the
-- library's batch statements use them. Statuses are lower-case text checked by constraints.

-- ---------------------------------------------------------------------------------------------
-- Outbox: events written in the same transaction as the business change that caused them, and
-- published to NATS JetStream afterwards by a relay.
--
-- A row inserted with only event_id, subject and payload (optionally headers and partition_key)
-- is a valid pending event, whoever inserts it (a trigger, a service in another language):
--
--   INSERT INTO natspubsub_outbox (event_id, subject, payload, partition_key)
--   VALUES ('0b7c...', 'prod.orders.order.created', '{"event_id":"0b7c...",...}', 'order-42');
--
-- Life of a row: pending -> publishing (claimed by a relay, lease in locked_until) -> sent
-- (or deleted, depending on the relay's retention setting). A failed publish puts it back to
-- pending with attempts + 1 and a later next_attempt_at; after the relay's maximum number of
-- attempts it becomes failed (kept for the operator, who may set it pending again).
-- ---------------------------------------------------------------------------------------------
CREATE TABLE natspubsub_outbox (
  -- Publication order: the relay publishes rows of one partition_key in ascending id.
  -- AUTOINCREMENT so an id is never handed out twice, even after the newest row is deleted.
  id              INTEGER PRIMARY KEY AUTOINCREMENT,
  -- The envelope's event id; published as the Nats-Msg-Id header so JetStream drops the
  -- duplicate when a relay re-publishes a row after a crash.
  event_id        TEXT    NOT NULL,
  -- Full NATS subject, e.g. 'prod.orders.order.created'.
  subject         TEXT    NOT NULL,
  -- The message body: the encoded envelope (JSON text).
  payload         TEXT    NOT NULL,
  -- Extra NATS headers as a JSON object of string values, e.g. {"topic":"order.created"}.
  headers         TEXT    NOT NULL DEFAULT '{}',
  -- Events with the same key are published in id order, one key never overtakes itself.
  -- NULL: no ordering constraint with any other event.
  partition_key   TEXT    NULL,
  status          TEXT    NOT NULL DEFAULT 'pending',
  -- Failed publish attempts so far.
  attempts        INTEGER NOT NULL DEFAULT 0,
  last_error      TEXT    NULL,
  -- A pending row is not claimed before this time (backoff after a failed attempt).
  next_attempt_at INTEGER NOT NULL DEFAULT (CAST(ROUND((julianday('now') - 2440587.5) * 86400000) AS INTEGER)),
  -- The relay holding a publishing row, and until when. A row whose lease has ended
  -- (relay died) is claimable again.
  locked_by       TEXT    NULL,
  locked_until    INTEGER NULL,
  created_at      INTEGER NOT NULL DEFAULT (CAST(ROUND((julianday('now') - 2440587.5) * 86400000) AS INTEGER)),
  sent_at         INTEGER NULL,
  CONSTRAINT natspubsub_outbox_event_id_key UNIQUE (event_id),
  CONSTRAINT natspubsub_outbox_status_check
    CHECK (status IN ('pending', 'publishing', 'sent', 'failed')),
  CONSTRAINT natspubsub_outbox_attempts_check CHECK (attempts >= 0),
  CONSTRAINT natspubsub_outbox_headers_check
    CHECK (json_valid(headers) AND json_type(headers) = 'object')
);

-- Claim: the relay scans the unsent rows in id order (ORDER BY id LIMIT batch). Sent rows, the
-- bulk of the table, are left out of the index so the scan stays proportional to the backlog.
-- (SQLite uses a partial index only when the query repeats its WHERE term: the library's
-- claim does.)
CREATE INDEX natspubsub_outbox_claim_idx
  ON natspubsub_outbox (id)
  WHERE status IN ('pending', 'publishing');

-- Per-key order: "is there an earlier unsent row with the same partition_key?" for each
-- candidate of a claim.
CREATE INDEX natspubsub_outbox_partition_idx
  ON natspubsub_outbox (partition_key, id)
  WHERE status <> 'sent';

-- Cleanup of old sent rows, oldest first, in bounded batches.
CREATE INDEX natspubsub_outbox_sent_idx
  ON natspubsub_outbox (sent_at)
  WHERE status = 'sent';

-- The operator tool lists failed rows.
CREATE INDEX natspubsub_outbox_failed_idx
  ON natspubsub_outbox (id)
  WHERE status = 'failed';

-- ---------------------------------------------------------------------------------------------
-- Inbox: one row per (consumer, event_id) a consumer has received. The row and the handler's
-- writes commit in one transaction, so an event is applied once per consumer however often it
-- is delivered. processing only exists inside that transaction; failed rows (the handler threw)
-- may run again on a later delivery.
-- ---------------------------------------------------------------------------------------------
CREATE TABLE natspubsub_inbox (
  -- The durable consumer name.
  consumer      TEXT    NOT NULL,
  event_id      TEXT    NOT NULL,
  subject       TEXT    NOT NULL DEFAULT '',
  stream        TEXT    NOT NULL DEFAULT '',
  stream_seq    INTEGER NOT NULL DEFAULT 0,
  status        TEXT    NOT NULL DEFAULT 'processing',
  -- Deliveries seen so far (at least the NATS delivery count of the latest one).
  deliveries    INTEGER NOT NULL DEFAULT 1,
  last_error    TEXT    NULL,
  received_at   INTEGER NOT NULL DEFAULT (CAST(ROUND((julianday('now') - 2440587.5) * 86400000) AS INTEGER)),
  processed_at  INTEGER NULL,
  CONSTRAINT natspubsub_inbox_pkey PRIMARY KEY (consumer, event_id),
  CONSTRAINT natspubsub_inbox_status_check
    CHECK (status IN ('processing', 'processed', 'failed')),
  CONSTRAINT natspubsub_inbox_deliveries_check CHECK (deliveries >= 0)
) WITHOUT ROWID;

-- Cleanup of old processed rows, oldest first, in bounded batches.
CREATE INDEX natspubsub_inbox_processed_idx
  ON natspubsub_inbox (processed_at)
  WHERE status = 'processed';
