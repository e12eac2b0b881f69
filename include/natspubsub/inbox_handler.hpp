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
#include <cstdint>
#include <functional>
#include <memory>

#include <natspubsub/message.hpp>
#include <natspubsub/store/database.hpp>

namespace natspubsub {

class InboxHandler {
 public:
  using DatabaseFactory = std::function<std::unique_ptr<store::Database>()>;
  using Fn = std::function<void(const Message&, store::Transaction&)>;

  InboxHandler(DatabaseFactory open_database, Fn handler);

  /// Runs the handler through the inbox (the Consumer calls this).
  void operator()(const Message& message) const;

  [[nodiscard]] uint64_t processed() const noexcept;
  [[nodiscard]] uint64_t duplicates() const noexcept;
  [[nodiscard]] uint64_t failures() const noexcept;

 private:
  struct State;
  std::shared_ptr<State> state_;
};

}  // namespace natspubsub
