#pragma once
// The inbox wired into the consumer runtime: a handler that runs at most once per
// (durable consumer, event_id), with its database writes committed together with the inbox row.
//
//   natspubsub::InboxHandler pay(
//       [] { return natspubsub::store::open_database("postgresql://payments@db/payments"); },
//       [](const natspubsub::Message& m, natspubsub::store::Transaction& tx) {
//         tx.execute("INSERT INTO payments (order_id) VALUES ($1)", {m.envelope.message.at("order_id").get<int64_t>()});
//       });
//   consumer.subscribe_subject("production.orders.order.created", pay);
//   ...
//   spdlog::info("{} duplicates suppressed", pay.duplicates());
//
// A redelivered or replayed event that was processed is acknowledged without running the
// handler. A handler exception rolls back its writes, is recorded on the inbox row (failed,
// deliveries, last_error) and then goes to the consumer's error policy as usual (retry, or the
// DLQ for PermanentError). Database connections are opened on demand, at most one per worker
// running at once, and reused.
//
// Batches: subscribed to a Consumer as it is (the std::function holds the InboxHandler itself),
// a worker takes the deliveries already fetched and waiting (up to max_batch()) and runs them in
// one database transaction, each handler after its own SAVEPOINT. A handler that throws is rolled
// back to its savepoint and its message goes to the error policy as alone; the others commit
// together, and their acks are sent after the commit. A failed commit acks none of them: each is
// retried as after a retryable database error. The consumer's middleware runs around each message
// inside the transaction (it sees the handler's outcome; the commit comes after). A handler
// wrapped in another callable is run one message per transaction. Test: tests/inbox_batch_test.cpp.
#include <cstddef>
#include <cstdint>
#include <exception>
#include <functional>
#include <memory>
#include <vector>

#include <natspubsub/message.hpp>
#include <natspubsub/store/database.hpp>

namespace natspubsub {

class InboxHandler {
 public:
  using DatabaseFactory = std::function<std::unique_ptr<store::Database>()>;
  using Fn = std::function<void(const Message&, store::Transaction&)>;

  InboxHandler(DatabaseFactory open_database, Fn handler);

  /// Runs the handler through the inbox (the Consumer calls this). Inside run_batch() on this
  /// thread: in the batch's transaction, after a savepoint.
  void operator()(const Message& message) const;

  /// At most this many deliveries per transaction (default 32, at most 64); 1 turns batches off.
  InboxHandler& max_batch(int max_messages);
  [[nodiscard]] int max_batch() const noexcept;

  /// Opens one transaction, calls `run(i)` for each message on this thread, and commits.
  /// `run(i)` must not throw; it calls this handler (through the consumer's middleware) for
  /// messages[i], which then runs inside the transaction. Returns nullptr when the transaction
  /// committed, else why not (a failed BEGIN or COMMIT, a lost connection): nothing of the batch
  /// is stored then. Handler exceptions reach `run`'s caller as from operator().
  [[nodiscard]] std::exception_ptr run_batch(const std::vector<const Message*>& messages,
                                             const std::function<void(std::size_t)>& run) const;

  [[nodiscard]] uint64_t processed() const noexcept;
  [[nodiscard]] uint64_t duplicates() const noexcept;
  [[nodiscard]] uint64_t failures() const noexcept;
  /// Transactions that held more than one delivery, and the deliveries they held (committed or not).
  [[nodiscard]] uint64_t batches() const noexcept;
  [[nodiscard]] uint64_t batched() const noexcept;

 private:
  struct State;
  std::shared_ptr<State> state_;
};

}  // namespace natspubsub
