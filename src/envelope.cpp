#include <natspubsub/envelope.hpp>

#include <unistd.h>

#include <array>
#include <cstdint>
#include <limits>
#include <random>
#include <string>
#include <utility>

#include <natspubsub/error.hpp>

#include "printable.hpp"

namespace natspubsub {
namespace {

using Kind = EnvelopeError::Kind;
namespace chr = std::chrono;

[[noreturn]] void fail(Kind kind, std::string_view field, const std::string& detail) {
  throw EnvelopeError(kind, std::string(field), "invalid envelope: " + detail);
}

// ---- timestamps -----------------------------------------------------------------------------

// RFC 3339 has four year digits; outside this range format_timestamp could not write a time
// that parse_timestamp reads back.
constexpr chr::sys_days kFirstDay = chr::sys_days{chr::year{0} / chr::January / 1};
constexpr chr::sys_days kPastLastDay = chr::sys_days{chr::year{10000} / chr::January / 1};

bool in_rfc3339_range(SystemTime t) noexcept { return t >= kFirstDay && t < kPastLastDay; }

[[noreturn]] void bad_timestamp(std::string_view text, std::string_view field, const std::string& why) {
  fail(Kind::invalid_value, field,
       std::string(field) + " " + detail::quoted(text) + " is not an RFC 3339 timestamp: " + why);
}

// Reads the fixed-width fields of a timestamp left to right; every method returns false instead
// of reading past the end.
class Cursor {
 public:
  explicit Cursor(std::string_view text) : text_(text) {}

  bool number(std::size_t width, int& out) {
    if (text_.size() - pos_ < width) {
      return false;
    }
    int value = 0;
    for (std::size_t i = 0; i < width; ++i) {
      const char c = text_[pos_ + i];
      if (c < '0' || c > '9') {
        return false;
      }
      value = value * 10 + (c - '0');
    }
    pos_ += width;
    out = value;
    return true;
  }

  bool literal(char c) { return one_of(std::string_view(&c, 1)); }

  bool one_of(std::string_view choices) {
    if (pos_ < text_.size() && choices.find(text_[pos_]) != std::string_view::npos) {
      last_ = text_[pos_++];
      return true;
    }
    return false;
  }

  bool digit() {
    if (pos_ < text_.size() && text_[pos_] >= '0' && text_[pos_] <= '9') {
      last_ = text_[pos_++];
      return true;
    }
    return false;
  }

  [[nodiscard]] char last() const noexcept { return last_; }
  [[nodiscard]] bool at_end() const noexcept { return pos_ == text_.size(); }

 private:
  std::string_view text_;
  std::size_t pos_ = 0;
  char last_ = '\0';
};

// Writes a non-negative `value` zero-padded to `width` digits (callers pass values that fit).
void append_digits(std::string& out, int value, int width) {
  char digits[4] = {'0', '0', '0', '0'};
  for (int i = width - 1; i >= 0; --i) {
    digits[i] = static_cast<char>('0' + value % 10);
    value /= 10;
  }
  out.append(digits, static_cast<std::size_t>(width));
}

std::string two_digits(int value) {
  std::string out;
  append_digits(out, value, 2);
  return out;
}

// ---- decoding helpers -----------------------------------------------------------------------

// Counts array/object nesting outside strings. For valid JSON this is the exact depth; for
// invalid JSON the verdict is "malformed" either way.
bool deeper_than(std::string_view body, std::size_t limit) noexcept {
  std::size_t depth = 0;
  bool in_string = false;
  bool escaped = false;
  for (const char c : body) {
    if (in_string) {
      if (escaped) {
        escaped = false;
      } else if (c == '\\') {
        escaped = true;
      } else if (c == '"') {
        in_string = false;
      }
    } else if (c == '"') {
      in_string = true;
    } else if (c == '[' || c == '{') {
      if (++depth > limit) {
        return true;
      }
    } else if ((c == ']' || c == '}') && depth > 0) {
      --depth;
    }
  }
  return false;
}

// nlohmann's messages start with "[json.exception.parse_error.101] "; the reader wants the rest.
std::string parser_message(const char* what) {
  std::string_view text(what);
  if (!text.empty() && text.front() == '[') {
    const auto close = text.find("] ");
    if (close != std::string_view::npos) {
      text.remove_prefix(close + 2);
    }
  }
  // The parser quotes the bytes it choked on ("last read: ..."), which may be anything.
  return detail::printable(text, 200);
}

const nlohmann::json& required(const nlohmann::json& j, const char* field) {
  const auto it = j.find(field);
  if (it == j.end()) {
    fail(Kind::missing_field, field, std::string("missing required field \"") + field + "\"");
  }
  return *it;
}

[[noreturn]] void wrong_type(const char* field, const char* expected, const nlohmann::json& value) {
  fail(Kind::wrong_type, field, std::string(field) + " must be " + expected + ", got " + value.type_name());
}

std::string required_string(const nlohmann::json& j, const char* field) {
  const auto& value = required(j, field);
  if (!value.is_string()) {
    wrong_type(field, "a string", value);
  }
  return value.get<std::string>();
}

std::string required_non_empty(const nlohmann::json& j, const char* field) {
  auto value = required_string(j, field);
  if (value.empty()) {
    fail(Kind::invalid_value, field, std::string(field) + " must not be empty");
  }
  return value;
}

std::optional<std::string> optional_string(const nlohmann::json& j, const char* field) {
  const auto it = j.find(field);
  if (it == j.end() || it->is_null()) {
    return std::nullopt;
  }
  if (!it->is_string()) {
    wrong_type(field, "a string (or absent)", *it);
  }
  return it->get<std::string>();
}

int schema_version_of(const nlohmann::json& j) {
  constexpr const char* kField = "schema_version";
  const auto it = j.find(kField);
  if (it == j.end()) {
    return Envelope::kSchemaVersion;
  }
  // 1.0 is refused with 1.5: every known producer writes an integer, and accepting some
  // floats would make the rule depend on how a number happens to be spelled.
  if (!it->is_number_integer()) {
    wrong_type(kField, "an integer", *it);
  }
  const bool fits = it->is_number_unsigned()
                        ? it->get<std::uint64_t>() <= static_cast<std::uint64_t>(std::numeric_limits<int>::max())
                        : it->get<std::int64_t>() <= std::numeric_limits<int>::max();
  const bool positive = it->is_number_unsigned() ? it->get<std::uint64_t>() >= 1 : it->get<std::int64_t>() >= 1;
  if (!positive || !fits) {
    fail(Kind::invalid_value, kField,
         "schema_version must be an integer from 1 to " + std::to_string(std::numeric_limits<int>::max()) +
             ", got " + it->dump());
  }
  return it->get<int>();
}

// ---- encoding helpers -----------------------------------------------------------------------

void check_encodable(const Envelope& e) {
  if (!is_uuid(e.event_id)) {
    fail(Kind::invalid_value, "event_id",
         e.event_id.empty() ? std::string("event_id must not be empty")
                            : "event_id must be a UUID (8-4-4-4-12 hex), got " + detail::quoted(e.event_id));
  }
  if (e.schema_version < 1) {
    fail(Kind::invalid_value, "schema_version",
         "schema_version must be at least 1, got " + std::to_string(e.schema_version));
  }
  if (e.topic.empty()) {
    fail(Kind::invalid_value, "topic", "topic must not be empty");
  }
  if (e.producer.empty()) {
    fail(Kind::invalid_value, "producer", "producer must not be empty");
  }
  if (!in_rfc3339_range(e.occurred_at)) {
    fail(Kind::invalid_value, "occurred_at", "occurred_at must lie in the years 0000-9999");
  }
}

// One builder for both JSON flavours: nlohmann::json (sorted keys) for to_json, ordered_json
// (insertion order, the wire order) for encode.
template <class Json>
Json build_json(const Envelope& e) {
  check_encodable(e);
  Json j = Json::object();
  j["event_id"] = e.event_id;
  j["schema_version"] = e.schema_version;
  j["topic"] = e.topic;
  if (e.message_type) {
    j["message_type"] = *e.message_type;
  }
  j["producer"] = e.producer;
  j["occurred_at"] = format_timestamp(e.occurred_at);
  if (e.trace_id) {
    j["trace_id"] = *e.trace_id;
  }
  j["message"] = Json(e.message);
  return j;
}

}  // namespace

// ---- Envelope -------------------------------------------------------------------------------

Envelope Envelope::make(std::string topic, std::string producer, nlohmann::json message) {
  Envelope e;
  e.event_id = new_uuid();
  e.topic = std::move(topic);
  e.producer = std::move(producer);
  e.occurred_at = now_ms();
  e.message = std::move(message);
  return e;
}

std::string Envelope::encode() const {
  const auto j = build_json<nlohmann::ordered_json>(*this);
  try {
    return j.dump();
  } catch (const nlohmann::json::exception&) {
    // Serialising only fails on a string that is not valid UTF-8; name the field holding it.
    for (const auto& [key, value] : j.items()) {
      try {
        (void)value.dump();
      } catch (const nlohmann::json::exception&) {
        fail(Kind::invalid_value, key, key + " holds a string that is not valid UTF-8");
      }
    }
    fail(Kind::invalid_value, "", "the envelope could not be serialised");
  }
}

nlohmann::json Envelope::to_json() const { return build_json<nlohmann::json>(*this); }

Envelope Envelope::decode(std::string_view body) {
  // nlohmann's lexer reads a NUL byte as the end of input, so "{...}\0junk" would decode. JSON
  // text never holds a raw NUL (not even inside a string), so any NUL makes the body malformed.
  if (const auto nul = body.find('\0'); nul != std::string_view::npos) {
    fail(Kind::malformed_json, "", "malformed JSON: NUL byte at offset " + std::to_string(nul));
  }
  if (deeper_than(body, kMaxDepth)) {
    fail(Kind::malformed_json, "", "malformed JSON: nested deeper than " + std::to_string(kMaxDepth) + " levels");
  }
  nlohmann::json j;
  try {
    j = nlohmann::json::parse(body.begin(), body.end());
  } catch (const nlohmann::json::exception& e) {
    // parse_error for bad syntax, bad UTF-8 and truncation; out_of_range for numbers too large.
    fail(Kind::malformed_json, "", "malformed JSON: " + parser_message(e.what()));
  }
  return from_json(j);
}

Envelope Envelope::from_json(const nlohmann::json& j) {
  if (!j.is_object()) {
    fail(Kind::not_an_object, "", std::string("the body must be a JSON object, got ") + j.type_name());
  }
  Envelope e;
  e.event_id = required_string(j, "event_id");
  if (!is_uuid(e.event_id)) {
    fail(Kind::invalid_value, "event_id",
         "event_id must be a UUID (8-4-4-4-12 hex), got " + detail::quoted(e.event_id));
  }
  e.schema_version = schema_version_of(j);
  e.topic = required_non_empty(j, "topic");
  e.message_type = optional_string(j, "message_type");
  e.producer = required_non_empty(j, "producer");
  e.occurred_at = parse_timestamp(required_string(j, "occurred_at"), "occurred_at");
  e.trace_id = optional_string(j, "trace_id");
  e.message = required(j, "message");
  return e;
}

// ---- free functions -------------------------------------------------------------------------

std::string new_uuid() {
  // One generator per thread, so no lock. A forked child inherits the parent's generator state
  // and would repeat its ids, which JetStream deduplication then silently drops: reseed when the
  // process id changes.
  struct Generator {
    std::mt19937_64 engine;
    pid_t pid = -1;
  };
  thread_local Generator generator;
  const pid_t pid = ::getpid();
  if (generator.pid != pid) {
    std::random_device device;
    std::seed_seq seed{device(), device(), device(), device(), device(), device(), device(), device()};
    generator.engine.seed(seed);
    generator.pid = pid;
  }

  std::array<unsigned char, 16> bytes{};
  for (std::size_t half = 0; half < 2; ++half) {
    std::uint64_t word = generator.engine();
    for (std::size_t i = 0; i < 8; ++i) {
      bytes[half * 8 + i] = static_cast<unsigned char>(word & 0xff);
      word >>= 8;
    }
  }
  bytes[6] = static_cast<unsigned char>((bytes[6] & 0x0f) | 0x40);  // version 4
  bytes[8] = static_cast<unsigned char>((bytes[8] & 0x3f) | 0x80);  // variant 10xx (RFC 4122)

  static constexpr char kHex[] = "0123456789abcdef";
  std::string out;
  out.reserve(36);
  for (std::size_t i = 0; i < bytes.size(); ++i) {
    if (i == 4 || i == 6 || i == 8 || i == 10) {
      out += '-';
    }
    out += kHex[bytes[i] >> 4];
    out += kHex[bytes[i] & 0x0f];
  }
  return out;
}

bool is_uuid(std::string_view s) noexcept {
  if (s.size() != 36) {
    return false;
  }
  for (std::size_t i = 0; i < s.size(); ++i) {
    const char c = s[i];
    if (i == 8 || i == 13 || i == 18 || i == 23) {
      if (c != '-') {
        return false;
      }
    } else if (!((c >= '0' && c <= '9') || (c >= 'a' && c <= 'f') || (c >= 'A' && c <= 'F'))) {
      return false;
    }
  }
  return true;
}

std::string format_timestamp(SystemTime t) {
  if (!in_rfc3339_range(t)) {
    fail(Kind::invalid_value, "timestamp", "a timestamp must lie in the years 0000-9999");
  }
  const auto day = chr::floor<chr::days>(t);
  const chr::year_month_day date{day};
  const chr::hh_mm_ss time{t - day};
  std::string out;
  out.reserve(24);
  append_digits(out, static_cast<int>(date.year()), 4);
  out += '-';
  append_digits(out, static_cast<int>(static_cast<unsigned>(date.month())), 2);
  out += '-';
  append_digits(out, static_cast<int>(static_cast<unsigned>(date.day())), 2);
  out += 'T';
  append_digits(out, static_cast<int>(time.hours().count()), 2);
  out += ':';
  append_digits(out, static_cast<int>(time.minutes().count()), 2);
  out += ':';
  append_digits(out, static_cast<int>(time.seconds().count()), 2);
  out += '.';
  append_digits(out, static_cast<int>(time.subseconds().count()), 3);
  out += 'Z';
  return out;
}

SystemTime parse_timestamp(std::string_view text, std::string_view field) {
  constexpr const char* kShape = "expected YYYY-MM-DDTHH:MM:SS[.fraction] followed by Z or +HH:MM / -HH:MM";
  Cursor in(text);
  int year = 0;
  int month = 0;
  int day = 0;
  int hour = 0;
  int minute = 0;
  int second = 0;
  if (!(in.number(4, year) && in.literal('-') && in.number(2, month) && in.literal('-') && in.number(2, day) &&
        in.one_of("Tt") && in.number(2, hour) && in.literal(':') && in.number(2, minute) && in.literal(':') &&
        in.number(2, second))) {
    bad_timestamp(text, field, kShape);
  }

  int millis = 0;
  if (in.literal('.')) {
    int digits = 0;
    while (in.digit()) {
      if (++digits > 9) {
        bad_timestamp(text, field, "more than 9 fraction digits");
      }
      if (digits <= 3) {
        millis = millis * 10 + (in.last() - '0');
      }
    }
    if (digits == 0) {
      bad_timestamp(text, field, "a '.' must be followed by fraction digits");
    }
    for (int i = digits; i < 3; ++i) {
      millis *= 10;
    }
  }

  int offset_minutes = 0;
  if (in.one_of("+-")) {
    const int sign = in.last() == '-' ? -1 : 1;
    int offset_hour = 0;
    int offset_minute = 0;
    if (!(in.number(2, offset_hour) && in.literal(':') && in.number(2, offset_minute))) {
      bad_timestamp(text, field, kShape);
    }
    if (offset_hour > 23 || offset_minute > 59) {
      bad_timestamp(text, field, "offset " + two_digits(offset_hour) + ":" + two_digits(offset_minute) + " is out of range");
    }
    offset_minutes = sign * (offset_hour * 60 + offset_minute);
  } else if (!in.one_of("Zz")) {
    bad_timestamp(text, field, kShape);
  }
  if (!in.at_end()) {
    bad_timestamp(text, field, "unexpected text after the time zone");
  }

  if (month < 1 || month > 12) {
    bad_timestamp(text, field, "month " + two_digits(month) + " is out of range (01-12)");
  }
  const chr::year_month_day date{chr::year{year}, chr::month{static_cast<unsigned>(month)},
                                 chr::day{static_cast<unsigned>(day)}};
  if (!date.ok()) {
    bad_timestamp(text, field, "day " + two_digits(day) + " does not exist in that month");
  }
  if (hour > 23) {
    bad_timestamp(text, field, "hour " + two_digits(hour) + " is out of range (00-23)");
  }
  if (minute > 59) {
    bad_timestamp(text, field, "minute " + two_digits(minute) + " is out of range (00-59)");
  }
  if (second > 59) {
    bad_timestamp(text, field, "second " + two_digits(second) + " is out of range (00-59; leap seconds are not supported)");
  }

  const SystemTime utc = SystemTime{chr::sys_days{date}} + chr::hours{hour} + chr::minutes{minute} +
                         chr::seconds{second} + chr::milliseconds{millis} - chr::minutes{offset_minutes};
  // "0000-01-01T00:30:00+01:00" is year -1 in UTC, which format_timestamp could not write back.
  if (!in_rfc3339_range(utc)) {
    bad_timestamp(text, field, "in UTC it falls outside the years 0000-9999");
  }
  return utc;
}

SystemTime now_ms() { return chr::floor<chr::milliseconds>(chr::system_clock::now()); }

}  // namespace natspubsub
