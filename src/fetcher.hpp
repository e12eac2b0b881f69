#pragma once
// The fetcher of one subscription: a thread that pulls from the durable into a DeliveryQueue,
// never asking for more than the queue's free slots, and only what the circuit breaker (none
// while open, its probes while half-open) and the rate limiter allow. Not installed.
// Test: tests/fetcher_test.cpp.
//
//   DeliveryQueue queue(8);
//   Fetcher fetcher(pull_subscription, queue, {.durable = "orders", .fetch_timeout = Millis{1000}});
//   fetcher.start();
//   ...
//   fetcher.request_stop(); queue.wake_all(); fetcher.join();   // within fetch_timeout
#include <atomic>
#include <cstdint>
#include <memory>
#include <stop_token>
#include <string>
#include <thread>

#include <nats/nats.h>

#include <natspubsub/circuit_breaker.hpp>
#include <natspubsub/config.hpp>
#include <natspubsub/rate_limiter.hpp>

#include "delivery_queue.hpp"

namespace natspubsub::detail {

class Fetcher {
 public:
  struct Options {
    std::string durable{};                    ///< names the subscription in logs
    Millis fetch_timeout{1000};               ///< how long one pull waits for its first message
    std::shared_ptr<CircuitBreaker> breaker{};  ///< may be null
    RateLimiter* limiter = nullptr;           ///< may be null; borrowed
  };

  /// Borrows `pull` (a pull subscription bound to the durable) and `queue`, which must outlive it.
  Fetcher(natsSubscription* pull, DeliveryQueue& queue, Options options);
  Fetcher(const Fetcher&) = delete;
  Fetcher& operator=(const Fetcher&) = delete;
  /// Requests stop and joins the thread.
  ~Fetcher() = default;

  /// Starts the thread (once).
  void start();
  void request_stop() { thread_.request_stop(); }
  void join() {
    if (thread_.joinable()) thread_.join();
  }

  /// Messages fetched so far.
  [[nodiscard]] uint64_t received() const noexcept { return received_; }

 private:
  void run(const std::stop_token& st);
  // Shrinks `batch` to what the circuit and the rate limit allow now. False when nothing may be
  // fetched yet; it has then waited (bounded by kIdleWait) before the caller looks again.
  bool limit(int& batch, const std::stop_token& st);
  // Moves the messages of `list` into the queue as deliveries; destroys the list.
  void enqueue(natsMsgList& list);

  natsSubscription* pull_;
  DeliveryQueue* queue_;
  const Options options_;
  std::atomic<uint64_t> received_{0};
  std::jthread thread_;  // last: stopped and joined first
};

}  // namespace natspubsub::detail
