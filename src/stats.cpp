#include <natspubsub/stats.hpp>

#include <algorithm>
#include <cmath>

namespace natspubsub {

Micros LatencySnapshot::mean() const noexcept {
  return count == 0 ? Micros{0} : Micros{sum.count() / static_cast<int64_t>(count)};
}

Micros LatencySnapshot::quantile(double q) const noexcept {
  if (count == 0) return Micros{0};
  const double clamped = std::clamp(q, 0.0, 1.0);
  // Rank of the wanted observation, 1-based: q = 0 is the first, q = 1 the last.
  const auto rank = std::max<uint64_t>(1, static_cast<uint64_t>(std::ceil(clamped * static_cast<double>(count))));
  uint64_t seen = 0;
  for (const auto& b : buckets) {
    seen += b.count;
    if (seen >= rank) return b.upper_bound == Micros::max() ? max : std::min(b.upper_bound, max);
  }
  return max;
}

void LatencyHistogram::record(Micros duration) noexcept {
  const int64_t us = std::max<int64_t>(0, duration.count());
  const auto* end = kUpperBoundsMicros.end();
  const auto* it = std::lower_bound(kUpperBoundsMicros.begin(), end, us);
  counts_[static_cast<size_t>(it - kUpperBoundsMicros.begin())].fetch_add(1, std::memory_order_relaxed);
  sum_.fetch_add(us, std::memory_order_relaxed);
  int64_t seen = max_.load(std::memory_order_relaxed);
  while (us > seen && !max_.compare_exchange_weak(seen, us, std::memory_order_relaxed)) {
  }
}

LatencySnapshot LatencyHistogram::snapshot() const {
  LatencySnapshot s;
  s.buckets.reserve(counts_.size());
  for (size_t i = 0; i < counts_.size(); ++i) {
    const Micros bound = i < kUpperBoundsMicros.size() ? Micros{kUpperBoundsMicros[i]} : Micros::max();
    const uint64_t n = counts_[i].load(std::memory_order_relaxed);
    s.buckets.push_back({bound, n});
    // The total is the sum of the buckets read here, so quantile() ranks stay consistent
    // even while workers keep recording.
    s.count += n;
  }
  s.sum = Micros{sum_.load(std::memory_order_relaxed)};
  s.max = Micros{max_.load(std::memory_order_relaxed)};
  return s;
}

}  // namespace natspubsub
