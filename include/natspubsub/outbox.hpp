#pragma once
// The transactional outbox. `enqueue` writes an event into natspubsub_outbox inside the caller's
// own transaction, so the business change and its event commit or roll back together. A relay
// later claims pending rows through an OutboxStore, publishes them (Nats-Msg-Id = event_id) and
// marks them sent.
//
//   pqxx::work tx(db.connection());
//   tx.exec_params("UPDATE orders SET state = 'paid' WHERE id = $1", order_id);
//   natspubsub::enqueue(tx, {.event_id = env.event_id, .subject = "prod.orders.order.paid",
//                            .payload = env.encode(), .partition_key = "order-" + std::to_string(order_id)});
//   tx.commit();
#include <chrono>
#include <cstdint>
#include <limits>
#include <memory>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include <nlohmann/json.hpp>

#include <natspubsub/envelope.hpp>
#include <natspubsub/error.hpp>
#include <natspubsub/features.hpp>
#include <natspubsub/store/database.hpp>

#if NATSPUBSUB_HAS_POSTGRES
namespace pqxx {
class dbtransaction;
}  // namespace pqxx
#endif

namespace natspubsub {

namespace store {
class SqliteTransaction;
}  // namespace store

/// An event to write to the outbox.
struct OutboxMessage {
  std::string event_id;  ///< becomes the Nats-Msg-Id of the publish (JetStream deduplication)
  std::string subject;   ///< full subject, e.g. "prod.orders.order.created"
  std::string payload;   ///< the message body: the encoded envelope
  nlohmann::json headers = nlohmann::json::object();  ///< extra headers: an object of strings
  /// Events with the same key are published in the order they were enqueued.
  std::optional<std::string> partition_key;

  /// The outbox message of an envelope: payload = envelope.encode(), header "topic".
  [[nodiscard]] static OutboxMessage from_envelope(std::string subject, const Envelope& envelope,
                                                   std::optional<std::string> partition_key = {}) {
    return OutboxMessage{envelope.event_id, std::move(subject), envelope.encode(),
                         nlohmann::json{{"topic", envelope.topic}}, std::move(partition_key)};
  }
};

/// A message that cannot be enqueued (empty event_id or subject, headers not an object of strings).
class OutboxError : public Error {
 public:
  using Error::Error;
};

/// Writes `message` as a pending outbox row in the caller's transaction and returns its id.
/// Throws OutboxError for an invalid message, UniqueViolationError when the event_id is already
/// in the outbox, other DatabaseErrors as they come. Nothing is visible before the caller commits.
///
/// On PostgreSQL an event with a partition_key also takes a transaction-scoped advisory lock on
/// the key, held until the caller's commit: two transactions enqueueing under one key take
/// turns, so ids of one key are handed out in commit order and the relay never sees a later id
/// commit before an earlier one.
#if NATSPUBSUB_HAS_POSTGRES
std::int64_t enqueue(pqxx::dbtransaction& txn, const OutboxMessage& message);
#endif
std::int64_t enqueue(store::SqliteTransaction& txn, const OutboxMessage& message);
std::int64_t enqueue(store::Transaction& txn, const OutboxMessage& message);

/// Convenience: enqueue an envelope (payload = envelope.encode()). Defined inline so that only
/// callers of this overload need the envelope codec.
template <typename Txn>
std::int64_t enqueue(Txn& txn, std::string subject, const Envelope& envelope,
                     std::optional<std::string> partition_key = {}) {
  return enqueue(txn, OutboxMessage::from_envelope(std::move(subject), envelope, std::move(partition_key)));
}

enum class OutboxStatus { pending, publishing, sent, failed };
[[nodiscard]] std::string_view to_string(OutboxStatus status) noexcept;
/// Throws OutboxError for an unknown name.
[[nodiscard]] OutboxStatus outbox_status_from_string(std::string_view name);

/// One outbox row as the relay and the operator tool see it.
struct OutboxRow {
  std::int64_t id = 0;
  std::string event_id;
  std::string subject;
  std::string payload;
  nlohmann::json headers = nlohmann::json::object();
  std::optional<std::string> partition_key;
  OutboxStatus status = OutboxStatus::pending;
  int attempts = 0;  ///< failed publish attempts before this claim
  std::optional<std::string> last_error;
  SystemTime next_attempt_at{};
  SystemTime created_at{};
};

/// A publish that failed: the row goes back to pending after `retry_delay`, or to failed when
/// it has had its maximum number of attempts.
struct OutboxFailure {
  std::int64_t id = 0;
  std::string error;
  std::chrono::milliseconds retry_delay{0};
};

struct OutboxFailResult {
  std::vector<std::int64_t> rescheduled;  ///< pending again, with a later next_attempt_at
  std::vector<std::int64_t> failed;       ///< reached the maximum: status failed
};

struct OutboxStats {
  std::int64_t pending = 0;     ///< waiting, including those in backoff
  std::int64_t publishing = 0;  ///< claimed by a relay
  std::int64_t sent = 0;
  std::int64_t failed = 0;
  /// Age of the oldest unsent (pending or publishing) row; nullopt when there is none.
  std::optional<std::chrono::milliseconds> oldest_unsent_age;
  /// Time until the earliest pending row is due (0: one is due now); nullopt when none is pending.
  std::optional<std::chrono::milliseconds> next_due_in;
  std::int64_t max_id = 0;  ///< the largest row id in the table (0: empty)
};

/// The relay's and the operator's view of natspubsub_outbox, for SQLite and PostgreSQL. Every
/// call is one short transaction; the per-batch calls are one statement per batch. The clock is
/// the database's (PostgreSQL now(); SQLite this host's clock), so relays on hosts with skewed
/// clocks agree on leases.
///
/// What a claim returns (in id order) is leased to `relay_id` until `now + lease`: status
/// publishing, locked_by, locked_until. The marks only touch rows still held by the calling
/// relay (status publishing, locked_by = relay_id) and return how many they changed, so a relay
/// whose lease ran out and was taken over cannot overwrite the new holder's outcome.
///
/// Per-key order with several relays (the rule a claim applies): a row with a partition_key is
/// claimable only if every earlier row (smaller id) with the same key is either sent (or
/// deleted) or claimable itself and therefore taken in the same batch, because the batch is the
/// first N claimable rows in id order. So a relay takes a consecutive run of one key's rows
/// in one batch, and a row whose predecessor is held by another relay (live lease), waits for
/// its backoff, or is failed, is not claimed by anyone. Claims on PostgreSQL are serialised by a
/// transaction-scoped advisory lock (the claim is one short statement; publishing happens
/// outside it), so two claims never decide from the same stale snapshot; mark_failed, release,
/// renew_lease and retry_failed, the other transitions that can change whether a row blocks its
/// successors, take the same lock (mark_sent, delete_sent and cleanup only unblock). On SQLite
/// the write lock does the same. A failed row blocks the later rows of its key until the
/// operator retries or deletes it: order is kept, never silently broken.
///
/// OutboxRelay does not use these claims by default: on PostgreSQL it holds its batches by row
/// locks in an open transaction instead, on SQLite it claims by reading under the file's relay
/// lock (RelayOptions::hold_claims); either way it writes each row once.
///
/// For the relay: publish a batch in id order; when a keyed row's publish fails, do not mark
/// its later same-key rows of the batch sent; release them (or fail them too), so they go out
/// after it. Rows inserted by hand (not through enqueue) skip enqueue's per-key lock on
/// PostgreSQL: concurrent writers of one key must then order their commits themselves.
///
///   auto store = natspubsub::make_outbox_store(db);
///   auto rows = store->claim("relay-1", 100, std::chrono::seconds(30));
///   // publish rows in order, wait for the PubAcks, then:
///   store->mark_sent("relay-1", acked_ids);
///   store->mark_failed("relay-1", failures, /*max_attempts=*/10);
class OutboxStore {
 public:
  virtual ~OutboxStore() = default;

  /// Leases up to `batch_size` claimable rows: pending with next_attempt_at <= now, or
  /// publishing with an expired lease (their relay died), subject to the per-key rule above.
  /// Only rows with id <= `up_to_id` are taken (a drain of what was there when it started).
  [[nodiscard]] virtual std::vector<OutboxRow> claim(std::string_view relay_id, std::size_t batch_size,
                                                     std::chrono::milliseconds lease, std::int64_t up_to_id) = 0;
  [[nodiscard]] std::vector<OutboxRow> claim(std::string_view relay_id, std::size_t batch_size,
                                             std::chrono::milliseconds lease) {
    return claim(relay_id, batch_size, lease, std::numeric_limits<std::int64_t>::max());
  }
  /// The claim a relay makes ahead, while its previous batch may still be publishing:
  /// mark_sent (or delete_sent when `delete_sent`) of `sent_ids`, then claim(), in one
  /// transaction (either both happen or neither), except that rows `relay_id` holds are never
  /// taken, even with their lease ended: they count as held, for themselves and for the later
  /// rows of their key. (A batch that outlived its lease must not be claimed again under the
  /// same relay id while it is still being published and marked.)
  [[nodiscard]] virtual std::vector<OutboxRow> mark_sent_and_claim(std::string_view relay_id,
                                                                   std::span<const std::int64_t> sent_ids,
                                                                   bool delete_sent, std::size_t batch_size,
                                                                   std::chrono::milliseconds lease,
                                                                   std::int64_t up_to_id) = 0;
  /// Extends the lease of held rows (a slow publish); returns how many were still held.
  virtual std::size_t renew_lease(std::string_view relay_id, std::span<const std::int64_t> ids,
                                  std::chrono::milliseconds lease) = 0;
  /// Published and acknowledged: status sent, sent_at now (retention "keep").
  virtual std::size_t mark_sent(std::string_view relay_id, std::span<const std::int64_t> ids) = 0;
  /// Published and acknowledged: the rows are deleted (retention "delete").
  virtual std::size_t delete_sent(std::string_view relay_id, std::span<const std::int64_t> ids) = 0;
  /// attempts + 1, last_error; pending again after retry_delay, or failed once attempts reaches
  /// `max_attempts` (>= 1).
  virtual OutboxFailResult mark_failed(std::string_view relay_id, std::span<const OutboxFailure> failures,
                                       int max_attempts) = 0;
  /// Gives held rows back unpublished (shutdown): pending now, attempts unchanged.
  virtual std::size_t release(std::string_view relay_id, std::span<const std::int64_t> ids) = 0;

  /// Deletes at most `batch_limit` sent rows whose sent_at is older than `older_than`, oldest
  /// first; returns how many. Call again while it returns batch_limit.
  virtual std::size_t cleanup_sent(std::chrono::milliseconds older_than, std::size_t batch_limit) = 0;

  [[nodiscard]] virtual OutboxStats stats() = 0;
  /// Failed rows, oldest first.
  [[nodiscard]] virtual std::vector<OutboxRow> list_failed(std::size_t limit) = 0;
  /// Failed rows back to pending now with attempts 0 (last_error kept); returns how many.
  virtual std::size_t retry_failed(std::span<const std::int64_t> ids) = 0;
  virtual std::size_t retry_all_failed() = 0;
};

/// The OutboxStore for `db` (SqliteDatabase or PostgresDatabase). `db` must outlive the store,
/// and, like the connection, the store is used by one thread at a time.
[[nodiscard]] std::unique_ptr<OutboxStore> make_outbox_store(store::Database& db);

}  // namespace natspubsub
