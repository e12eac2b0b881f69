#pragma once
// The deliveries one subscription holds, between its fetcher, its workers and stop(): the
// queue of fetched deliveries no worker has started, the set of outstanding ones (queued or
// running), and the flow control that keeps outstanding within `capacity` (concurrency +
// prefetch). Every wait here is bounded by the caller's `max_wait`. Not installed.
// Test: tests/fetcher_test.cpp.
//
//   DeliveryQueue queue(concurrency + prefetch);
//   // fetcher:  int free = queue.wait_for_room(st, Millis{100}); ... queue.push(fetched);
//   // worker:   if (auto d = queue.take(st, Millis{100})) { run(*d); queue.finish(d); }
//   // stop():   queue.close(); auto unstarted = queue.take_unstarted(running); queue.wait_idle(until);
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <deque>
#include <mutex>
#include <set>
#include <stop_token>
#include <vector>

#include <natspubsub/config.hpp>

#include "delivery.hpp"

namespace natspubsub::detail {

class DeliveryQueue {
 public:
  using Clock = std::chrono::steady_clock;

  /// `capacity`: deliveries held at once, queued and running together (>= 1).
  explicit DeliveryQueue(int capacity);
  DeliveryQueue(const DeliveryQueue&) = delete;
  DeliveryQueue& operator=(const DeliveryQueue&) = delete;

  [[nodiscard]] int capacity() const noexcept { return capacity_; }

  // ---- the fetcher ----

  /// Waits up to `max_wait` until a pull is worth making (wants_fetch) or `st` is requested
  /// (with wake_all()); returns the free slots then, whether or not the wait ended early.
  int wait_for_room(const std::stop_token& st, Millis max_wait);
  /// Adds fetched deliveries, queued and outstanding; wakes one worker per delivery (one, or all).
  void push(std::vector<DeliveryPtr> deliveries);
  /// Waits `duration`, or until `st` is requested (with wake_all()).
  void pause(const std::stop_token& st, Millis duration);

  // ---- workers ----

  /// The oldest queued delivery, counted as running; nullptr when none came within `max_wait`,
  /// when `st` is requested, or after close().
  DeliveryPtr take(const std::stop_token& st, Millis max_wait);
  /// Up to `max` more deliveries that are queued right now (no waiting), oldest first, each
  /// counted as running like take()'s; none after close(). For a worker running a batch.
  std::vector<DeliveryPtr> take_queued(size_t max);
  /// A delivery from take() is done: no longer running nor outstanding. Wakes the fetcher and
  /// stop() when nothing runs, after close(), or when a pull is worth making.
  void finish(const DeliveryPtr& d);

  // ---- stop ----

  /// From now on take() hands out nothing.
  void close();
  /// Removes every queued delivery from the queue and from outstanding and returns them;
  /// `running` is set to the deliveries running at that moment.
  std::deque<DeliveryPtr> take_unstarted(uint64_t& running);
  /// Waits until no delivery is running, or until `until`. True when none is.
  bool wait_idle(Clock::time_point until);
  /// Wakes every thread waiting here, so it looks at its stop token.
  void wake_all();

  // ---- anyone ----

  struct Counts {
    size_t outstanding = 0;  ///< queued and running
    int running = 0;
  };
  [[nodiscard]] Counts counts() const;
  /// A copy of the outstanding deliveries.
  [[nodiscard]] std::vector<DeliveryPtr> outstanding() const;

 private:
  // Under mutex_. A pull is worth making once half the slots are free, or as soon as one is
  // free and no fetched delivery is waiting for a worker: fewer, larger pulls while a backlog is
  // worked off, no delay for a worker about to go idle.
  [[nodiscard]] bool wants_fetch() const;

  const int capacity_;
  mutable std::mutex mutex_;
  std::condition_variable cv_;       // the fetcher and stop(): a slot freed, a worker finished
  std::condition_variable work_cv_;  // workers: a delivery queued, or stop
  std::deque<DeliveryPtr> queue_;    // fetched, not started
  std::set<DeliveryPtr> outstanding_;  // fetched, not finished (queued or running)
  int running_ = 0;
  bool accepting_ = true;  // false after close(): take() starts nothing new
};

}  // namespace natspubsub::detail
