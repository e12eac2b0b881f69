#pragma once
// One thread for all subscriptions of a Consumer. Every tick it counts the acks that went
// unanswered past their deadline as failed (AckPipeline::expire), and sends "+WPI" for each
// outstanding delivery, queued or running, whose in_progress_interval has passed since its last
// one, until max_in_progress after its fetch (Delivery::signal_in_progress).
// Not installed. Test: tests/progress_ticker_test.cpp.
#include <memory>
#include <stop_token>
#include <thread>
#include <vector>

#include <natspubsub/config.hpp>

#include "subscription.hpp"

namespace natspubsub::detail {

class ProgressTicker {
 public:
  using Subscriptions = std::vector<std::unique_ptr<Subscription>>;

  /// A quarter of the shortest in_progress_interval of `subs`, at least 5 ms and at most 1 s.
  [[nodiscard]] static Millis tick_for(const Subscriptions& subs);

  /// Starts the thread. Borrows `subs` (bound subscriptions), which must outlive it and not change.
  explicit ProgressTicker(const Subscriptions& subs);
  ProgressTicker(const ProgressTicker&) = delete;
  ProgressTicker& operator=(const ProgressTicker&) = delete;
  /// Stops and joins the thread (within one tick).
  ~ProgressTicker() = default;

  [[nodiscard]] Millis tick() const noexcept { return tick_; }

 private:
  void run(const std::stop_token& st);

  const Subscriptions* subs_;
  const Millis tick_;
  std::jthread thread_;  // last: stopped and joined first
};

}  // namespace natspubsub::detail
