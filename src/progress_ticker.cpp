#include "progress_ticker.hpp"

#include <algorithm>
#include <chrono>
#include <condition_variable>
#include <mutex>

namespace natspubsub::detail {

Millis ProgressTicker::tick_for(const Subscriptions& subs) {
  Millis tick{1000};
  for (const auto& s : subs) tick = std::min(tick, s->in_progress_interval / 4);
  return std::max(tick, Millis{5});
}

ProgressTicker::ProgressTicker(const Subscriptions& subs)
    : subs_(&subs), tick_(tick_for(subs)), thread_([this](std::stop_token st) { run(st); }) {}

void ProgressTicker::run(const std::stop_token& st) {
  std::mutex m;
  std::condition_variable_any cv;
  while (!st.stop_requested()) {
    {
      std::unique_lock lock(m);
      cv.wait_for(lock, st, tick_, [] { return false; });
    }
    if (st.stop_requested()) return;
    const auto now = std::chrono::steady_clock::now();
    for (const auto& sp : *subs_) {
      auto& s = *sp;
      s.acks->expire(now, false);
      for (auto& d : s.queue->outstanding()) d->signal_in_progress(now, s.in_progress_interval, s.max_in_progress);
    }
  }
}

}  // namespace natspubsub::detail
