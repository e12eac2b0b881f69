#pragma once
// The wire format shared with the NatsPubsub JavaScript and Ruby libraries:
//   {"event_id":"<uuid>","schema_version":1,"topic":"order.created","message_type":"OrderCreated",
//    "producer":"orders","occurred_at":"2026-11-22T10:00:00.000Z","trace_id":"...","message":{...}}
//
//   auto env = natspubsub::Envelope::make("order.created", "orders", {{"id", 42}});
//   std::string body = env.encode();
//   auto back = natspubsub::Envelope::decode(body);  // throws EnvelopeError on bad input
#include <chrono>
#include <optional>
#include <string>
#include <string_view>

#include <nlohmann/json.hpp>

namespace natspubsub {

using SystemTime = std::chrono::time_point<std::chrono::system_clock, std::chrono::milliseconds>;

struct Envelope {
  static constexpr int kSchemaVersion = 1;

  std::string event_id;                 ///< UUID; also the Nats-Msg-Id of the publish.
  int schema_version = kSchemaVersion;
  std::string topic;                    ///< e.g. "order.created" (without env and app).
  std::optional<std::string> message_type;
  std::string producer;                 ///< The publishing app.
  SystemTime occurred_at{};             ///< UTC, millisecond precision.
  std::optional<std::string> trace_id;
  nlohmann::json message = nlohmann::json::object();

  /// A new envelope with a fresh UUID v4 event id and the current time.
  [[nodiscard]] static Envelope make(std::string topic, std::string producer, nlohmann::json message);

  /// JSON text in the field order above. Throws EnvelopeError if a required field is empty.
  [[nodiscard]] std::string encode() const;
  [[nodiscard]] nlohmann::json to_json() const;

  /// Parses a body. Throws EnvelopeError (kind and field set) for malformed JSON, a body that is
  /// not an object, a missing field, a field of the wrong type, or an invalid value (event_id not
  /// a UUID, occurred_at not RFC 3339, schema_version < 1). Unknown fields are ignored.
  [[nodiscard]] static Envelope decode(std::string_view body);
  [[nodiscard]] static Envelope from_json(const nlohmann::json& j);
};

/// A random UUID v4 in lower-case 8-4-4-4-12 form.
[[nodiscard]] std::string new_uuid();
/// True for the 8-4-4-4-12 hex form (any version, either case).
[[nodiscard]] bool is_uuid(std::string_view s) noexcept;
/// "2026-11-22T10:00:00.000Z".
[[nodiscard]] std::string format_timestamp(SystemTime t);
/// Accepts RFC 3339 with 'Z' or a numeric offset and 0-9 fraction digits; converts to UTC.
/// Throws EnvelopeError(invalid_value, field) on anything else.
[[nodiscard]] SystemTime parse_timestamp(std::string_view text, std::string_view field = "occurred_at");
[[nodiscard]] SystemTime now_ms();

}  // namespace natspubsub
