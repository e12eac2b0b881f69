#pragma once
// The inbox: exactly-once processing of an event per (consumer, event_id). In one transaction
// the inbox row is recorded, the handler runs with that transaction, the row is marked
// processed, and everything commits together. A delivery of an event already processed is a
// duplicate: the handler does not run and the message can be acked.
//
//   auto inbox = natspubsub::make_inbox(db);
//   natspubsub::InboxKey key{.consumer = "billing", .event_id = env.event_id, .subject = msg_subject};
//   auto result = inbox->process(key, [&](natspubsub::store::Transaction& tx) {
//     tx.execute("INSERT INTO invoices (order_id) VALUES ($1)", {order_id});
//   });
//   // result is processed or duplicate; a handler exception is rethrown after recording it.
#include <chrono>
#include <cstdint>
#include <functional>
#include <memory>
#include <optional>
#include <string>
#include <string_view>

#include <natspubsub/envelope.hpp>
#include <natspubsub/error.hpp>
#include <natspubsub/store/database.hpp>

namespace natspubsub {

/// An inbox call got an unusable key (empty consumer or event_id).
class InboxError : public Error {
 public:
  using Error::Error;
};

/// Identifies one delivery of an event to one consumer.
struct InboxKey {
  std::string consumer;  ///< durable consumer name
  std::string event_id;
  std::string subject;
  std::string stream;
  std::uint64_t stream_seq = 0;
  /// The NATS delivery count of this delivery, when known (0: unknown). The row's deliveries
  /// becomes the larger of this and the previous count + 1.
  int deliveries = 0;
};

enum class InboxResult {
  processed,  ///< the handler ran and its writes committed with the inbox row
  duplicate,  ///< already processed earlier: the handler did not run
};
[[nodiscard]] std::string_view to_string(InboxResult result) noexcept;

enum class InboxStatus { processing, processed, failed };
[[nodiscard]] std::string_view to_string(InboxStatus status) noexcept;

struct InboxRecord {
  std::string consumer;
  std::string event_id;
  std::string subject;
  std::string stream;
  std::int64_t stream_seq = 0;
  InboxStatus status = InboxStatus::processing;
  int deliveries = 0;
  std::optional<std::string> last_error;
  SystemTime received_at{};
  std::optional<SystemTime> processed_at;
};

/// Exactly-once processing over natspubsub_inbox, for SQLite and PostgreSQL.
///
/// Concurrency: two instances receiving one event at once both try to insert its row. On
/// PostgreSQL the second INSERT ... ON CONFLICT waits on the first's uncommitted row: when the
/// first commits, the second finds it processed (duplicate); when the first rolls back, the
/// second runs the handler. A redelivery of a failed event locks the existing row (SELECT ...
/// FOR UPDATE) before running, with the same effect. On SQLite the transaction holds the
/// database's write lock from its start, so deliveries simply take turns (a handler that runs
/// longer than the other connection's busy timeout makes it fail with RetryableDatabaseError:
/// the message is redelivered later).
///
/// A handler that throws: its writes (and the inbox row) roll back; then a separate short
/// transaction records the row as failed with deliveries and last_error (never overwriting a
/// row another instance has processed meanwhile), and the exception is rethrown, libpqxx errors
/// as the typed store errors. A later delivery runs the handler again.
///
///   auto inbox = natspubsub::make_inbox(db);
///   if (inbox->process(key, handler) == natspubsub::InboxResult::duplicate) log("already done");
class Inbox {
 public:
  using Handler = std::function<void(store::Transaction&)>;
  virtual ~Inbox() = default;

  [[nodiscard]] virtual InboxResult process(const InboxKey& key, const Handler& handler) = 0;
  [[nodiscard]] virtual std::optional<InboxRecord> find(std::string_view consumer, std::string_view event_id) = 0;
  /// Deletes at most `batch_limit` processed rows whose processed_at is older than `older_than`,
  /// oldest first; returns how many. Keep rows longer than an event can still be redelivered
  /// (or replayed from the DLQ): a delivery after its row is gone runs the handler again.
  virtual std::size_t cleanup_processed(std::chrono::milliseconds older_than, std::size_t batch_limit) = 0;
};

/// The Inbox for `db` (SqliteDatabase or PostgresDatabase). `db` must outlive it; one thread at
/// a time, like the connection.
[[nodiscard]] std::unique_ptr<Inbox> make_inbox(store::Database& db);

}  // namespace natspubsub
