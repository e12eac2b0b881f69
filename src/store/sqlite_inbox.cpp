// The inbox on SQLite. The processing transaction is BEGIN IMMEDIATE: it holds the database's
// write lock from the start, so two connections delivering the same event take turns and the
// second one reads the first one's committed row (a duplicate).
#include <natspubsub/store/sqlite.hpp>

#include "store/inbox_internal.hpp"
#include "store/logger.hpp"
#include "store/outbox_internal.hpp"

namespace natspubsub::detail {

namespace {

constexpr std::string_view kColumns =
    "consumer, event_id, subject, stream, stream_seq, status, deliveries, last_error, received_at, processed_at";

class SqliteInbox final : public Inbox {
 public:
  explicit SqliteInbox(store::SqliteDatabase& db) : db_(db) {}

  InboxResult process(const InboxKey& key, const Handler& handler) override {
    validate_inbox_key(key);
    auto txn = db_.begin(store::SqliteTransaction::Mode::immediate);
    auto existing = txn.query(
        "SELECT status, deliveries FROM natspubsub_inbox WHERE consumer = $1 AND event_id = $2",
        {key.consumer, key.event_id});
    if (!existing.empty() && existing.front().as_text(0) == "processed") {
      txn.commit();
      return InboxResult::duplicate;
    }
    // A failed row (or a processing row left by hand) runs again.
    int deliveries = next_deliveries(existing.empty() ? std::nullopt : std::optional(existing.front().as_int(1)),
                                     key.deliveries);
    txn.execute(
        "INSERT INTO natspubsub_inbox (consumer, event_id, subject, stream, stream_seq, status, deliveries, "
        "received_at) VALUES ($1, $2, $3, $4, $5, 'processing', $6, $7) "
        "ON CONFLICT (consumer, event_id) DO UPDATE SET status = 'processing', deliveries = excluded.deliveries, "
        "subject = excluded.subject, stream = excluded.stream, stream_seq = excluded.stream_seq",
        {key.consumer, key.event_id, key.subject, key.stream, key.stream_seq, deliveries, unix_ms_now()});

    std::exception_ptr failure;
    try {
      store::Transaction handle(txn);
      handler(handle);
      txn.execute(
          "UPDATE natspubsub_inbox SET status = 'processed', processed_at = $3, last_error = NULL "
          "WHERE consumer = $1 AND event_id = $2",
          {key.consumer, key.event_id, unix_ms_now()});
      txn.commit();
      return InboxResult::processed;
    } catch (...) {
      failure = std::current_exception();
    }
    txn.rollback();  // the handler's writes and the processing row go
    record_failure(key, deliveries, describe(failure));
    std::rethrow_exception(failure);
  }

  std::optional<InboxRecord> find(std::string_view consumer, std::string_view event_id) override {
    auto rows = db_.query("SELECT " + std::string(kColumns) +
                              " FROM natspubsub_inbox WHERE consumer = $1 AND event_id = $2",
                          {consumer, event_id});
    if (rows.empty()) return std::nullopt;
    return inbox_record_from(rows.front());
  }

  std::size_t cleanup_processed(std::chrono::milliseconds older_than, std::size_t batch_limit) override {
    if (batch_limit == 0) return 0;
    auto txn = db_.begin();
    // WITHOUT ROWID table: rows are addressed by their primary key.
    auto n = txn.execute(
        "DELETE FROM natspubsub_inbox WHERE (consumer, event_id) IN ("
        " SELECT consumer, event_id FROM natspubsub_inbox WHERE status = 'processed' AND processed_at < $1"
        " ORDER BY processed_at LIMIT $2)",
        {unix_ms_now() - older_than.count(), static_cast<std::int64_t>(batch_limit)});
    txn.commit();
    return static_cast<std::size_t>(n);
  }

 private:
  // Its own short transaction, after the handler's rolled back; never downgrades a processed row.
  void record_failure(const InboxKey& key, int deliveries, const std::string& error) noexcept {
    try {
      auto txn = db_.begin();
      txn.execute(
          "INSERT INTO natspubsub_inbox (consumer, event_id, subject, stream, stream_seq, status, deliveries, "
          "last_error, received_at) VALUES ($1, $2, $3, $4, $5, 'failed', $6, $7, $8) "
          "ON CONFLICT (consumer, event_id) DO UPDATE SET status = 'failed', "
          "deliveries = max(natspubsub_inbox.deliveries, excluded.deliveries), last_error = excluded.last_error "
          "WHERE natspubsub_inbox.status <> 'processed'",
          {key.consumer, key.event_id, key.subject, key.stream, key.stream_seq, deliveries, error, unix_ms_now()});
      txn.commit();
    } catch (const std::exception& e) {
      try {
        store::detail::logger()->warn("natspubsub: inbox could not record the failure of {} for {}: {}",
                                      key.event_id, key.consumer, e.what());
      } catch (...) {
      }
    }
  }

  store::SqliteDatabase& db_;
};

// One BEGIN IMMEDIATE for many deliveries: SQLite has one writer and every commit ends with a
// WAL flush (synchronous=FULL), so the batch pays the lock and the flush once.
class SqliteInboxBatch final : public InboxBatch {
 public:
  explicit SqliteInboxBatch(store::SqliteDatabase& db)
      : txn_(db.begin(store::SqliteTransaction::Mode::immediate)) {}

  InboxResult process(const InboxKey& key, const Inbox::Handler& handler) override {
    validate_inbox_key(key);
    if (broken_) throw store::RetryableDatabaseError("inbox batch: the transaction was ended by an earlier error");
    try {
      // Written as processed: nobody sees it before the commit, and a failing handler turns it
      // into failed below. DO NOTHING + RETURNING: a row already there returns nothing.
      auto now = unix_ms_now();
      auto inserted = txn_.query(
          "INSERT INTO natspubsub_inbox (consumer, event_id, subject, stream, stream_seq, status, deliveries, "
          "received_at, processed_at) VALUES ($1, $2, $3, $4, $5, 'processed', $6, $7, $7) "
          "ON CONFLICT (consumer, event_id) DO NOTHING RETURNING deliveries",
          {key.consumer, key.event_id, key.subject, key.stream, key.stream_seq,
           next_deliveries(std::nullopt, key.deliveries), now});
      if (inserted.empty()) {
        auto existing = txn_.query(
            "SELECT status, deliveries FROM natspubsub_inbox WHERE consumer = $1 AND event_id = $2",
            {key.consumer, key.event_id});
        if (existing.empty()) throw store::RetryableDatabaseError("inbox row of " + key.event_id + " vanished");
        if (existing.front().as_text(0) == "processed") return InboxResult::duplicate;
        txn_.execute(
            "UPDATE natspubsub_inbox SET status = 'processed', processed_at = $3, last_error = NULL, "
            "deliveries = $4, subject = $5, stream = $6, stream_seq = $7 WHERE consumer = $1 AND event_id = $2",
            {key.consumer, key.event_id, now, next_deliveries(existing.front().as_int(1), key.deliveries),
             key.subject, key.stream, key.stream_seq});
      }
    } catch (...) {
      broken_ = true;
      throw;
    }

    const std::string savepoint = "natspubsub_inbox_" + std::to_string(++savepoints_);
    bool saved = false;
    std::exception_ptr failure;
    try {
      store::Transaction handle(txn_);
      handle.before_first_use([&] {
        if (saved) return;  // a copy of the handle used first: one savepoint all the same
        txn_.execute_script("SAVEPOINT " + savepoint);
        saved = true;
      });
      handler(handle);
      // A handler that caught an error after which SQLite ended the whole transaction (disk
      // full, I/O error) and returned normally: the savepoint is gone with the transaction, and
      // COMMIT would acknowledge the batch with nothing stored.
      if (saved) {
        try {
          txn_.execute_script("RELEASE SAVEPOINT " + savepoint);
        } catch (const std::exception& e) {
          broken_ = true;
          throw store::RetryableDatabaseError("inbox handler for " + key.event_id +
                                              " returned normally after SQLite ended its transaction: " + e.what());
        }
      }
      return InboxResult::processed;
    } catch (...) {
      failure = std::current_exception();
    }
    try {
      // Only this handler's writes go; the row stays, as failed, and commits with the others.
      if (saved) txn_.execute_script("ROLLBACK TO SAVEPOINT " + savepoint);
      txn_.execute(
          "UPDATE natspubsub_inbox SET status = 'failed', processed_at = NULL, last_error = $3 "
          "WHERE consumer = $1 AND event_id = $2",
          {key.consumer, key.event_id, describe(failure)});
    } catch (const std::exception& e) {
      // Disk full, I/O error: SQLite may have ended the whole transaction.
      broken_ = true;
      store::detail::logger()->warn("natspubsub: inbox batch could not roll back the handler of {}: {}",
                                    key.event_id, e.what());
    }
    std::rethrow_exception(failure);
  }

  void commit() override {
    if (broken_) {
      txn_.rollback();
      throw store::RetryableDatabaseError("inbox batch: not committed, an earlier error ended the transaction");
    }
    txn_.commit();
  }

  bool broken() const noexcept override { return broken_; }

 private:
  store::SqliteTransaction txn_;
  std::uint64_t savepoints_ = 0;
  bool broken_ = false;
};

}  // namespace

std::unique_ptr<InboxBatch> begin_sqlite_inbox_batch(store::SqliteDatabase& db) {
  return std::make_unique<SqliteInboxBatch>(db);
}

std::unique_ptr<Inbox> make_sqlite_inbox(store::SqliteDatabase& db) { return std::make_unique<SqliteInbox>(db); }

}  // namespace natspubsub::detail
