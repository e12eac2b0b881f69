// The envelope wire format, UUIDs and timestamps. Pure functions: no server needed.
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <functional>
#include <random>
#include <set>
#include <string>
#include <string_view>
#include <thread>
#include <vector>

#include <doctest/doctest.h>

#include <natspubsub/envelope.hpp>
#include <natspubsub/error.hpp>

using natspubsub::Envelope;
using natspubsub::EnvelopeError;
using natspubsub::SystemTime;
using Kind = natspubsub::EnvelopeError::Kind;
using json = nlohmann::json;
using namespace std::string_literals;
using namespace std::chrono_literals;

namespace {

// A body exactly as the NatsPubsub JavaScript library writes it.
const std::string kJsBody =
    R"({"event_id":"0b5f6c1e-8a2d-4c3b-9e7f-1a2b3c4d5e6f","schema_version":1,"topic":"order.created",)"
    R"("message_type":"OrderCreated","producer":"orders","occurred_at":"2026-11-22T10:00:00.000Z",)"
    R"("trace_id":"abc","message":{"id":1}})";

std::string kind_name(Kind kind) {
  switch (kind) {
    case Kind::malformed_json: return "malformed_json";
    case Kind::not_an_object: return "not_an_object";
    case Kind::missing_field: return "missing_field";
    case Kind::wrong_type: return "wrong_type";
    case Kind::invalid_value: return "invalid_value";
  }
  return "?";
}

struct Caught {
  bool threw_envelope_error = false;
  bool threw_other = false;
  Kind kind = Kind::malformed_json;
  std::string field;
  std::string message;
};

template <class Call>
Caught catch_error(Call&& call) {
  Caught out;
  try {
    call();
  } catch (const EnvelopeError& e) {
    out.threw_envelope_error = true;
    out.kind = e.kind();
    out.field = e.field();
    out.message = e.what();
  } catch (...) {
    out.threw_other = true;
  }
  return out;
}

Caught decode_error(std::string_view body) {
  return catch_error([&] { (void)Envelope::decode(body); });
}

// The JS body with `field` replaced by the raw JSON text `value`, or removed when `value` is empty.
std::string js_body_with(const std::string& field, const std::string& value) {
  auto j = json::parse(kJsBody);
  if (value.empty()) {
    j.erase(field);
  } else {
    j[field] = json::parse(value);
  }
  return j.dump();
}

SystemTime at(std::string_view text) { return natspubsub::parse_timestamp(text); }

bool printable_ascii(const std::string& text) {
  return std::all_of(text.begin(), text.end(), [](char c) {
    const auto byte = static_cast<unsigned char>(c);
    return byte >= 0x20 && byte < 0x7f;
  });
}

}  // namespace

// ---- wire format --------------------------------------------------------------------------------

TEST_CASE("a body written by the JavaScript library decodes field by field") {
  const auto e = Envelope::decode(kJsBody);
  CHECK(e.event_id == "0b5f6c1e-8a2d-4c3b-9e7f-1a2b3c4d5e6f");
  CHECK(e.schema_version == 1);
  CHECK(e.topic == "order.created");
  CHECK(e.message_type == "OrderCreated");
  CHECK(e.producer == "orders");
  CHECK(natspubsub::format_timestamp(e.occurred_at) == "2026-11-22T10:00:00.000Z");
  CHECK(e.trace_id == "abc");
  CHECK(e.message == json{{"id", 1}});
  // And encodes back to the same bytes: same field order, same spelling.
  CHECK(e.encode() == kJsBody);
}

TEST_CASE("encode writes the wire field order and omits absent optional fields") {
  Envelope e;
  e.event_id = "0b5f6c1e-8a2d-4c3b-9e7f-1a2b3c4d5e6f";
  e.topic = "order.created";
  e.producer = "orders";
  e.occurred_at = at("2026-11-22T10:00:00Z");
  e.message = json{{"id", 1}};
  CHECK(e.encode() ==
        R"({"event_id":"0b5f6c1e-8a2d-4c3b-9e7f-1a2b3c4d5e6f","schema_version":1,"topic":"order.created",)"
        R"("producer":"orders","occurred_at":"2026-11-22T10:00:00.000Z","message":{"id":1}})");
  e.message_type = "OrderCreated";
  e.trace_id = "abc";
  CHECK(e.encode() == kJsBody);
  // to_json carries the same content (its keys are sorted, not in wire order).
  CHECK(e.to_json() == json::parse(kJsBody));
  CHECK(Envelope::from_json(e.to_json()) == e);
}

TEST_CASE("make, encode and decode round trip") {
  auto e = Envelope::make("order.item.added", "orders", {{"id", 42}, {"items", {1, 2, 3}}, {"note", "é ✓"}});
  CHECK(natspubsub::is_uuid(e.event_id));
  CHECK(e.schema_version == Envelope::kSchemaVersion);
  CHECK_FALSE(e.message_type.has_value());
  CHECK_FALSE(e.trace_id.has_value());
  const auto age = natspubsub::now_ms() - e.occurred_at;
  CHECK(age >= 0ms);
  CHECK(age < 5s);
  CHECK(Envelope::decode(e.encode()) == e);

  e.message_type = "ItemAdded";
  e.trace_id = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
  e.schema_version = 3;
  CHECK(Envelope::decode(e.encode()) == e);
  // Two envelopes made in a row never share an event id.
  CHECK(Envelope::make("t", "p", {}).event_id != Envelope::make("t", "p", {}).event_id);
}

TEST_CASE("decisions: message may be any JSON value, optional fields may be null, schema_version defaults to 1") {
  for (const std::string message : {R"({"id":1})", "{}", "[1,2,3]", "[]", R"("text")", "42", "-1.5", "true", "null"}) {
    CAPTURE(message);
    const auto e = Envelope::decode(js_body_with("message", message));
    CHECK(e.message == json::parse(message));
    CHECK(Envelope::decode(e.encode()) == e);
  }
  CHECK_FALSE(Envelope::decode(js_body_with("message_type", "null")).message_type.has_value());
  CHECK_FALSE(Envelope::decode(js_body_with("trace_id", "null")).trace_id.has_value());
  CHECK_FALSE(Envelope::decode(js_body_with("message_type", "")).message_type.has_value());
  CHECK_FALSE(Envelope::decode(js_body_with("trace_id", "")).trace_id.has_value());
  CHECK(Envelope::decode(js_body_with("schema_version", "")).schema_version == 1);
  CHECK(Envelope::decode(js_body_with("schema_version", "7")).schema_version == 7);
  // Unknown fields are ignored; the event id is kept exactly as sent.
  CHECK(Envelope::decode(js_body_with("extra", R"({"x":[1]})")).topic == "order.created");
  CHECK(Envelope::decode(js_body_with("event_id", R"("0B5F6C1E-8A2D-4C3B-9E7F-1A2B3C4D5E6F")")).event_id ==
        "0B5F6C1E-8A2D-4C3B-9E7F-1A2B3C4D5E6F");
  // Any topic text is accepted (it is informational; the subject does the routing).
  CHECK(Envelope::decode(js_body_with("topic", R"("Order Created")")).topic == "Order Created");
  // Offsets are converted to UTC.
  CHECK(natspubsub::format_timestamp(
            Envelope::decode(js_body_with("occurred_at", R"("2026-11-22T12:00:00+02:00")")).occurred_at) ==
        "2026-11-22T10:00:00.000Z");
}

// ---- decode errors ----------------------------------------------------------------------------

TEST_CASE("decode: every error kind with its field") {
  struct Case {
    std::string body;
    Kind kind;
    std::string field;
  };
  const std::vector<Case> cases = {
      // not an object
      {"[]", Kind::not_an_object, ""},
      {"[1,2]", Kind::not_an_object, ""},
      {R"("order")", Kind::not_an_object, ""},
      {"42", Kind::not_an_object, ""},
      {"-0.5", Kind::not_an_object, ""},
      {"null", Kind::not_an_object, ""},
      {"true", Kind::not_an_object, ""},
      {"[" + kJsBody + "]", Kind::not_an_object, ""},
      // missing required fields
      {"{}", Kind::missing_field, "event_id"},
      {js_body_with("event_id", ""), Kind::missing_field, "event_id"},
      {js_body_with("topic", ""), Kind::missing_field, "topic"},
      {js_body_with("producer", ""), Kind::missing_field, "producer"},
      {js_body_with("occurred_at", ""), Kind::missing_field, "occurred_at"},
      {js_body_with("message", ""), Kind::missing_field, "message"},
      // wrong types
      {js_body_with("event_id", "1"), Kind::wrong_type, "event_id"},
      {js_body_with("event_id", "null"), Kind::wrong_type, "event_id"},
      {js_body_with("event_id", R"(["0b5f6c1e-8a2d-4c3b-9e7f-1a2b3c4d5e6f"])"), Kind::wrong_type, "event_id"},
      {js_body_with("schema_version", R"("1")"), Kind::wrong_type, "schema_version"},
      {js_body_with("schema_version", "1.0"), Kind::wrong_type, "schema_version"},
      {js_body_with("schema_version", "1.5"), Kind::wrong_type, "schema_version"},
      {js_body_with("schema_version", "true"), Kind::wrong_type, "schema_version"},
      {js_body_with("schema_version", "null"), Kind::wrong_type, "schema_version"},
      {js_body_with("topic", "5"), Kind::wrong_type, "topic"},
      {js_body_with("topic", "null"), Kind::wrong_type, "topic"},
      {js_body_with("topic", R"({"name":"order.created"})"), Kind::wrong_type, "topic"},
      {js_body_with("message_type", "5"), Kind::wrong_type, "message_type"},
      {js_body_with("message_type", "{}"), Kind::wrong_type, "message_type"},
      {js_body_with("message_type", "false"), Kind::wrong_type, "message_type"},
      {js_body_with("producer", "[]"), Kind::wrong_type, "producer"},
      {js_body_with("producer", "null"), Kind::wrong_type, "producer"},
      {js_body_with("occurred_at", "1795341600000"), Kind::wrong_type, "occurred_at"},
      {js_body_with("occurred_at", "null"), Kind::wrong_type, "occurred_at"},
      {js_body_with("trace_id", "1"), Kind::wrong_type, "trace_id"},
      {js_body_with("trace_id", "[]"), Kind::wrong_type, "trace_id"},
      // invalid values
      {js_body_with("event_id", R"("")"), Kind::invalid_value, "event_id"},
      {js_body_with("event_id", R"("not-a-uuid")"), Kind::invalid_value, "event_id"},
      {js_body_with("event_id", R"("0b5f6c1e-8a2d-4c3b-9e7f-1a2b3c4d5e6g")"), Kind::invalid_value, "event_id"},
      {js_body_with("event_id", R"("{0b5f6c1e-8a2d-4c3b-9e7f-1a2b3c4d5e6f}")"), Kind::invalid_value, "event_id"},
      {js_body_with("event_id", R"("0b5f6c1e8a2d4c3b9e7f1a2b3c4d5e6f")"), Kind::invalid_value, "event_id"},
      {js_body_with("schema_version", "0"), Kind::invalid_value, "schema_version"},
      {js_body_with("schema_version", "-1"), Kind::invalid_value, "schema_version"},
      {js_body_with("schema_version", "2147483648"), Kind::invalid_value, "schema_version"},
      {js_body_with("schema_version", "18446744073709551615"), Kind::invalid_value, "schema_version"},
      {js_body_with("schema_version", "-9223372036854775808"), Kind::invalid_value, "schema_version"},
      {js_body_with("topic", R"("")"), Kind::invalid_value, "topic"},
      {js_body_with("producer", R"("")"), Kind::invalid_value, "producer"},
      {js_body_with("occurred_at", R"("")"), Kind::invalid_value, "occurred_at"},
      {js_body_with("occurred_at", R"("yesterday")"), Kind::invalid_value, "occurred_at"},
      {js_body_with("occurred_at", R"("2026-13-01T00:00:00Z")"), Kind::invalid_value, "occurred_at"},
      {js_body_with("occurred_at", R"("2026-11-22 10:00:00Z")"), Kind::invalid_value, "occurred_at"},
      {js_body_with("occurred_at", R"("2026-11-22T10:00:00")"), Kind::invalid_value, "occurred_at"},
  };
  for (const auto& c : cases) {
    CAPTURE(c.body);
    const auto caught = decode_error(c.body);
    REQUIRE(caught.threw_envelope_error);
    CHECK(kind_name(caught.kind) == kind_name(c.kind));
    CHECK(caught.field == c.field);
    if (!c.field.empty()) {
      CHECK(caught.message.find(c.field) != std::string::npos);
    }
    CHECK(printable_ascii(caught.message));
  }
}

TEST_CASE("decode: malformed input is malformed_json, never a crash or another exception") {
  const std::vector<std::string> bodies = {
      "",
      " ",
      "\n\t",
      "{",
      "}",
      "{\"event_id\":",
      "{\"event_id\"}",
      "nul",
      "tru",
      "{'event_id':'x'}",
      "{event_id:1}",
      "{\"a\":1,}",
      "{\"a\":1}x",
      "{\"a\":1}{\"b\":2}",
      "{} []",
      "/* comment */ {}",
      "{\"a\":01}",
      "{\"a\":.5}",
      "{\"a\":NaN}",
      "{\"a\":Infinity}",
      "{\"a\":1e999}",
      "{\"a\":\"\\x41\"}",
      "{\"a\":\"\\u12\"}",
      "{\"a\":\"\\ud800\"}",
      "{\"a\":\"unterminated}",
      "{\"a\":\"line\nbreak\"}",
      "\0"s,
      "\0{}"s,
      "{}\0"s,
      "{\"a\":1}\0junk"s,
      kJsBody + "\0"s,  // a complete envelope followed by a NUL must not decode
      kJsBody + "\0junk"s,
      "{\"a\":\"x\0y\"}"s,
      "{\"a\":\"\xff\"}",
      "{\"a\":\"\xc3\"}",
      "{\"a\":\"\xc0\xaf\"}",
      "{\"a\":\"\xed\xa0\x80\"}",
      "\xef\xbb\xbf",
      "\xff\xfe{}",
      std::string(100000, '['),
      std::string(100000, '{'),
      std::string(Envelope::kMaxDepth + 1, '[') + std::string(Envelope::kMaxDepth + 1, ']'),
  };
  for (const auto& body : bodies) {
    CAPTURE(body.substr(0, 60));
    const auto caught = decode_error(body);
    CHECK_FALSE(caught.threw_other);
    REQUIRE(caught.threw_envelope_error);
    CHECK(kind_name(caught.kind) == "malformed_json");
    CHECK(caught.field.empty());
    CHECK(caught.message.find("malformed JSON") != std::string::npos);
    // The parser quotes the bytes it choked on; the message shows them escaped.
    CHECK(printable_ascii(caught.message));
    CHECK(caught.message.size() < 400);
  }
}

TEST_CASE("decode: every truncation of a valid body is malformed_json") {
  for (std::size_t length = 0; length < kJsBody.size(); ++length) {
    CAPTURE(length);
    const auto caught = decode_error(std::string_view(kJsBody).substr(0, length));
    REQUIRE(caught.threw_envelope_error);
    CHECK(kind_name(caught.kind) == "malformed_json");
  }
}

TEST_CASE("decode: random bytes and random corruptions never escape as another exception") {
  std::mt19937_64 rng(20261122);  // fixed seed: a failure must be reproducible
  std::uniform_int_distribution<int> byte(0, 255);
  for (int round = 0; round < 5000; ++round) {
    std::string body = kJsBody;
    if (round % 2 == 0) {
      // Flip a few bytes of a valid body: some still decode, most do not.
      const int flips = 1 + round % 4;
      for (int i = 0; i < flips; ++i) {
        body[static_cast<std::size_t>(rng() % body.size())] = static_cast<char>(byte(rng));
      }
    } else {
      body.assign(static_cast<std::size_t>(rng() % 64), '\0');
      for (auto& c : body) {
        c = static_cast<char>(byte(rng));
      }
    }
    const auto caught = decode_error(body);
    CAPTURE(body);
    REQUIRE_FALSE(caught.threw_other);
    if (caught.threw_envelope_error) {
      REQUIRE(printable_ascii(caught.message));
    }
  }
}

TEST_CASE("decode: nesting up to kMaxDepth is accepted") {
  // The envelope object is level 1, so the message may nest kMaxDepth - 1 levels.
  const std::size_t depth = Envelope::kMaxDepth - 1;
  const std::string message = std::string(depth, '[') + std::string(depth, ']');
  const auto e = Envelope::decode(js_body_with("message", message));
  CHECK(e.message.is_array());
  CHECK(Envelope::decode(e.encode()) == e);
  // Brackets inside strings do not count.
  const std::string in_string = "\"" + std::string(2000, '[') + "\\\"" + std::string(2000, '{') + "\"";
  CHECK(Envelope::decode(js_body_with("message", in_string)).message.get<std::string>().size() == 4001);
  const auto too_deep = decode_error(js_body_with("message", std::string(depth + 1, '[') + std::string(depth + 1, ']')));
  CHECK(too_deep.threw_envelope_error);
  CHECK(too_deep.message.find("nested deeper than") != std::string::npos);
}

TEST_CASE("error messages escape untrusted text") {
  const auto caught = decode_error(js_body_with("occurred_at", R"("2026-11-22T10:00:00Z\n\u0000injected: yes")"));
  REQUIRE(caught.threw_envelope_error);
  CHECK(caught.field == "occurred_at");
  CHECK(caught.message.find("\\n\\x00injected") != std::string::npos);
  CHECK(printable_ascii(caught.message));

  const auto long_id = decode_error(js_body_with("event_id", "\"" + std::string(100000, 'x') + "\""));
  REQUIRE(long_id.threw_envelope_error);
  CHECK(long_id.message.size() < 400);
  CHECK(long_id.message.find("(100000 bytes)") != std::string::npos);
}

// ---- encode errors ----------------------------------------------------------------------------

TEST_CASE("encode refuses what decode would refuse, naming the field") {
  const auto valid = Envelope::decode(kJsBody);
  struct Case {
    std::string field;
    std::function<void(Envelope&)> spoil;
  };
  const std::vector<Case> cases = {
      {"event_id", [](Envelope& e) { e.event_id.clear(); }},
      {"event_id", [](Envelope& e) { e.event_id = "order-1"; }},
      {"schema_version", [](Envelope& e) { e.schema_version = 0; }},
      {"schema_version", [](Envelope& e) { e.schema_version = -3; }},
      {"topic", [](Envelope& e) { e.topic.clear(); }},
      {"producer", [](Envelope& e) { e.producer.clear(); }},
      {"occurred_at", [](Envelope& e) { e.occurred_at = SystemTime{std::chrono::sys_days{std::chrono::year{10000} / 1 / 1}}; }},
      {"occurred_at", [](Envelope& e) { e.occurred_at = SystemTime{std::chrono::sys_days{std::chrono::year{-1} / 12 / 31}}; }},
      {"topic", [](Envelope& e) { e.topic = "order\xff"; }},
      {"trace_id", [](Envelope& e) { e.trace_id = "\xc3"; }},
      {"message", [](Envelope& e) { e.message = json{{"note", "\xed\xa0\x80"}}; }},
      {"message", [](Envelope& e) { e.message = json{{"\xff", 1}}; }},
  };
  for (const auto& c : cases) {
    CAPTURE(c.field);
    auto e = valid;
    c.spoil(e);
    const auto caught = catch_error([&] { (void)e.encode(); });
    REQUIRE(caught.threw_envelope_error);
    CHECK(kind_name(caught.kind) == "invalid_value");
    CHECK(caught.field == c.field);
    CHECK(printable_ascii(caught.message));
  }
  // to_json checks the fields the same way (UTF-8 is checked when text is made).
  auto e = valid;
  e.producer.clear();
  const auto caught = catch_error([&] { (void)e.to_json(); });
  CHECK(caught.threw_envelope_error);
  CHECK(caught.field == "producer");
}

// ---- UUIDs ------------------------------------------------------------------------------------

TEST_CASE("new_uuid: 10,000 ids are unique, v4, lower-case") {
  std::set<std::string> seen;
  for (int i = 0; i < 10000; ++i) {
    const auto id = natspubsub::new_uuid();
    REQUIRE(natspubsub::is_uuid(id));
    REQUIRE(id.size() == 36);
    REQUIRE(id[14] == '4');                                          // version 4
    REQUIRE(std::string_view("89ab").find(id[19]) != std::string_view::npos);  // variant 10xx
    REQUIRE(std::none_of(id.begin(), id.end(), [](char c) { return c >= 'A' && c <= 'F'; }));
    seen.insert(id);
  }
  CHECK(seen.size() == 10000);
}

TEST_CASE("new_uuid: unique across threads") {
  constexpr int kThreads = 4;
  constexpr int kEach = 2500;
  std::vector<std::vector<std::string>> ids(kThreads);
  {
    std::vector<std::jthread> threads;
    for (int t = 0; t < kThreads; ++t) {
      threads.emplace_back([&ids, t] {
        for (int i = 0; i < kEach; ++i) {
          ids[static_cast<std::size_t>(t)].push_back(natspubsub::new_uuid());
        }
      });
    }
  }
  std::set<std::string> all;
  for (const auto& batch : ids) {
    all.insert(batch.begin(), batch.end());
  }
  CHECK(all.size() == static_cast<std::size_t>(kThreads * kEach));
}

TEST_CASE("new_uuid: a forked child does not repeat the parent's next id") {
  (void)natspubsub::new_uuid();  // the parent's generator is seeded before the fork
  int fds[2];
  REQUIRE(::pipe(fds) == 0);
  const pid_t child = ::fork();
  REQUIRE(child >= 0);
  if (child == 0) {
    const auto id = natspubsub::new_uuid();
    const auto written = ::write(fds[1], id.data(), id.size());
    ::_exit(written == static_cast<ssize_t>(id.size()) ? 0 : 1);
  }
  ::close(fds[1]);
  const auto parent_id = natspubsub::new_uuid();
  std::string child_id(36, '\0');
  std::size_t got = 0;
  while (got < child_id.size()) {
    const auto n = ::read(fds[0], child_id.data() + got, child_id.size() - got);
    if (n <= 0) {
      break;
    }
    got += static_cast<std::size_t>(n);
  }
  ::close(fds[0]);
  int status = 0;
  ::waitpid(child, &status, 0);
  REQUIRE(got == 36);
  CHECK(WIFEXITED(status));
  CHECK(natspubsub::is_uuid(child_id));
  CHECK(child_id != parent_id);
}

TEST_CASE("is_uuid accepts the 8-4-4-4-12 hex form only") {
  for (const std::string_view ok : {"0b5f6c1e-8a2d-4c3b-9e7f-1a2b3c4d5e6f", "0B5F6C1E-8A2D-4C3B-9E7F-1A2B3C4D5E6F",
                                    "00000000-0000-0000-0000-000000000000", "ffffffff-ffff-1fff-bfff-ffffffffffff"}) {
    CAPTURE(ok);
    CHECK(natspubsub::is_uuid(ok));
  }
  const std::vector<std::string> bad = {"",
                                        "0b5f6c1e-8a2d-4c3b-9e7f-1a2b3c4d5e6",
                                        "0b5f6c1e-8a2d-4c3b-9e7f-1a2b3c4d5e6f0",
                                        "0b5f6c1e8a2d-4c3b-9e7f-1a2b3c4d5e6f0",
                                        "0b5f6c1e-8a2d-4c3b-9e7f_1a2b3c4d5e6f",
                                        "0b5f6c1e-8a2d-4c3b-9e7f-1a2b3c4d5e6g",
                                        "{b5f6c1e-8a2d-4c3b-9e7f-1a2b3c4d5e6}",
                                        " b5f6c1e-8a2d-4c3b-9e7f-1a2b3c4d5e6f",
                                        "0b5f6c1e-8a2d-4c3b-9e7f-1a2b3c4d5e6\0"s,
                                        "0b5f6c1e-8a2d-4c3b-9e7f-1a2b3c4d5e6\xc3"};
  for (const auto& s : bad) {
    CAPTURE(s);
    CHECK_FALSE(natspubsub::is_uuid(s));
  }
}

// ---- timestamps -------------------------------------------------------------------------------

TEST_CASE("format_timestamp writes UTC with milliseconds") {
  using natspubsub::format_timestamp;
  CHECK(format_timestamp(SystemTime{}) == "1970-01-01T00:00:00.000Z");
  CHECK(format_timestamp(SystemTime{1ms}) == "1970-01-01T00:00:00.001Z");
  CHECK(format_timestamp(SystemTime{-1ms}) == "1969-12-31T23:59:59.999Z");
  CHECK(format_timestamp(SystemTime{1795341600000ms}) == "2026-11-22T10:00:00.000Z");
  CHECK(format_timestamp(SystemTime{std::chrono::sys_days{std::chrono::year{2024} / 2 / 29}} + 23h + 59min + 59s +
                         999ms) == "2024-02-29T23:59:59.999Z");
  CHECK(format_timestamp(SystemTime{std::chrono::sys_days{std::chrono::year{0} / 1 / 1}}) == "0000-01-01T00:00:00.000Z");
  CHECK(format_timestamp(SystemTime{std::chrono::sys_days{std::chrono::year{10000} / 1 / 1}} - 1ms) ==
        "9999-12-31T23:59:59.999Z");
  for (const auto t : {SystemTime{std::chrono::sys_days{std::chrono::year{10000} / 1 / 1}},
                       SystemTime{std::chrono::sys_days{std::chrono::year{0} / 1 / 1}} - 1ms, SystemTime::max(),
                       SystemTime::min()}) {
    const auto caught = catch_error([&] { (void)format_timestamp(t); });
    CHECK(caught.threw_envelope_error);
    CHECK(kind_name(caught.kind) == "invalid_value");
    CHECK(caught.field == "timestamp");
  }
}

TEST_CASE("parse_timestamp accepts RFC 3339 and converts to UTC") {
  using natspubsub::format_timestamp;
  struct Case {
    std::string_view text, utc;
  };
  const std::vector<Case> cases = {
      {"2026-11-22T10:00:00.000Z", "2026-11-22T10:00:00.000Z"},
      {"2026-11-22T10:00:00Z", "2026-11-22T10:00:00.000Z"},
      {"2026-11-22t10:00:00z", "2026-11-22T10:00:00.000Z"},
      {"2026-11-22T10:00:00.5Z", "2026-11-22T10:00:00.500Z"},
      {"2026-11-22T10:00:00.12Z", "2026-11-22T10:00:00.120Z"},
      {"2026-11-22T10:00:00.123456789Z", "2026-11-22T10:00:00.123Z"},
      {"2026-11-22T10:00:00.999999999Z", "2026-11-22T10:00:00.999Z"},  // truncated, not rounded
      {"2026-11-22T10:00:00.000000001Z", "2026-11-22T10:00:00.000Z"},
      {"2026-11-22T12:00:00+02:00", "2026-11-22T10:00:00.000Z"},
      {"2026-11-22T04:30:00-05:30", "2026-11-22T10:00:00.000Z"},
      {"2026-11-22T10:00:00-00:00", "2026-11-22T10:00:00.000Z"},
      {"2026-11-22T10:00:00+00:00", "2026-11-22T10:00:00.000Z"},
      {"2026-11-22T10:00:00.250+23:59", "2026-11-21T10:01:00.250Z"},
      {"2026-01-01T00:30:00+01:00", "2025-12-31T23:30:00.000Z"},  // across a year boundary
      {"2025-12-31T23:30:00-01:00", "2026-01-01T00:30:00.000Z"},
      {"2024-02-29T12:00:00Z", "2024-02-29T12:00:00.000Z"},  // leap year
      {"2000-02-29T00:00:00Z", "2000-02-29T00:00:00.000Z"},  // divisible by 400
      {"2024-03-01T00:30:00+01:00", "2024-02-29T23:30:00.000Z"},
      {"1969-12-31T23:59:59.999Z", "1969-12-31T23:59:59.999Z"},
      {"0000-01-01T00:00:00Z", "0000-01-01T00:00:00.000Z"},
      {"9999-12-31T23:59:59.999Z", "9999-12-31T23:59:59.999Z"},
      {"2026-12-31T23:59:59Z", "2026-12-31T23:59:59.000Z"},
  };
  for (const auto& c : cases) {
    CAPTURE(c.text);
    CHECK(format_timestamp(natspubsub::parse_timestamp(c.text)) == c.utc);
  }
  CHECK(natspubsub::parse_timestamp("1970-01-01T00:00:00Z") == SystemTime{});
  CHECK(natspubsub::parse_timestamp("2026-11-22T10:00:00.000Z") == SystemTime{1795341600000ms});
}

TEST_CASE("parse_timestamp refuses everything else with invalid_value and the given field") {
  const std::vector<std::string> bad = {
      "",
      "2026-11-22",
      "2026-11-22T10:00Z",                  // seconds are required
      "2026-11-22T10:00:00",                // a zone is required
      "2026-11-22 10:00:00Z",               // space separator
      "2026-11-22X10:00:00Z",
      " 2026-11-22T10:00:00Z",
      "2026-11-22T10:00:00Z ",
      "2026-11-22T10:00:00ZZ",
      "2026-11-22T10:00:00.Z",              // '.' without digits
      "2026-11-22T10:00:00.1234567890Z",    // 10 fraction digits
      "2026-11-22T10:00:00,5Z",
      "2026-11-22T10:00:00+0100",
      "2026-11-22T10:00:00+01",
      "2026-11-22T10:00:00+1:00",
      "2026-11-22T10:00:00+24:00",
      "2026-11-22T10:00:00+01:60",
      "2026-11-22T10:00:00UTC",
      "2026-1-22T10:00:00Z",
      "26-11-22T10:00:00Z",
      "12026-11-22T10:00:00Z",
      "+2026-11-22T10:00:00Z",
      "2026-13-01T00:00:00Z",  // month 13
      "2026-00-01T00:00:00Z",
      "2026-01-32T00:00:00Z",  // day 32
      "2026-01-00T00:00:00Z",
      "2026-04-31T00:00:00Z",
      "2026-02-30T00:00:00Z",  // Feb 30
      "2023-02-29T00:00:00Z",  // not a leap year
      "1900-02-29T00:00:00Z",  // divisible by 100, not by 400
      "2026-11-22T24:00:00Z",  // hour 24
      "2026-11-22T10:60:00Z",
      "2026-11-22T10:00:60Z",  // leap second
      "2026-11-22T10:00:61Z",
      "2026-11-22T1a:00:00Z",
      "2026-11-22T10:00:00.12a4Z",
      "２０２６-11-22T10:00:00Z",  // full-width digits
      "2026-11-22T10:00:00\0Z"s,
      "2026-11-22T10:00:00Z\0"s,
      "0000-01-01T00:30:00+01:00",  // year -1 in UTC
      "9999-12-31T23:30:00-01:00",  // year 10000 in UTC
      "1795341600000",
      "yesterday",
  };
  for (const auto& text : bad) {
    CAPTURE(text);
    const auto caught = catch_error([&] { (void)natspubsub::parse_timestamp(text, "published_at"); });
    REQUIRE(caught.threw_envelope_error);
    CHECK(kind_name(caught.kind) == "invalid_value");
    CHECK(caught.field == "published_at");
    CHECK(caught.message.find("published_at") != std::string::npos);
    CHECK(printable_ascii(caught.message));
  }
  // The reason names the bad part.
  const auto month = catch_error([] { (void)natspubsub::parse_timestamp("2026-13-01T00:00:00Z"); });
  CHECK(month.field == "occurred_at");
  CHECK(month.message.find("month 13") != std::string::npos);
  const auto day = catch_error([] { (void)natspubsub::parse_timestamp("2023-02-29T00:00:00Z"); });
  CHECK(day.message.find("day 29") != std::string::npos);
  const auto hour = catch_error([] { (void)natspubsub::parse_timestamp("2026-11-22T24:00:00Z"); });
  CHECK(hour.message.find("hour 24") != std::string::npos);
}

TEST_CASE("format_timestamp and parse_timestamp round trip") {
  std::mt19937_64 rng(7);
  const auto first = SystemTime{std::chrono::sys_days{std::chrono::year{0} / 1 / 1}}.time_since_epoch().count();
  const auto last = SystemTime{std::chrono::sys_days{std::chrono::year{10000} / 1 / 1}}.time_since_epoch().count() - 1;
  std::uniform_int_distribution<std::int64_t> ms(first, last);
  for (int i = 0; i < 20000; ++i) {
    const SystemTime t{std::chrono::milliseconds{ms(rng)}};
    const auto text = natspubsub::format_timestamp(t);
    CAPTURE(text);
    REQUIRE(text.size() == 24);
    REQUIRE(natspubsub::parse_timestamp(text) == t);
  }
  const auto now = natspubsub::now_ms();
  CHECK(natspubsub::parse_timestamp(natspubsub::format_timestamp(now)) == now);
}
