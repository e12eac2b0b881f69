#pragma once
// Pipelined acks of one subscription. Each "+ACK" goes out with a reply subject under one
// wildcard inbox and the caller moves on; the server's answer, arriving on cnats' delivery
// thread, counts the message as confirmed, a "no responders" answer as failed. An ack not
// answered within `timeout` counts as failed when expire() runs. Not installed.
//
//   AckPipeline acks(connection, "orders-created", Millis{5000});
//   acks.ack(delivery, event_id, stream_sequence);   // returns at once
//   acks.expire(Clock::now(), false);                // from a timer
//   acks.wait_all(Clock::now() + Millis{5000});      // on stop
//
// Test: tests/ack_pipeline_test.cpp.
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <memory>
#include <mutex>
#include <string>
#include <unordered_map>

#include <natspubsub/config.hpp>

#include "delivery.hpp"
#include "nats_util.hpp"

namespace natspubsub {
class Connection;
}

namespace natspubsub::detail {

// The acks sent and not yet answered. Shared with cnats' delivery thread through the reply
// subscription's closure, so a late answer after the pipeline is gone still finds it alive.
class AckTracker {
 public:
  using Clock = std::chrono::steady_clock;

  AckTracker(std::string durable, std::string inbox, Millis timeout);

  /// Registers an ack about to be sent; returns its reply subject (inbox + ".<id>").
  std::string add(std::string event_id, uint64_t sequence);
  /// The answer on `subject` arrived (`ok`), or the send for it failed (`ok` false, `why`).
  /// Unknown or expired subjects are ignored.
  void settle(const char* subject, bool ok, const char* why);
  /// Acks unanswered past their deadline (all of them with `all`) count as failures.
  void expire(Clock::time_point now, bool all);
  /// Waits until every ack registered so far was answered or expired, or until `until`.
  bool wait_all(Clock::time_point until);

  [[nodiscard]] const std::string& inbox() const noexcept { return inbox_; }
  [[nodiscard]] uint64_t confirmed() const noexcept { return confirmed_; }
  [[nodiscard]] uint64_t failed() const noexcept { return failed_; }
  [[nodiscard]] size_t pending() const;

 private:
  struct Pending {
    std::string event_id;
    uint64_t sequence = 0;
    Clock::time_point deadline;
  };

  const std::string durable_;
  const std::string inbox_;
  const Millis timeout_;
  std::atomic<uint64_t> confirmed_{0}, failed_{0};

  mutable std::mutex mutex_;
  std::condition_variable empty_;
  std::unordered_map<uint64_t, Pending> pending_;
  uint64_t next_id_ = 0;
};

class AckPipeline {
 public:
  using Clock = AckTracker::Clock;

  /// Creates an inbox and subscribes to its answers on `connection` (which must outlive this).
  /// Throws NatsError.
  AckPipeline(Connection& connection, std::string durable, Millis timeout);
  AckPipeline(const AckPipeline&) = delete;
  AckPipeline& operator=(const AckPipeline&) = delete;

  /// Sends "+ACK" for `d` (Delivery::ack) unless a verdict was sent for it already. A send cnats
  /// refuses counts as a failure at once.
  void ack(Delivery& d, std::string event_id, uint64_t sequence);
  void expire(Clock::time_point now, bool all) { tracker_->expire(now, all); }
  bool wait_all(Clock::time_point until) { return tracker_->wait_all(until); }
  /// Unsubscribes from the answers; an ack unanswered by then is only counted by expire().
  void close() { replies_.reset(); }

  [[nodiscard]] uint64_t confirmed() const noexcept { return tracker_->confirmed(); }
  [[nodiscard]] uint64_t failed() const noexcept { return tracker_->failed(); }
  [[nodiscard]] size_t pending() const { return tracker_->pending(); }
  [[nodiscard]] const std::string& inbox() const noexcept { return tracker_->inbox(); }

 private:
  Connection* connection_;
  std::shared_ptr<AckTracker> tracker_;
  SubscriptionPtr replies_;  // wildcard on tracker_->inbox()
};

}  // namespace natspubsub::detail
