#pragma once
// Shared by the SQLite and PostgreSQL inboxes (not installed).
#include <exception>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include <natspubsub/inbox.hpp>
#include <natspubsub/store/database.hpp>

namespace natspubsub::store {
class SqliteDatabase;
class PostgresDatabase;
}  // namespace natspubsub::store

namespace natspubsub::detail {

[[nodiscard]] std::unique_ptr<Inbox> make_sqlite_inbox(store::SqliteDatabase& db);
[[nodiscard]] std::unique_ptr<Inbox> make_postgres_inbox(store::PostgresDatabase& db);

/// Several deliveries in one open transaction (InboxHandler's batches). Each process() records
/// the inbox row (or finds it processed: duplicate) and runs the handler after a SAVEPOINT,
/// taken when the handler first touches the database. A handler that throws is rolled back to
/// its savepoint, its row is marked failed (deliveries, last_error) in the same transaction, and
/// the exception is rethrown; the others stay. commit() makes them durable together; destroyed
/// without commit() (or after a failure it cannot undo) everything rolls back.
///
/// broken(): an inbox statement failed, or a rollback to a savepoint did (SQLite ends the whole
/// transaction on some errors; a lost connection): nothing of the batch can commit. process()
/// then throws RetryableDatabaseError without running anything, and commit() throws.
class InboxBatch {
 public:
  virtual ~InboxBatch() = default;
  /// The keys of the deliveries about to run, in order, before the first process(): PostgreSQL
  /// inserts their rows in one statement instead of one round trip per delivery. Rows reserved
  /// and never claimed by a process() (middleware that did not call the handler) are deleted
  /// before the commit. A no-op on SQLite, where a statement costs no round trip.
  virtual void reserve(const std::vector<InboxKey>& keys) { (void)keys; }
  [[nodiscard]] virtual InboxResult process(const InboxKey& key, const Inbox::Handler& handler) = 0;
  virtual void commit() = 0;
  [[nodiscard]] virtual bool broken() const noexcept = 0;
};

/// Begins the batch's transaction on `db` (SQLite: BEGIN IMMEDIATE). Throws the typed store errors.
[[nodiscard]] std::unique_ptr<InboxBatch> begin_sqlite_inbox_batch(store::SqliteDatabase& db);
[[nodiscard]] std::unique_ptr<InboxBatch> begin_postgres_inbox_batch(store::PostgresDatabase& db);
[[nodiscard]] std::unique_ptr<InboxBatch> begin_inbox_batch(store::Database& db);

/// A row selected as: consumer, event_id, subject, stream, stream_seq, status, deliveries,
/// last_error, received_at (Unix ms), processed_at (Unix ms or NULL).
[[nodiscard]] InboxRecord inbox_record_from(const store::Row& row);

/// Throws InboxError when consumer or event_id is empty.
void validate_inbox_key(const InboxKey& key);

/// The deliveries count of this delivery: one more than seen before, at least NATS's count.
[[nodiscard]] int next_deliveries(std::optional<std::int64_t> previous, int nats_deliveries);

/// What a handler exception says, for last_error.
[[nodiscard]] std::string describe(const std::exception_ptr& error);

}  // namespace natspubsub::detail
