#pragma once
// The wire format shared with the NatsPubsub JavaScript and Ruby libraries:
//   {"event_id":"<uuid>","schema_version":1,"topic":"order.created","message_type":"OrderCreated",
//    "producer":"orders","occurred_at":"2026-11-22T10:00:00.000Z","trace_id":"...","message":{...}}
//
//   auto env = natspubsub::Envelope::make("order.created", "orders", {{"id", 42}});
//   std::string body = env.encode();
//   auto back = natspubsub::Envelope::decode(body);  // throws EnvelopeError on bad input
//
// Decoding rules beyond "required fields present, of the right type":
// - schema_version may be absent (read as 1: the JavaScript library always sends it, hand-written
//   bodies often do not); when present it is an integer >= 1. Versions above kSchemaVersion are
//   returned as they are; the caller decides what to do with them.
// - message may be any JSON value (object, array, string, number, boolean, null), but the key
//   must be present. The JavaScript library sends objects.
// - message_type and trace_id may be absent or null (other libraries serialise a missing value
//   as null); both mean "none".
// - event_id is kept exactly as sent (any case): it is the deduplication and inbox key.
// - topic and producer must be non-empty; the topic is not checked against the subject rules
//   (the subject carries the routing; another library's topic is informational).
// - Nesting deeper than kMaxDepth levels is rejected as malformed_json before parsing, so a
//   hostile body cannot exhaust the stack of code that walks the message recursively.
// Every failure is an EnvelopeError (never another exception type, never a crash); its message
// shows the offending text escaped and shortened, safe to put in a log line or a NATS header.
#include <chrono>
#include <cstddef>
#include <optional>
#include <string>
#include <string_view>

#include <nlohmann/json.hpp>

namespace natspubsub {

using SystemTime = std::chrono::time_point<std::chrono::system_clock, std::chrono::milliseconds>;

struct Envelope {
  static constexpr int kSchemaVersion = 1;
  /// Deepest array/object nesting decode accepts (the envelope object itself is level 1).
  static constexpr std::size_t kMaxDepth = 512;

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

  /// JSON text in the field order above (absent optional fields omitted). Throws
  /// EnvelopeError(invalid_value, field) for anything decode() would refuse: event_id not a UUID,
  /// schema_version < 1, empty topic or producer, occurred_at outside years 0000-9999, and a
  /// string that is not valid UTF-8.
  [[nodiscard]] std::string encode() const;
  /// The same content and field checks as encode() (the UTF-8 check happens when text is made);
  /// nlohmann::json keeps keys sorted, so only encode() has the wire field order.
  [[nodiscard]] nlohmann::json to_json() const;

  /// Parses a body. Throws EnvelopeError (kind and field set) for malformed JSON, a body that is
  /// not an object, a missing field, a field of the wrong type, or an invalid value (event_id not
  /// a UUID, occurred_at not RFC 3339, schema_version < 1). Unknown fields are ignored.
  [[nodiscard]] static Envelope decode(std::string_view body);
  [[nodiscard]] static Envelope from_json(const nlohmann::json& j);

  friend bool operator==(const Envelope&, const Envelope&) = default;
};

/// A random UUID v4 in lower-case 8-4-4-4-12 form. Thread-safe; a forked child does not repeat
/// its parent's ids.
[[nodiscard]] std::string new_uuid();
/// True for the 8-4-4-4-12 hex form (any version, either case).
[[nodiscard]] bool is_uuid(std::string_view s) noexcept;
/// "2026-11-22T10:00:00.000Z". Throws EnvelopeError(invalid_value, "timestamp") for a time
/// outside years 0000-9999, which RFC 3339 cannot write.
[[nodiscard]] std::string format_timestamp(SystemTime t);
/// Accepts RFC 3339 with 'Z' or a numeric offset and 0-9 fraction digits; converts to UTC.
/// Throws EnvelopeError(invalid_value, field) on anything else.
/// Accepted: "T" or "t" between date and time, "Z" or "z", "+HH:MM" / "-HH:MM" (offsets up to
/// 23:59), fractions truncated to milliseconds. Refused: out-of-range fields (month 13, Feb 30,
/// hour 24, ...), the leap second 60 (system_clock has none), spaces, missing seconds, and a time
/// that falls outside years 0000-9999 once converted to UTC.
[[nodiscard]] SystemTime parse_timestamp(std::string_view text, std::string_view field = "occurred_at");
[[nodiscard]] SystemTime now_ms();

}  // namespace natspubsub
