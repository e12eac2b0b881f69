#pragma once
// One subscription of a Consumer: a durable pull consumer and the parts that run it, wired
// together. The fetcher (fetcher.hpp) fills the DeliveryQueue (delivery_queue.hpp); each worker
// takes a Delivery (delivery.hpp) and runs process() on it: decode, count attempts, run the
// middleware chain and the handler, then settle it through the AckPipeline (ack_pipeline.hpp),
// a NAK with the backoff delay, or the DeadLetterPath (dead_letter_path.hpp). The Consumer
// (consumer.cpp) fills the settings, calls bind() and start(), and runs stop() across all its
// subscriptions with the parts below. Not installed. Test: tests/subscription_test.cpp.
#include <atomic>
#include <cstdint>
#include <deque>
#include <memory>
#include <mutex>
#include <optional>
#include <set>
#include <stop_token>
#include <string>
#include <thread>
#include <unordered_map>
#include <vector>

#include <natspubsub/backoff.hpp>
#include <natspubsub/circuit_breaker.hpp>
#include <natspubsub/config.hpp>
#include <natspubsub/consumer.hpp>
#include <natspubsub/dlq.hpp>
#include <natspubsub/inbox_handler.hpp>
#include <natspubsub/middleware.hpp>
#include <natspubsub/rate_limiter.hpp>
#include <natspubsub/stats.hpp>

#include "ack_pipeline.hpp"
#include "dead_letter_path.hpp"
#include "delivery.hpp"
#include "delivery_queue.hpp"
#include "fetcher.hpp"
#include "nats_util.hpp"

namespace natspubsub {
class Connection;
}

namespace natspubsub::detail {

struct SubscriptionCounters {
  // acked and ack_failures are counted by the AckPipeline, dead_lettered and dlq_failures by
  // the DeadLetterPath, received by the Fetcher.
  std::atomic<uint64_t> retried{0}, discarded{0}, malformed{0}, max_deliveries{0}, handler_errors{0},
      nacked_on_stop{0};
};

struct Subscription {
  // Settings, fixed before bind().
  std::string filter;
  std::string durable;
  std::string stream;  ///< holds the durable; it must exist before bind()
  // Set on a replay subscription: the durable whose replays it reads (natspubsub-dlq replay).
  // Its messages are shown to the handler, the inbox and the DLQ under that durable's name.
  std::string replay_of;
  int concurrency = 1;
  int prefetch = 0;
  uint64_t max_attempts = 1;
  std::optional<Backoff> backoff;  ///< must be set
  Millis ack_wait{0};
  Millis in_progress_interval{0};
  Millis max_in_progress{0};
  Millis fetch_timeout{0};
  int64_t max_deliver = 0;
  int max_ack_pending = 0;
  ErrorPolicy policy;
  Next chain;                      ///< the middleware chain around the handler
  /// The handler when it is an InboxHandler: a worker then runs the deliveries queued behind the
  /// one it takes in one inbox transaction (process_batch()).
  std::shared_ptr<InboxHandler> inbox;
  std::stop_token handler_stop;    ///< Message::stop_token

  // ---- protection (circuit breaker, rate limit) ----
  std::shared_ptr<CircuitBreaker> breaker;
  std::unique_ptr<RateLimiter> limiter;
  // Deliveries past max_attempts that a delivery count may hold without this process having seen
  // them as deferrals (an earlier process deferred them): kDeferralAllowance with a breaker, else 0.
  uint64_t unseen_deferral_allowance = 0;

  // Parts, made by bind().
  SubscriptionPtr pull;
  SubscriptionPtr advisory;
  std::unique_ptr<AckPipeline> acks;
  std::unique_ptr<DeadLetterPath> letters;
  std::unique_ptr<DeliveryQueue> queue;  // between the fetcher, the workers and stop()

  SubscriptionCounters counters;
  LatencyHistogram latency;
  std::atomic<uint64_t> deferred{0};

  /// Binds a pull subscription to the durable on `stream` (cnats neither creates nor deletes a
  /// consumer) and makes the parts; with `capture_max_deliveries` and a finite max_deliver,
  /// subscribes to the durable's MAX_DELIVERIES advisories. Borrows `connection` and `dlq`, which
  /// must outlive it. Throws NatsError.
  void bind(Connection& connection, const DlqPublisher& dlq, Millis ack_timeout, bool capture_max_deliveries);
  /// Starts the workers, the fetcher and the advisory listener (after bind()).
  void start();
  /// One delivery from begin() to its verdict. Runs on a worker.
  void process(Delivery& d);
  /// Several deliveries, those whose handler runs in one inbox transaction (inbox must be set).
  void process_batch(std::vector<DeliveryPtr>& taken);
  // Stream sequences of messages whose inbox batch did not commit. On redelivery each runs alone,
  // in its own transaction, so a message that breaks the commit every time (a deferred
  // constraint, a key the database refuses) fails alone instead of taking its batch with it.
  std::mutex solo_mutex;
  std::set<uint64_t> solo;
  std::deque<uint64_t> solo_order;  // oldest first; at most kMaxSolo remembered
  bool take_solo(uint64_t stream_sequence);
  void remember_solo(uint64_t stream_sequence);
  [[nodiscard]] SubscriptionStats stats();

  [[nodiscard]] int capacity() const { return concurrency + prefetch; }
  /// The durable that owns the messages: replay_of for a replay subscription.
  [[nodiscard]] const std::string& owner() const { return replay_of.empty() ? durable : replay_of; }

 private:
  void ack(Delivery& d, const Message& m);
  // process() in three steps. prepare(): read and decode, settle what must not reach the handler
  // (malformed, pending letter, past max_attempts, circuit open); the deferred deliveries when
  // the handler is to run, else nullopt. run_handler(): middleware chain and handler.
  // settle(): the verdict (ack, NAK with backoff, DLQ, discard).
  std::optional<uint64_t> prepare(Delivery& d, Message& m);
  std::optional<HandlerFailure> run_handler(const Message& m);
  void settle(Delivery& d, const Message& m, uint64_t deferred_deliveries, const std::optional<HandlerFailure>& failure);
  void worker_loop(const std::stop_token& st);
  void advisory_loop(const std::stop_token& st);
  // ---- protection: circuit breaker ----
  uint64_t deferrals_of(uint64_t sequence);
  void forget_deferrals(uint64_t sequence);
  void defer(Delivery& d, const Message& m, const char* why);

  std::mutex deferrals_mutex_;
  // Stream sequence -> deliveries that were deferrals (circuit not closed), not attempts. In
  // memory: after a restart a message's earlier deferrals count as attempts again.
  std::unordered_map<uint64_t, uint64_t> deferrals_;

 public:
  // Last members: destroyed (stopped and joined) first, while the state above still exists.
  std::unique_ptr<Fetcher> fetcher;
  std::jthread advisor;
  std::vector<std::jthread> workers;
};

}  // namespace natspubsub::detail
