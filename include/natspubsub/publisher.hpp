#pragma once
// Publishing events to JetStream with the NatsPubsub envelope and deduplication by event id.
//
//   natspubsub::Publisher publisher(connection);
//   auto ack = publisher.publish("order.created", {{"order_id", 42}});   // waits for the PubAck
//   spdlog::info("stored in {} at {}", ack.stream, ack.sequence);
//
//   std::vector<natspubsub::OutgoingEvent> batch = ...;
//   for (const auto& r : publisher.publish_batch(batch))                  // async window
//     if (!r) retry_later(r.event_id, r.error->message);
//
// Every message carries `Nats-Msg-Id: <event_id>`, so publishing the same event id again inside
// the stream's duplicate window stores nothing and reports `duplicate = true`.
#include <chrono>
#include <cstdint>
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include <natspubsub/config.hpp>
#include <natspubsub/envelope.hpp>

namespace natspubsub {

class Connection;

using Headers = std::map<std::string, std::string>;

struct PublishOptions {
  std::optional<std::string> event_id;       ///< default: a new UUID
  std::optional<std::string> message_type;
  std::optional<std::string> trace_id;
  std::optional<std::string> traceparent;    ///< W3C trace context header
  std::optional<std::string> subject;        ///< full subject (e.g. another app's); default {env}.{app}.{topic}
  Headers headers;                           ///< extra headers
  std::optional<uint64_t> expected_last_sequence;  ///< optimistic concurrency on the stream
  std::optional<std::string> expected_stream;
};

/// Why one message was not stored.
struct PublishFailure {
  int status = 0;          ///< cnats natsStatus
  int js_error_code = 0;   ///< JetStream jsErrCode, 0 if none
  std::string message;
  /// True when sending the same message again may succeed (timeouts, lost connection);
  /// false for refusals (payload too large, wrong last sequence, no stream for the subject).
  bool retryable = false;
};

/// The outcome of one publish: where it was stored, or why not.
struct PublishResult {
  std::string event_id;
  std::string subject;
  std::string stream;
  uint64_t sequence = 0;
  bool duplicate = false;  ///< the stream already had this event id: nothing new was stored
  std::optional<PublishFailure> error;
  [[nodiscard]] explicit operator bool() const noexcept { return !error.has_value(); }
};

/// An event for publish_batch.
struct OutgoingEvent {
  std::string topic;
  nlohmann::json message = nlohmann::json::object();
  PublishOptions options;
};

/// A message whose body is already encoded (the outbox relay uses these).
struct RawMessage {
  std::string subject;
  std::string payload;
  std::string msg_id;   ///< Nats-Msg-Id; normally the event id
  Headers headers;
};

struct BatchOptions {
  int window = 256;            ///< messages in flight (published, not yet acknowledged)
  Millis ack_timeout{10000};   ///< how long one message may wait for its PubAck
};

/// Publishes on a Connection it borrows (which must outlive it). Thread-safe: publish() may be
/// called from several threads; publish_batch() calls run one at a time per Publisher.
class Publisher {
 public:
  explicit Publisher(Connection& connection);
  ~Publisher();
  Publisher(const Publisher&) = delete;
  Publisher& operator=(const Publisher&) = delete;

  /// Publishes `message` under `topic` (subject {env}.{app}.{topic} unless options.subject) and
  /// waits for the PubAck. Throws PublishError (refused: too large, no stream, wrong sequence),
  /// TimeoutError (no ack in time) or ConnectionError. SubjectError for an invalid topic.
  PublishResult publish(const std::string& topic, const nlohmann::json& message, const PublishOptions& options = {});

  /// Publishes an envelope as is (its event_id becomes the Nats-Msg-Id).
  PublishResult publish_envelope(const Envelope& envelope, const PublishOptions& options = {});

  /// Async publishing with at most `window` messages in flight; one result per input, in order.
  /// Never throws for a single message's failure: its result carries the error. Invalid topics
  /// fail their own result only.
  [[nodiscard]] std::vector<PublishResult> publish_batch(const std::vector<OutgoingEvent>& events,
                                                         const BatchOptions& options = {});
  [[nodiscard]] std::vector<PublishResult> publish_raw_batch(const std::vector<RawMessage>& messages,
                                                             const BatchOptions& options = {});
  /// Builds the envelope and headers for an event without sending it.
  [[nodiscard]] RawMessage prepare(const std::string& topic, const nlohmann::json& message,
                                   const PublishOptions& options = {}) const;

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

}  // namespace natspubsub
