#include <natspubsub/rate_limiter.hpp>

#include <algorithm>
#include <cmath>

#include <natspubsub/error.hpp>

namespace natspubsub {

void RateLimiterOptions::validate() const {
  if (!(rate > 0) || !std::isfinite(rate)) throw ConfigError("rate_limit.rate", "must be a number greater than 0");
  if (burst != 0 && (!(burst >= 1) || !std::isfinite(burst)))
    throw ConfigError("rate_limit.burst", "must be 0 (rate / 10) or >= 1");
}

nlohmann::json RateLimiterStats::to_json() const {
  return {{"rate", rate}, {"burst", burst}, {"available", available}, {"acquired", acquired}, {"waits", waits}};
}

RateLimiter::RateLimiter(RateLimiterOptions options) : options_(options) {
  options_.validate();
  if (options_.burst == 0) options_.burst = std::max(1.0, options_.rate / 10.0);
  // Start full: a fresh process may do a burst's worth at once, as after any quiet spell.
  tokens_ = options_.burst;
  refilled_at_ = Clock::now();
}

void RateLimiter::refill(Clock::time_point now) const {
  const double seconds = std::chrono::duration<double>(now - refilled_at_).count();
  if (seconds <= 0) return;
  tokens_ = std::min(options_.burst, tokens_ + seconds * options_.rate);
  refilled_at_ = now;
}

bool RateLimiter::try_acquire(int n) {
  if (n <= 0) return true;
  std::lock_guard lock(mutex_);
  refill(Clock::now());
  if (tokens_ < n) return false;
  tokens_ -= n;
  acquired_ += static_cast<uint64_t>(n);
  return true;
}

int RateLimiter::acquire_up_to(int max) {
  if (max <= 0) return 0;
  std::lock_guard lock(mutex_);
  refill(Clock::now());
  const int n = std::min(max, static_cast<int>(std::floor(tokens_)));
  if (n <= 0) return 0;
  tokens_ -= n;
  acquired_ += static_cast<uint64_t>(n);
  return n;
}

Millis RateLimiter::wait_time(int n) const {
  std::lock_guard lock(mutex_);
  refill(Clock::now());
  if (tokens_ >= n) return Millis{0};
  // Rounded up, so waiting this long is always enough.
  return Millis{static_cast<int64_t>(std::ceil((n - tokens_) * 1000.0 / options_.rate))};
}

bool RateLimiter::acquire(int n, Millis max_wait, std::stop_token stop) {
  if (n <= 0) return true;
  if (n > options_.burst) return false;
  const auto deadline = Clock::now() + max_wait;
  std::unique_lock lock(mutex_);
  bool waited = false;
  while (true) {
    const auto now = Clock::now();
    refill(now);
    if (tokens_ >= n) {
      tokens_ -= n;
      acquired_ += static_cast<uint64_t>(n);
      if (waited) waits_++;
      return true;
    }
    if (now >= deadline || stop.stop_requested()) return false;
    waited = true;
    const auto need = std::chrono::duration_cast<Clock::duration>(
        std::chrono::duration<double>((n - tokens_) / options_.rate));
    // Woken early by release() or stop; otherwise when enough tokens have flowed in.
    const uint64_t seen = releases_;
    cv_.wait_for(lock, stop, std::min(need, deadline - now), [&] { return releases_ != seen; });
  }
}

void RateLimiter::release(int n) {
  if (n <= 0) return;
  {
    std::lock_guard lock(mutex_);
    refill(Clock::now());
    tokens_ = std::min(options_.burst, tokens_ + n);
    acquired_ -= std::min<uint64_t>(acquired_, static_cast<uint64_t>(n));
    releases_++;
  }
  cv_.notify_all();
}

RateLimiterStats RateLimiter::stats() const {
  std::lock_guard lock(mutex_);
  refill(Clock::now());
  return RateLimiterStats{options_.rate, options_.burst, tokens_, acquired_, waits_};
}

}  // namespace natspubsub
