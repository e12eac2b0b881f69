#include <natspubsub/backoff.hpp>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <random>

#include <natspubsub/error.hpp>

namespace natspubsub {
namespace {

double unit_random() {
  // One generator per thread: workers compute delays concurrently without a lock.
  thread_local std::mt19937_64 generator{std::random_device{}()};
  return std::uniform_real_distribution<double>(0.0, 1.0)(generator);
}

}  // namespace

Backoff Backoff::exponential(Millis initial, Millis cap, double multiplier, double jitter) {
  if (initial.count() <= 0) throw ConfigError("backoff.initial", "must be greater than 0 ms");
  if (cap < initial) throw ConfigError("backoff.cap", "must be at least backoff.initial");
  if (!(multiplier >= 1.0) || !std::isfinite(multiplier)) throw ConfigError("backoff.multiplier", "must be >= 1");
  if (!(jitter >= 0.0 && jitter <= 1.0)) throw ConfigError("backoff.jitter", "must be between 0 and 1");
  Backoff b;
  b.kind_ = Kind::exponential;
  b.initial_ = initial;
  b.cap_ = cap;
  b.multiplier_ = multiplier;
  b.jitter_ = jitter;
  return b;
}

Backoff Backoff::list(std::vector<Millis> delays) {
  if (delays.empty()) throw ConfigError("backoff", "needs at least one delay");
  for (size_t i = 0; i < delays.size(); ++i) {
    if (delays[i].count() <= 0) throw ConfigError("backoff[" + std::to_string(i) + "]", "must be greater than 0 ms");
  }
  Backoff b;
  b.kind_ = Kind::list;
  b.delays_ = std::move(delays);
  return b;
}

Millis Backoff::base_delay(uint64_t attempt) const {
  const uint64_t n = std::max<uint64_t>(attempt, 1);
  if (kind_ == Kind::list) return delays_[std::min<uint64_t>(n, delays_.size()) - 1];
  // Computed in floating point and clamped before converting, so a large attempt number
  // (a message redelivered for days) cannot overflow.
  const double grown = static_cast<double>(initial_.count()) * std::pow(multiplier_, static_cast<double>(n - 1));
  if (!std::isfinite(grown) || grown >= static_cast<double>(cap_.count())) return cap_;
  return Millis{static_cast<int64_t>(grown)};
}

Millis Backoff::max_delay(uint64_t attempt) const {
  const auto base = base_delay(attempt);
  return base + Millis{static_cast<int64_t>(static_cast<double>(base.count()) * jitter_)};
}

Millis Backoff::delay(uint64_t attempt, double unit) const {
  const auto base = base_delay(attempt);
  if (jitter_ <= 0.0) return base;
  const double u = std::clamp(unit, 0.0, 1.0);
  return base + Millis{static_cast<int64_t>(static_cast<double>(base.count()) * jitter_ * u)};
}

Millis Backoff::delay(uint64_t attempt) const { return delay(attempt, jitter_ > 0.0 ? unit_random() : 0.0); }

std::string Backoff::describe() const {
  if (kind_ == Kind::list) {
    std::string out = "list [";
    for (size_t i = 0; i < delays_.size(); ++i) out += (i ? ", " : "") + std::to_string(delays_[i].count()) + "ms";
    return out + "]";
  }
  char buf[160];
  std::snprintf(buf, sizeof(buf), "exponential %lldms x%g cap %lldms jitter %g", static_cast<long long>(initial_.count()),
                multiplier_, static_cast<long long>(cap_.count()), jitter_);
  return buf;
}

}  // namespace natspubsub
