#pragma once
// Counters and a latency histogram for one subscription, readable from code while it runs.
//
//   for (const auto& s : consumer.stats())
//     spdlog::info("{}: {} acked, {} in the DLQ, p99 {} us", s.durable, s.acked, s.dead_lettered,
//                  s.latency.quantile(0.99).count());
#include <array>
#include <atomic>
#include <chrono>
#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include <natspubsub/circuit_breaker.hpp>
#include <natspubsub/rate_limiter.hpp>

namespace natspubsub {

using Micros = std::chrono::microseconds;

/// A point-in-time copy of a LatencyHistogram.
struct LatencySnapshot {
  struct Bucket {
    Micros upper_bound;  ///< inclusive; Micros::max() for the last (overflow) bucket
    uint64_t count = 0;
  };
  std::vector<Bucket> buckets;
  uint64_t count = 0;
  Micros sum{0};
  Micros max{0};

  [[nodiscard]] Micros mean() const noexcept;
  /// The upper bound of the bucket holding the q-th observation (q in [0, 1]); the largest
  /// observation for the overflow bucket. Zero when empty. Accurate to one bucket.
  [[nodiscard]] Micros quantile(double q) const noexcept;
};

/// Fixed buckets from 100 us to 5 min. Lock-free: recorded from worker threads, read from any.
class LatencyHistogram {
 public:
  static constexpr std::array<int64_t, 19> kUpperBoundsMicros = {
      100,     250,     500,      1000,     2500,     5000,     10000,    25000,     50000,    100000,
      250000,  500000,  1000000,  2500000,  5000000,  10000000, 30000000, 60000000,  300000000};

  void record(Micros duration) noexcept;
  [[nodiscard]] LatencySnapshot snapshot() const;

 private:
  std::array<std::atomic<uint64_t>, kUpperBoundsMicros.size() + 1> counts_{};
  std::atomic<int64_t> sum_{0};
  std::atomic<int64_t> max_{0};
};

/// What one subscription has done since start().
struct SubscriptionStats {
  std::string subject;          ///< the subject filter
  std::string durable;
  std::string stream;
  uint64_t received = 0;        ///< messages fetched
  uint64_t acked = 0;           ///< handler succeeded and the server confirmed the ack
  uint64_t retried = 0;         ///< NAKed with a backoff delay
  uint64_t dead_lettered = 0;   ///< stored in the DLQ (all reasons, including malformed and max_deliveries)
  uint64_t discarded = 0;       ///< failed, acked anyway by an error-policy discard rule
  uint64_t malformed = 0;       ///< bodies that were not an envelope (also counted in dead_lettered)
  uint64_t max_deliveries = 0;  ///< dead-lettered as max_deliveries (also in dead_lettered)
  uint64_t handler_errors = 0;  ///< handler (or middleware) failures of any kind
  uint64_t nacked_on_stop = 0;  ///< fetched but not started when stop() ran: handed back at once
  uint64_t ack_failures = 0;    ///< acks the server did not confirm (the message will come again)
  uint64_t dlq_failures = 0;    ///< DLQ publishes that failed (the message was NAKed instead)
  uint64_t in_flight = 0;       ///< fetched and not settled yet (waiting or running)
  uint64_t running = 0;         ///< handlers running now
  LatencySnapshot latency;      ///< handler time, middleware included
  // ---- protection ----
  uint64_t deferred = 0;        ///< NAKed because the circuit was not closed: waiting, no attempt spent
  std::optional<CircuitBreakerStats> circuit;   ///< when the subscription has a circuit breaker
  std::optional<RateLimiterStats> rate_limit;   ///< when the subscription has a rate limit
};

}  // namespace natspubsub
