#pragma once
// Raw cnats helpers for tests: reading back what the library wrote without going through it.
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include <nats/nats.h>

#include <natspubsub/config.hpp>

namespace natspubsub::testing {

/// A configuration for tests against `url`: testing preset, app `app`, the given env.
Config test_config(const std::string& url, const std::string& app, const std::string& env = "test");

/// A stored message as read straight from the stream.
struct StoredMessage {
  std::string subject;
  std::string data;
  std::string msg_id;      ///< Nats-Msg-Id header
  std::string topic;       ///< topic header
  uint64_t sequence = 0;
  std::vector<std::pair<std::string, std::string>> headers;
};

/// A durable's state as the server reports it.
struct DurableState {
  uint64_t ack_pending = 0;
  uint64_t pending = 0;
  uint64_t redelivered = 0;
  uint64_t ack_floor = 0;    ///< stream sequence
  int64_t max_deliver = 0;
};

/// A raw cnats connection + JetStream context, closed on destruction.
class RawNats {
 public:
  explicit RawNats(const std::string& url);
  ~RawNats();
  RawNats(const RawNats&) = delete;
  RawNats& operator=(const RawNats&) = delete;
  [[nodiscard]] natsConnection* nc() const { return nc_; }
  [[nodiscard]] jsCtx* js() const { return js_; }

  /// Every message of the stream, by sequence (bounded by the stream's message count).
  std::vector<StoredMessage> read_stream(const std::string& stream);
  /// The durable's state (throws if it does not exist).
  DurableState durable_state(const std::string& stream, const std::string& durable);
  /// Message count of a stream (throws if it does not exist).
  uint64_t stream_messages(const std::string& stream);
  /// Creates a stream with these subjects (file storage, R1).
  /// `max_msg_size` > 0: the stream refuses larger messages (JetStream error 10054).
  void add_stream(const std::string& name, const std::vector<std::string>& subjects, int replicas = 1,
                  int32_t max_msg_size = 0);

 private:
  natsConnection* nc_ = nullptr;
  jsCtx* js_ = nullptr;
};

}  // namespace natspubsub::testing
