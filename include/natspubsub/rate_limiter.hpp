#pragma once
// A token bucket: `rate` tokens per second flow into a bucket holding at most `burst`; each unit
// of work takes one. Over any long stretch no more than rate x seconds + burst units pass.
//
//   natspubsub::RateLimiter limiter({.rate = 50});          // 50 per second, burst 5
//   if (limiter.acquire(1, natspubsub::Millis{1000}, stop))  // waits up to 1 s (or until stop)
//     call_partner_api();
//
// A consumer subscription applies it to fetching (SubscriptionOptions::rate_limit): a pull never
// asks for more messages than there are tokens, so handlers run at full speed and nothing sleeps
// while holding a message. Thread-safe.
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <mutex>
#include <stop_token>

#include <nlohmann/json.hpp>

#include <natspubsub/config.hpp>

namespace natspubsub {

struct RateLimiterOptions {
  double rate = 100.0;  ///< tokens per second (> 0)
  /// Bucket size: how many may pass at once after a quiet spell. 0 picks rate / 10 (at least 1),
  /// a tenth of a second's worth. Must be >= 1 otherwise.
  double burst = 0.0;

  /// Throws ConfigError("rate_limit.<field>", rule).
  void validate() const;
};

struct RateLimiterStats {
  double rate = 0;
  double burst = 0;
  double available = 0;   ///< tokens in the bucket now
  uint64_t acquired = 0;  ///< tokens handed out (minus those given back)
  uint64_t waits = 0;     ///< acquisitions that had to wait for tokens

  /// {"rate","burst","available","acquired","waits"}
  [[nodiscard]] nlohmann::json to_json() const;
};

class RateLimiter {
 public:
  explicit RateLimiter(RateLimiterOptions options);
  RateLimiter(const RateLimiter&) = delete;
  RateLimiter& operator=(const RateLimiter&) = delete;

  /// Takes `n` tokens if they are there now.
  [[nodiscard]] bool try_acquire(int n = 1);
  /// Takes as many whole tokens as are there now, up to `max` (0 when the bucket is empty).
  [[nodiscard]] int acquire_up_to(int max);
  /// Waits until `n` tokens are there and takes them; false (nothing taken) when `max_wait`
  /// passes or `stop` is requested first. `n` above the burst can never be granted: false at once.
  [[nodiscard]] bool acquire(int n, Millis max_wait, std::stop_token stop = {});
  /// Gives back tokens taken but not used (a fetch brought fewer messages than asked for).
  void release(int n);
  /// How long until `n` tokens are there (zero when they are now).
  [[nodiscard]] Millis wait_time(int n = 1) const;

  [[nodiscard]] RateLimiterStats stats() const;
  [[nodiscard]] const RateLimiterOptions& options() const noexcept { return options_; }

 private:
  using Clock = std::chrono::steady_clock;
  void refill(Clock::time_point now) const;

  RateLimiterOptions options_;
  mutable std::mutex mutex_;
  std::condition_variable_any cv_;
  mutable double tokens_ = 0;
  mutable Clock::time_point refilled_at_;
  uint64_t acquired_ = 0;
  uint64_t waits_ = 0;
  uint64_t releases_ = 0;  // bumped by release(): a waiter looks again
};

}  // namespace natspubsub
