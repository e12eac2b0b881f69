// The inbox on PostgreSQL (READ COMMITTED).
//
// Two instances receiving one event at once: both INSERT ... ON CONFLICT DO NOTHING the same
// (consumer, event_id). The second INSERT waits on the first's uncommitted row; when the first
// commits, the second's insert does nothing and its SELECT ... FOR UPDATE (a fresh snapshot)
// finds the row processed: duplicate. When the first rolls back, the second's insert goes
// through and it runs the handler. A redelivery of a failed row takes the row lock with
// SELECT ... FOR UPDATE before running, so concurrent redeliveries take turns the same way.
//
// The row is written as `processed` before the handler runs: nobody can see it before the
// commit, and if the handler fails the whole transaction (row included) rolls back. That saves
// the round trip of a second UPDATE per message; `processing` never reaches the table here.
#include <natspubsub/store/postgres.hpp>

#include <algorithm>
#include <optional>
#include <set>
#include <tuple>
#include <utility>

#include <nlohmann/json.hpp>

#include <pqxx/transaction>

#include "store/inbox_internal.hpp"
#include "store/logger.hpp"
#include "store/outbox_internal.hpp"
#include "store/postgres_exec.hpp"

namespace natspubsub::detail {

namespace {

constexpr std::string_view kColumns =
    "consumer, event_id, subject, stream, stream_seq, status, deliveries, last_error, "
    "(extract(epoch FROM received_at) * 1000)::bigint, (extract(epoch FROM processed_at) * 1000)::bigint";

class PostgresInbox final : public Inbox {
 public:
  explicit PostgresInbox(store::PostgresDatabase& db) : db_(db) {}

  InboxResult process(const InboxKey& key, const Handler& handler) override {
    validate_inbox_key(key);
    std::optional<pqxx::work> txn;
    int deliveries = 0;
    try {
      txn.emplace(db_.connection());
      auto inserted = exec(*txn,
                           "INSERT INTO natspubsub_inbox (consumer, event_id, subject, stream, stream_seq, status, "
                           "deliveries, processed_at) VALUES ($1, $2, $3, $4, $5, 'processed', $6, now()) "
                           "ON CONFLICT (consumer, event_id) DO NOTHING RETURNING deliveries",
                           {key.consumer, key.event_id, key.subject, key.stream, key.stream_seq,
                            next_deliveries(std::nullopt, key.deliveries)});
      if (!inserted.empty()) {
        deliveries = static_cast<int>(inserted.front().as_int(0));
      } else {
        auto existing = exec(*txn,
                             "SELECT status, deliveries FROM natspubsub_inbox "
                             "WHERE consumer = $1 AND event_id = $2 FOR UPDATE",
                             {key.consumer, key.event_id});
        if (existing.empty()) {
          // The row was deleted (cleanup) between the two statements: the event is new again.
          throw store::RetryableDatabaseError("inbox row of " + key.event_id + " vanished concurrently");
        }
        if (existing.front().as_text(0) == "processed") {
          txn->commit();
          return InboxResult::duplicate;
        }
        deliveries = next_deliveries(existing.front().as_int(1), key.deliveries);
        exec(*txn,
             "UPDATE natspubsub_inbox SET status = 'processed', processed_at = now(), last_error = NULL, "
             "deliveries = $3, subject = $4, stream = $5, stream_seq = $6 WHERE consumer = $1 AND event_id = $2",
             {key.consumer, key.event_id, deliveries, key.subject, key.stream, key.stream_seq});
      }
    } catch (...) {
      store::rethrow_postgres_error("inbox: recording the delivery of " + key.event_id, &db_.url());
    }

    std::exception_ptr failure;
    try {
      store::Transaction handle(*txn);
      bool used = false;
      handle.before_first_use([&] { used = true; });
      handler(handle);
      // A handler that caught a database error and returned normally left the transaction
      // aborted, and COMMIT would answer ROLLBACK: the event would be acknowledged unapplied.
      if (used) {
        try {
          exec(*txn, "SELECT 1", {});
        } catch (const std::exception&) {
          throw store::DatabaseError("inbox handler for " + key.event_id +
                                         " returned normally after a database error it caught, which aborted its "
                                         "transaction: rethrow it, or catch it inside a savepoint of your own",
                                     "25P02");
        }
      }
      txn->commit();
      return InboxResult::processed;
    } catch (...) {
      failure = std::current_exception();
    }
    txn.reset();  // aborts: the handler's writes and the processing row go
    record_failure(key, deliveries, describe(failure));
    try {
      std::rethrow_exception(failure);
    } catch (...) {
      // libpqxx errors become the typed store errors; the handler's own exceptions pass unchanged.
      store::rethrow_postgres_error("inbox handler for " + key.event_id, &db_.url());
    }
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
    auto rows = db_.query(
        "WITH doomed AS ("
        " SELECT consumer, event_id FROM natspubsub_inbox WHERE status = 'processed'"
        " AND processed_at < now() - make_interval(secs => $1::double precision / 1000)"
        " ORDER BY processed_at LIMIT $2)"
        " DELETE FROM natspubsub_inbox AS t USING doomed"
        " WHERE t.consumer = doomed.consumer AND t.event_id = doomed.event_id RETURNING 1",
        {older_than.count(), static_cast<std::int64_t>(batch_limit)});
    return rows.size();
  }

 private:
  std::vector<store::Row> exec(pqxx::work& txn, std::string_view sql, const store::Params& params) {
    return store::detail::to_rows(store::detail::pg_exec(txn, sql, params, &db_.url()));
  }

  // Its own short transaction, after the handler's rolled back; never downgrades a processed row
  // (another instance may have processed the event meanwhile).
  void record_failure(const InboxKey& key, int deliveries, const std::string& error) noexcept {
    try {
      pqxx::work txn(db_.connection());
      exec(txn,
           "INSERT INTO natspubsub_inbox (consumer, event_id, subject, stream, stream_seq, status, deliveries, "
           "last_error) VALUES ($1, $2, $3, $4, $5, 'failed', $6, $7) "
           "ON CONFLICT (consumer, event_id) DO UPDATE SET status = 'failed', "
           "deliveries = GREATEST(natspubsub_inbox.deliveries, EXCLUDED.deliveries), "
           "last_error = EXCLUDED.last_error WHERE natspubsub_inbox.status <> 'processed'",
           {key.consumer, key.event_id, key.subject, key.stream, key.stream_seq, deliveries, error});
      txn.commit();
    } catch (const std::exception& e) {
      try {
        store::detail::logger()->warn("natspubsub: inbox could not record the failure of {} for {}: {}",
                                      key.event_id, key.consumer, db_.url().scrub(e.what()));
      } catch (...) {
      }
    }
  }

  store::PostgresDatabase& db_;
};

// Many deliveries in one transaction: BEGIN and COMMIT once per batch, one INSERT per message,
// and a SAVEPOINT only for a handler that touches the database. Savepoints are not released:
// each message's savepoint nests in the previous one, and ROLLBACK TO undoes only the failing
// handler's writes (the later messages have not run yet). Every subtransaction that writes takes
// a subtransaction id; PostgreSQL keeps 64 per backend in shared memory before other sessions'
// snapshots get slower, which is one reason InboxHandler's batches stay at 32 or fewer.
//
// Two instances batching the same events in opposite orders can deadlock on the rows: one of
// them gets 40P01 (RetryableDatabaseError), its whole batch rolls back and is retried.
// PostgreSQL text holds neither NUL nor invalid UTF-8 (22021). Such a key must fail its own
// delivery before any statement, not abort the batch's transaction for all the others.
// (Lead and continuation bytes only: overlong forms and surrogates still reach the server.)
bool storable(const std::string& text) {
  const std::size_t n = text.size();
  for (std::size_t i = 0; i < n;) {
    const auto c = static_cast<unsigned char>(text[i]);
    std::size_t extra = 0;
    if (c == 0) return false;
    if (c < 0x80) extra = 0;
    else if ((c >> 5) == 0x6) extra = 1;
    else if ((c >> 4) == 0xE) extra = 2;
    else if ((c >> 3) == 0x1E) extra = 3;
    else return false;
    if (i + extra >= n && extra > 0) return false;
    for (std::size_t k = 1; k <= extra; ++k) {
      if ((static_cast<unsigned char>(text[i + k]) >> 6) != 0x2) return false;
    }
    i += extra + 1;
  }
  return true;
}

bool storable(const InboxKey& key) {
  return storable(key.consumer) && storable(key.event_id) && storable(key.subject) && storable(key.stream);
}

class PostgresInboxBatch final : public InboxBatch {
 public:
  explicit PostgresInboxBatch(store::PostgresDatabase& db) : db_(db) {
    try {
      txn_.emplace(db_.connection());
    } catch (...) {
      store::rethrow_postgres_error("inbox batch: BEGIN", &db_.url());
    }
  }

  // One INSERT for the whole batch: the rows go in as processed (invisible until the commit); a
  // key whose row exists already (a redelivery, a duplicate, the same event twice in the batch)
  // is not returned and takes the one-by-one path in process().
  void reserve(const std::vector<InboxKey>& keys) override {
    if (broken_ || keys.size() < 2) return;
    // In key order: two instances reserving the same redelivered events lock them in one order.
    std::vector<const InboxKey*> sorted;
    for (const auto& key : keys) sorted.push_back(&key);
    std::sort(sorted.begin(), sorted.end(), [](const InboxKey* a, const InboxKey* b) {
      return std::tie(a->consumer, a->event_id) < std::tie(b->consumer, b->event_id);
    });
    nlohmann::json rows = nlohmann::json::array();
    for (const auto* k : sorted) {
      const auto& key = *k;
      if (key.consumer.empty() || key.event_id.empty() || !storable(key)) continue;  // refused by process()
      rows.push_back({{"consumer", key.consumer},
                      {"event_id", key.event_id},
                      {"subject", key.subject},
                      {"stream", key.stream},
                      {"stream_seq", key.stream_seq},
                      {"deliveries", next_deliveries(std::nullopt, key.deliveries)}});
    }
    try {
      auto inserted = exec(
          "INSERT INTO natspubsub_inbox (consumer, event_id, subject, stream, stream_seq, status, deliveries, "
          "processed_at) SELECT r.consumer, r.event_id, r.subject, r.stream, r.stream_seq, 'processed', r.deliveries, "
          "now() FROM json_to_recordset($1::json) AS r(consumer text, event_id text, subject text, stream text, "
          "stream_seq bigint, deliveries integer) "
          "ON CONFLICT (consumer, event_id) DO NOTHING RETURNING consumer, event_id",
          {rows.dump()});
      for (const auto& row : inserted) reserved_.insert({row.as_text(0), row.as_text(1)});
    } catch (...) {
      broken_ = true;
      store::rethrow_postgres_error("inbox batch: recording the deliveries", &db_.url());
    }
  }

  InboxResult process(const InboxKey& key, const Inbox::Handler& handler) override {
    validate_inbox_key(key);
    if (broken_) throw store::RetryableDatabaseError("inbox batch: the transaction was aborted by an earlier error");
    if (!storable(key)) {
      throw store::DatabaseError("inbox: the key of " + key.event_id.substr(0, key.event_id.find('\0')) +
                                     " holds a NUL byte or invalid UTF-8, which PostgreSQL text cannot store",
                                 "22021");
    }
    // A row reserve() inserted for this key is there already, as processed.
    if (reserved_.erase({key.consumer, key.event_id}) == 0) {
      try {
        auto inserted = exec("INSERT INTO natspubsub_inbox (consumer, event_id, subject, stream, stream_seq, status, "
                             "deliveries, processed_at) VALUES ($1, $2, $3, $4, $5, 'processed', $6, now()) "
                             "ON CONFLICT (consumer, event_id) DO NOTHING RETURNING deliveries",
                             {key.consumer, key.event_id, key.subject, key.stream, key.stream_seq,
                              next_deliveries(std::nullopt, key.deliveries)});
        if (inserted.empty()) {
          auto existing = exec("SELECT status, deliveries FROM natspubsub_inbox "
                               "WHERE consumer = $1 AND event_id = $2 FOR UPDATE",
                               {key.consumer, key.event_id});
          if (existing.empty()) {
            throw store::RetryableDatabaseError("inbox row of " + key.event_id + " vanished concurrently");
          }
          if (existing.front().as_text(0) == "processed") return InboxResult::duplicate;
          exec("UPDATE natspubsub_inbox SET status = 'processed', processed_at = now(), last_error = NULL, "
               "deliveries = $3, subject = $4, stream = $5, stream_seq = $6 WHERE consumer = $1 AND event_id = $2",
               {key.consumer, key.event_id, next_deliveries(existing.front().as_int(1), key.deliveries), key.subject,
                key.stream, key.stream_seq});
        }
      } catch (...) {
        broken_ = true;  // the transaction is aborted now (or the connection is gone)
        store::rethrow_postgres_error("inbox batch: recording the delivery of " + key.event_id, &db_.url());
      }
    }

    const std::string savepoint = "natspubsub_inbox_" + std::to_string(++savepoints_);
    bool saved = false;
    std::exception_ptr failure;
    try {
      store::Transaction handle(*txn_);
      handle.before_first_use([&] {
        if (saved) return;  // a copy of the handle used first: one savepoint all the same
        exec("SAVEPOINT " + savepoint, {});
        saved = true;
      });
      handler(handle);
      // A handler that caught a database error and returned normally left the transaction
      // aborted: every later statement, and COMMIT (answered ROLLBACK), would lose the whole
      // batch while acknowledging it. RELEASE fails then, and the message fails alone.
      if (saved) {
        try {
          exec("RELEASE SAVEPOINT " + savepoint, {});
        } catch (const std::exception& e) {
          throw store::DatabaseError("inbox handler for " + key.event_id +
                                         " returned normally after a database error it caught, which aborted its "
                                         "transaction: rethrow it, or catch it inside a savepoint of your own",
                                     "25P02");
        }
      }
      return InboxResult::processed;
    } catch (...) {
      failure = std::current_exception();
    }
    try {
      if (saved) exec("ROLLBACK TO SAVEPOINT " + savepoint, {});
      exec("UPDATE natspubsub_inbox SET status = 'failed', processed_at = NULL, last_error = $3 "
           "WHERE consumer = $1 AND event_id = $2",
           {key.consumer, key.event_id, describe(failure)});
    } catch (const std::exception& e) {
      // The connection is gone, or the handler failed before its savepoint was taken.
      broken_ = true;
      store::detail::logger()->warn("natspubsub: inbox batch could not roll back the handler of {}: {}",
                                    key.event_id, db_.url().scrub(e.what()));
    }
    try {
      std::rethrow_exception(failure);
    } catch (...) {
      store::rethrow_postgres_error("inbox handler for " + key.event_id, &db_.url());
    }
  }

  void commit() override {
    if (broken_) {
      txn_.reset();
      throw store::RetryableDatabaseError("inbox batch: not committed, an earlier error aborted the transaction");
    }
    try {
      if (!reserved_.empty()) {
        // Reserved for a delivery whose handler was never called (middleware stopped it): it
        // was not processed, so its row must not say so.
        nlohmann::json keys = nlohmann::json::array();
        for (const auto& [consumer, event_id] : reserved_) keys.push_back({{"consumer", consumer}, {"event_id", event_id}});
        exec("DELETE FROM natspubsub_inbox AS t USING json_to_recordset($1::json) AS r(consumer text, event_id text) "
             "WHERE t.consumer = r.consumer AND t.event_id = r.event_id",
             {keys.dump()});
        reserved_.clear();
      }
      txn_->commit();
    } catch (...) {
      broken_ = true;
      store::rethrow_postgres_error("inbox batch: COMMIT", &db_.url());
    }
  }

  bool broken() const noexcept override { return broken_; }

 private:
  std::vector<store::Row> exec(std::string_view sql, const store::Params& params) {
    return store::detail::to_rows(store::detail::pg_exec(*txn_, sql, params, &db_.url()));
  }

  store::PostgresDatabase& db_;
  std::optional<pqxx::work> txn_;
  std::set<std::pair<std::string, std::string>> reserved_;  // (consumer, event_id) inserted by reserve()
  std::uint64_t savepoints_ = 0;
  bool broken_ = false;
};

}  // namespace

std::unique_ptr<InboxBatch> begin_postgres_inbox_batch(store::PostgresDatabase& db) {
  return std::make_unique<PostgresInboxBatch>(db);
}

std::unique_ptr<Inbox> make_postgres_inbox(store::PostgresDatabase& db) {
  return std::make_unique<PostgresInbox>(db);
}

}  // namespace natspubsub::detail
