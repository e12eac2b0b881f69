#pragma once
// A durable pull consumer made with raw cnats, for tests of the consumer runtime's parts: they
// get real JetStream messages (with reply subjects and metadata) without the Consumer class.
#include <chrono>
#include <cstdint>
#include <string>
#include <vector>

#include <nats/nats.h>

#include "support/nats_helpers.hpp"

namespace natspubsub::testing {

class PullConsumer {
 public:
  struct Options {
    std::chrono::milliseconds ack_wait{30000};
    int64_t max_deliver = -1;
  };

  /// Creates durable `durable` on `stream` filtered by `filter`, and binds a pull subscription.
  PullConsumer(RawNats& raw, const std::string& stream, const std::string& durable, const std::string& filter);
  PullConsumer(RawNats& raw, const std::string& stream, const std::string& durable, const std::string& filter,
               Options options);
  ~PullConsumer();
  PullConsumer(const PullConsumer&) = delete;
  PullConsumer& operator=(const PullConsumer&) = delete;

  [[nodiscard]] natsSubscription* subscription() const { return sub_; }

  /// Publishes `body` to `subject` and waits for the PubAck; returns the stream sequence.
  uint64_t publish(const std::string& subject, const std::string& body);
  /// Up to `batch` messages (the caller owns them), waiting up to `timeout` for the first.
  std::vector<natsMsg*> fetch(int batch, std::chrono::milliseconds timeout);
  /// One message (the caller owns it), or nullptr when none came within `timeout`.
  natsMsg* fetch_one(std::chrono::milliseconds timeout);

 private:
  RawNats* raw_;
  natsSubscription* sub_ = nullptr;
};

/// The JetStream delivery count of `msg` (0 without metadata).
uint64_t deliveries_of(natsMsg* msg);
/// The stream sequence of `msg` (0 without metadata).
uint64_t stream_sequence_of(natsMsg* msg);

}  // namespace natspubsub::testing
