#pragma once
// What a handler receives: the decoded envelope, the raw body and headers, and where JetStream
// has the message (stream, sequence, delivery count).
//
//   consumer.subscribe("order.created", [](const natspubsub::Message& m) {
//     auto order_id = m.envelope.message.at("order_id").get<int64_t>();
//     if (m.last_attempt()) spdlog::warn("last try for {}", m.envelope.event_id);
//   });
#include <cstdint>
#include <stop_token>
#include <string>
#include <string_view>

#include <natspubsub/envelope.hpp>
#include <natspubsub/publisher.hpp>

namespace natspubsub {

/// The JetStream side of a delivered message.
struct MessageMetadata {
  std::string stream;
  std::string consumer;            ///< the durable name
  uint64_t stream_sequence = 0;
  uint64_t consumer_sequence = 0;
  uint64_t deliveries = 0;         ///< 1 on the first delivery; kept by the server across restarts
  uint64_t pending = 0;            ///< messages left for this consumer after this one
  SystemTime timestamp{};          ///< when the stream stored the message
};

struct Message {
  Envelope envelope;
  std::string subject;             ///< the full subject, e.g. "production.orders.order.created"
  std::string body;                ///< the raw body, exactly as stored
  Headers headers;                 ///< repeated header values are joined with ", "
  MessageMetadata metadata;
  uint64_t max_attempts = 0;       ///< of the subscription: the attempt at which failure means the DLQ
  /// Requested when the consumer's stop deadline has passed: a long handler should give up
  /// (its message is handed back to the server for another instance).
  std::stop_token stop_token;

  /// The delivery count, 1-based.
  [[nodiscard]] uint64_t attempt() const noexcept { return metadata.deliveries; }
  /// True when a failure now sends the message to the DLQ instead of retrying it.
  [[nodiscard]] bool last_attempt() const noexcept { return metadata.deliveries >= max_attempts; }
  /// A header value (exact name first, then case-insensitive); empty when absent.
  [[nodiscard]] std::string header(std::string_view name) const {
    if (auto it = headers.find(std::string(name)); it != headers.end()) return it->second;
    for (const auto& [key, value] : headers) {
      if (key.size() != name.size()) continue;
      bool same = true;
      for (size_t i = 0; i < key.size() && same; ++i) {
        auto lower = [](char c) { return c >= 'A' && c <= 'Z' ? static_cast<char>(c - 'A' + 'a') : c; };
        same = lower(key[i]) == lower(name[i]);
      }
      if (same) return value;
    }
    return {};
  }
};

}  // namespace natspubsub
