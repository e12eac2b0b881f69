// The DLQ record format (pure) and the DLQ publisher against a real nats-server.
#include <string>

#include <doctest/doctest.h>
#include <nlohmann/json.hpp>

#include <natspubsub/connection.hpp>
#include <natspubsub/dlq.hpp>
#include <natspubsub/envelope.hpp>
#include <natspubsub/error.hpp>
#include <natspubsub/topology.hpp>

#include "support/nats_helpers.hpp"
#include "support/servers.hpp"

using namespace natspubsub;
using nlohmann::json;

namespace {

DeadLetter sample_letter(std::string body = R"({"event_id":"x"})") {
  DeadLetter l;
  l.original_subject = "test.orders.order.created";
  l.body = std::move(body);
  l.headers = {{"topic", "order.created"}, {"Nats-Msg-Id", "evt-1"}, {"x-tenant", "acme"},
               {"Nats-Expected-Last-Sequence", "7"}};
  auto& c = l.context;
  c.event_id = "0b6f2a84-7a8e-4e0b-9a43-2f1f8f1c2d3e";
  c.reason = DlqReason::attempts_exhausted;
  c.error_class = "std::runtime_error";
  c.error_message = "database is down";
  c.deliveries = 3;
  c.stream = "test-orders-events";
  c.sequence = 42;
  c.consumer = "test-billing-test_orders_order_created";
  c.published_at = parse_timestamp("2026-11-22T10:00:00.123Z");
  return l;
}

std::map<std::string, std::string> headers_of(const testing::StoredMessage& m) {
  return {m.headers.begin(), m.headers.end()};
}

}  // namespace

TEST_CASE("base64: RFC 4648 vectors, binary bytes, and bad input") {
  CHECK(base64_encode("") == "");
  CHECK(base64_encode("f") == "Zg==");
  CHECK(base64_encode("fo") == "Zm8=");
  CHECK(base64_encode("foo") == "Zm9v");
  CHECK(base64_encode("foob") == "Zm9vYg==");
  CHECK(base64_encode("fooba") == "Zm9vYmE=");
  CHECK(base64_encode("foobar") == "Zm9vYmFy");
  std::string all;
  for (int i = 0; i < 256; ++i) all += static_cast<char>(i);
  CHECK(base64_decode(base64_encode(all)) == all);
  CHECK(base64_decode("Zm9vYg==") == "foob");
  CHECK_THROWS_AS((void)base64_decode("Zm9"), DlqFormatError);
  CHECK_THROWS_AS((void)base64_decode("Zm9*"), DlqFormatError);
  CHECK_THROWS_AS((void)base64_decode("Z==v"), DlqFormatError);
}

TEST_CASE("reasons have stable names") {
  CHECK(std::string(to_string(DlqReason::malformed)) == "malformed");
  CHECK(std::string(to_string(DlqReason::permanent_error)) == "permanent_error");
  CHECK(std::string(to_string(DlqReason::attempts_exhausted)) == "attempts_exhausted");
  CHECK(std::string(to_string(DlqReason::max_deliveries)) == "max_deliveries");
  CHECK(parse_dlq_reason("max_deliveries") == DlqReason::max_deliveries);
  CHECK_FALSE(parse_dlq_reason("bogus").has_value());
}

TEST_CASE("a dead letter keeps body and headers and adds the four x- headers") {
  auto letter = sample_letter();
  auto raw = make_dlq_message(letter, "dlq.test.billing.test.orders.order.created", 1024 * 1024);
  CHECK(raw.subject == "dlq.test.billing.test.orders.order.created");
  CHECK(raw.msg_id == "dlq-test-orders-events-42-test-billing-test_orders_order_created");
  CHECK(raw.payload == letter.body);
  CHECK(raw.headers.at("topic") == "order.created");
  CHECK(raw.headers.at("x-tenant") == "acme");
  CHECK(raw.headers.at(kOriginalMsgIdHeader) == "evt-1");
  CHECK(raw.headers.count("Nats-Expected-Last-Sequence") == 0);  // would make the DLQ publish fail
  CHECK(raw.headers.count("Nats-Msg-Id") == 0);                  // the publisher sets msg_id
  CHECK(raw.headers.at("x-dead-letter") == "true");
  CHECK(raw.headers.at("x-dlq-reason") == "attempts_exhausted");
  CHECK(raw.headers.at("x-deliveries") == "3");
  auto ctx = json::parse(raw.headers.at("x-dlq-context"));
  for (const char* key : {"event_id", "reason", "error_class", "error_message", "deliveries", "original_subject",
                          "stream", "sequence", "consumer", "published_at", "raw_base64"}) {
    CHECK_MESSAGE(ctx.contains(key), key);
  }
  CHECK(ctx["event_id"] == letter.context.event_id);
  CHECK(ctx["reason"] == "attempts_exhausted");
  CHECK(ctx["error_class"] == "std::runtime_error");
  CHECK(ctx["error_message"] == "database is down");
  CHECK(ctx["deliveries"] == 3);
  CHECK(ctx["original_subject"] == "test.orders.order.created");
  CHECK(ctx["stream"] == "test-orders-events");
  CHECK(ctx["sequence"] == 42);
  CHECK(ctx["consumer"] == "test-billing-test_orders_order_created");
  CHECK(ctx["published_at"] == "2026-11-22T10:00:00.123Z");
  CHECK(base64_decode(ctx["raw_base64"].get<std::string>()) == letter.body);
  CHECK_FALSE(ctx.contains("raw_omitted"));
  CHECK(wire_size(raw.headers, raw.payload.size()) < 1024);

  // Read back as the DLQ tool will.
  auto back = parse_dead_letter(raw.subject, raw.payload, raw.headers);
  CHECK(back.original_subject == "test.orders.order.created");
  CHECK(back.body == letter.body);
  CHECK(back.context.reason == DlqReason::attempts_exhausted);
  CHECK(back.context.deliveries == 3);
  CHECK(back.context.sequence == 42);
  CHECK(back.context.published_at == letter.context.published_at);
  CHECK(back.headers.at("Nats-Msg-Id") == "evt-1");  // the original id, not the DLQ one
  CHECK(back.headers.at("x-tenant") == "acme");
  CHECK(back.headers.count("x-dlq-context") == 0);
  CHECK(back.msg_id() == "dlq-test-orders-events-42-test-billing-test_orders_order_created");
  back.context.consumer.clear();
  CHECK(back.msg_id() == "dlq-test-orders-events-42");
}

TEST_CASE("a huge or non-UTF-8 error message is cut and stays a valid one-line header") {
  auto letter = sample_letter();
  letter.context.error_message = "line\r\nX-Injected: 1" + std::string(5000, 'e');
  auto raw = make_dlq_message(letter, "dlq.x", 1024 * 1024);
  const auto& header = raw.headers.at("x-dlq-context");
  CHECK(header.find('\n') == std::string::npos);
  CHECK(header.find('\r') == std::string::npos);
  auto ctx = json::parse(header);
  CHECK(ctx["error_message"].get<std::string>().size() == kMaxDlqErrorMessage);
  CHECK(ctx["error_message"].get<std::string>().rfind("line\r\nX-Injected", 0) == 0);
  CHECK(ctx["error_message_truncated"] == true);

  letter.context.error_message = "bad \xff\xfe bytes";  // not UTF-8: replaced, not thrown
  ctx = json::parse(make_dlq_message(letter, "dlq.x", 1024 * 1024).headers.at("x-dlq-context"));
  CHECK(ctx["error_message"].get<std::string>() == "bad \xef\xbf\xbd\xef\xbf\xbd bytes");

  letter.context.error_message = std::string(kMaxDlqErrorMessage - 1, 'a') + "\xc3\xa9";  // é across the cut
  ctx = json::parse(make_dlq_message(letter, "dlq.x", 1024 * 1024).headers.at("x-dlq-context"));
  CHECK(ctx["error_message"].get<std::string>() == std::string(kMaxDlqErrorMessage - 1, 'a'));
}

TEST_CASE("size rule: raw_base64 goes first, then the body, to stay within max_payload") {
  const std::string body(3000, 'b');
  auto letter = sample_letter(body);
  auto full = make_dlq_message(letter, "dlq.x", 64 * 1024);
  Headers full_with_id = full.headers;
  full_with_id["Nats-Msg-Id"] = full.msg_id;
  const size_t full_size = wire_size(full_with_id, full.payload.size());
  CHECK(json::parse(full.headers.at("x-dlq-context"))["raw_base64"].get<std::string>().size() == 4000);

  const size_t limit = full_size - 1;  // one byte short: raw_base64 must go
  auto no_raw = make_dlq_message(letter, "dlq.x", limit);
  auto ctx = json::parse(no_raw.headers.at("x-dlq-context"));
  CHECK(ctx["raw_base64"] == "");
  CHECK(ctx["raw_omitted"] == true);
  CHECK(no_raw.payload == body);
  Headers with_id = no_raw.headers;
  with_id["Nats-Msg-Id"] = no_raw.msg_id;
  CHECK(wire_size(with_id, no_raw.payload.size()) <= limit);

  auto no_body = make_dlq_message(letter, "dlq.x", 2000);  // the body alone is too big
  ctx = json::parse(no_body.headers.at("x-dlq-context"));
  CHECK(no_body.payload.empty());
  CHECK(ctx["body_omitted"] == true);
  CHECK(ctx["stream"] == "test-orders-events");  // where the original can still be read
  CHECK(ctx["sequence"] == 42);
  CHECK(no_body.headers.at("topic") == "order.created");
}

TEST_CASE("parse_dead_letter refuses what is not a dead letter") {
  CHECK_THROWS_AS((void)parse_dead_letter("dlq.x", "{}", Headers{{"topic", "a"}}), DlqFormatError);
  CHECK_THROWS_AS((void)parse_dead_letter("dlq.x", "{}", Headers{{"x-dead-letter", "true"}}), DlqFormatError);
  CHECK_THROWS_AS(
      (void)parse_dead_letter("dlq.x", "{}", Headers{{"x-dead-letter", "true"}, {"x-dlq-context", "{not json"}}),
      DlqFormatError);
  CHECK_THROWS_AS((void)parse_dead_letter("dlq.x", "{}",
                                          Headers{{"x-dead-letter", "true"},
                                                  {"x-dlq-context", R"({"reason":"","stream":"s","sequence":1,)"
                                                                    R"("deliveries":1,"original_subject":"a"})"}}),
                  DlqFormatError);
}

TEST_CASE("a reason this version does not know is kept as written, and written back the same") {
  auto letter = parse_dead_letter("dlq.x", "{}",
                                  Headers{{"x-dead-letter", "true"},
                                          {"x-dlq-context", R"({"reason":"nope","stream":"s","sequence":1,)"
                                                            R"("deliveries":1,"original_subject":"a"})"}});
  CHECK(letter.context.reason == DlqReason::other);
  CHECK(letter.context.reason_text() == "nope");
  CHECK(letter.context.to_json()["reason"] == "nope");
  auto again = make_dlq_message(letter, "dlq.x", 1024 * 1024);
  CHECK(again.headers.at("x-dlq-reason") == "nope");
  CHECK_THROWS_AS((void)parse_dead_letter("dlq.x", "{}",
                                          Headers{{"x-dead-letter", "true"},
                                                  {"x-dlq-context", R"({"reason":"malformed","stream":"s",)"
                                                                    R"("sequence":-1,"deliveries":1,"original_subject":"a"})"}}),
                  DlqFormatError);
  auto ok = parse_dead_letter("dlq.x", "raw",
                              Headers{{"x-dead-letter", "true"},
                                      {"x-dlq-context", R"({"reason":"malformed","stream":"s","sequence":1,)"
                                                        R"("deliveries":1,"original_subject":"a.b"})"}});
  CHECK(ok.context.reason == DlqReason::malformed);
  CHECK(ok.original_subject == "a.b");
  CHECK(ok.body == "raw");
}

TEST_CASE("DlqPublisher: stored in the app's DLQ stream, once per original message") {
  testing::NatsServer server;
  Connection c(testing::test_config(server.url(), "billing"));
  Topology(c).ensure_dlq_stream();
  DlqPublisher dlq(c);
  CHECK(dlq.subject_for("test.orders.order.created") == "dlq.test.billing.test.orders.order.created");
  CHECK(dlq_subject(c.config(), "test.orders.order.created") == "dlq.test.billing.test.orders.order.created");

  auto letter = sample_letter();
  auto first = dlq.publish(letter);
  CHECK(first.stream == "test-billing-dlq");
  CHECK(first.sequence == 1);
  CHECK_FALSE(first.duplicate);
  auto again = dlq.publish(letter);  // a second instance writing the same letter
  CHECK(again.duplicate);
  auto audit = letter;               // another durable of this app failing on the same message
  audit.context.consumer = "test-billing-audit";
  auto other = dlq.publish(audit);
  CHECK_FALSE(other.duplicate);
  CHECK(other.sequence == 2);

  testing::RawNats raw(server.url());
  auto stored = raw.read_stream("test-billing-dlq");
  REQUIRE(stored.size() == 2);
  CHECK(stored[1].msg_id == "dlq-test-orders-events-42-test-billing-audit");
  CHECK(stored[0].subject == "dlq.test.billing.test.orders.order.created");
  CHECK(stored[0].msg_id == "dlq-test-orders-events-42-test-billing-test_orders_order_created");
  CHECK(stored[0].data == letter.body);
  auto back = parse_dead_letter(stored[0].subject, stored[0].data, headers_of(stored[0]));
  CHECK(back.context.event_id == letter.context.event_id);
  CHECK(back.context.reason == DlqReason::attempts_exhausted);

  // No stream captures the subject: a typed error, never a silent success.
  DlqPublisher nowhere(c, "dlq.test.nobody");
  CHECK_THROWS_AS((void)nowhere.publish(letter), PublishError);
}

TEST_CASE("DlqPublisher: a body near the server's max_payload still makes a stored dead letter") {
  testing::NatsServer::Options o;
  o.max_payload = 8192;
  testing::NatsServer server(o);
  Connection c(testing::test_config(server.url(), "billing"));
  Topology(c).ensure_dlq_stream();
  DlqPublisher dlq(c);

  auto big = sample_letter(std::string(6000, 'z'));  // fits; with base64 beside it, it would not
  auto r = dlq.publish(big);
  CHECK(r.sequence == 1);
  auto huge = sample_letter(std::string(8150, 'y'));  // with our headers even the body cannot stay
  huge.context.sequence = 43;
  CHECK(dlq.publish(huge).sequence == 2);

  testing::RawNats raw(server.url());
  auto stored = raw.read_stream("test-billing-dlq");
  REQUIRE(stored.size() == 2);
  auto first = parse_dead_letter(stored[0].subject, stored[0].data, headers_of(stored[0]));
  CHECK(first.body == big.body);
  CHECK(first.context.raw_omitted);
  CHECK_FALSE(first.context.body_omitted);
  auto second = parse_dead_letter(stored[1].subject, stored[1].data, headers_of(stored[1]));
  CHECK(second.context.body_omitted);
  CHECK(second.context.sequence == 43);
  CHECK(stored[1].data.empty());
}
