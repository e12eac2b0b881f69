// ctest-labels: security
// Limits against a nats-server with a small max_payload (8 KiB): a payload over it, a header
// block over it, and a dead letter whose context would not fit are refused or truncated by rule,
// with a clear error, and never cost the connection or crash the process.
// (publisher_test covers the plain oversize publish; this adds headers, the outbox relay, the DLQ.)
#include <atomic>
#include <chrono>
#include <string>

#include <doctest/doctest.h>

#include <natspubsub/connection.hpp>
#include <natspubsub/consumer.hpp>
#include <natspubsub/dlq.hpp>
#include <natspubsub/error.hpp>
#include <natspubsub/outbox.hpp>
#include <natspubsub/outbox_relay.hpp>
#include <natspubsub/publisher.hpp>
#include <natspubsub/store/database.hpp>
#include <natspubsub/store/migrations.hpp>
#include <natspubsub/topology.hpp>

#include "support/databases.hpp"
#include "support/fault.hpp"
#include "support/nats_helpers.hpp"
#include "support/servers.hpp"

using namespace natspubsub;
using namespace std::chrono_literals;

namespace {

constexpr long kMaxPayload = 8192;


}  // namespace

TEST_CASE("a header block over max_payload is refused for that message only; the connection stays") {
  testing::NatsServer::Options o;
  o.max_payload = kMaxPayload;
  testing::NatsServer server(o);
  Connection c(testing::test_config(server.url(), "orders"));
  Topology(c).ensure_events_stream();
  Publisher p(c);

  PublishOptions big_headers;
  big_headers.headers["x-big"] = std::string(kMaxPayload + 100, 'h');
  try {
    (void)p.publish("order.created", {{"id", 1}}, big_headers);
    FAIL("oversize header block accepted");
  } catch (const PublishError& e) {
    MESSAGE("header block: " << std::string(e.what()));
    CHECK(std::string(e.what()).find("max_payload") != std::string::npos);
  }
  // Many small headers adding up to too much are the same case.
  PublishOptions many;
  for (int i = 0; i < 400; ++i) many.headers["x-h" + std::to_string(i)] = std::string(30, 'v');
  CHECK_THROWS_AS((void)p.publish("order.created", {{"id", 2}}, many), PublishError);

  std::vector<OutgoingEvent> batch(3);
  for (auto& e : batch) e.topic = "order.created";
  batch[1].options = big_headers;
  auto results = p.publish_batch(batch);
  CHECK(results[0]);
  REQUIRE_FALSE(results[1]);
  CHECK_FALSE(results[1].error->retryable);
  CHECK(results[2]);
  CHECK(c.connected());
  CHECK(testing::RawNats(server.url()).stream_messages("test-orders-events") == 2);
}

TEST_CASE("outbox rows over max_payload (body or headers) are failed at once with the reason; the rest are sent") {
  testing::NatsServer::Options o;
  o.max_payload = kMaxPayload;
  testing::NatsServer server(o);
  testing::TempDir dir;
  auto db = store::open_database("sqlite://" + testing::sqlite_file(dir));
  store::migrate(*db);
  Connection c(testing::test_config(server.url(), "orders"));
  Topology(c).ensure_events_stream();
  db->in_transaction([&](store::Transaction& tx) {
    enqueue(tx, OutboxMessage{new_uuid(), "test.orders.a", "{}", nlohmann::json::object(), std::nullopt});
    enqueue(tx, OutboxMessage{new_uuid(), "test.orders.big", std::string(kMaxPayload * 2, 'p'), nlohmann::json::object(),
                              std::nullopt});
    enqueue(tx, OutboxMessage{new_uuid(), "test.orders.bighdr", "{}",
                              nlohmann::json{{"x-big", std::string(kMaxPayload * 2, 'h')}}, std::nullopt});
    enqueue(tx, OutboxMessage{new_uuid(), "test.orders.b", "{}", nlohmann::json::object(), std::nullopt});
  });
  RelayOptions ro;
  ro.poll_interval = 20ms;
  ro.backoff = {20ms};
  ro.max_attempts = 3;
  OutboxRelay relay(c, *db, ro);
  for (int i = 0; i < 20; ++i) {
    relay.drain();
    if (testing::query(*db, "SELECT COUNT(*) FROM natspubsub_outbox WHERE status IN ('pending','publishing')")[0].as_int(0) == 0)
      break;
    std::this_thread::sleep_for(50ms);
  }
  CHECK(testing::query(*db, "SELECT COUNT(*) FROM natspubsub_outbox WHERE status = 'sent'")[0].as_int(0) == 2);
  auto failed = testing::query(*db, "SELECT subject, attempts, last_error FROM natspubsub_outbox WHERE status = 'failed' ORDER BY id");
  REQUIRE(failed.size() == 2);
  for (const auto& row : failed) {
    MESSAGE(row[0].as_text() << ": attempts " << row[1].as_int() << ", " << row[2].as_text());
    CHECK(row[1].as_int() == 1);  // refused outright: no retries
    CHECK(row[2].as_text().find("max_payload") != std::string::npos);
    CHECK(row[2].as_text().size() < 2000);  // the reason, not the payload
  }
  CHECK(c.connected());
}

TEST_CASE("a dead letter that would not fit: the error message is cut, raw_base64 then the body are left out by rule") {
  testing::NatsServer::Options o;
  o.max_payload = kMaxPayload;
  testing::NatsServer server(o);
  Connection orders(testing::test_config(server.url(), "orders"));
  Topology(orders).ensure_events_stream();
  Connection payments(testing::test_config(server.url(), "payments"));
  Consumer consumer(payments);
  consumer.subscribe_subject("test.orders.>", [](const Message&) {
    throw PermanentError("refused: " + std::string(100000, 'e'));  // far larger than max_payload
  });
  consumer.start();
  Publisher publisher(orders);
  // A body of ~6 KiB: fits alone, but not together with its base64 copy in x-dlq-context.
  (void)publisher.publish("order.created", {{"blob", std::string(6000, 'b')}});
  // A body of ~7.9 KiB: with the DLQ headers it cannot fit even without raw_base64.
  auto huge = publisher.publish("order.created", {{"blob", std::string(kMaxPayload - 400, 'c')}});

  testing::RawNats raw(server.url());
  REQUIRE(testing::eventually(
      [&] {
        try {
          return raw.stream_messages("test-payments-dlq") == 2;
        } catch (...) {
          return false;
        }
      },
      15s));
  consumer.stop(5s);
  auto letters = raw.read_stream("test-payments-dlq");
  REQUIRE(letters.size() == 2);
  int raw_omitted = 0, body_omitted = 0;
  for (const auto& m : letters) {
    Headers headers(m.headers.begin(), m.headers.end());
    auto letter = parse_dead_letter(m.subject, m.data, headers);
    CHECK(letter.context.error_message.size() <= kMaxDlqErrorMessage);
    CHECK(letter.context.error_message_truncated);
    raw_omitted += letter.context.raw_omitted ? 1 : 0;
    body_omitted += letter.context.body_omitted ? 1 : 0;
    if (letter.context.body_omitted) {
      CHECK(letter.context.sequence == huge.sequence);  // where to read the original
    } else {
      CHECK(Envelope::decode(letter.body).message.at("blob").get<std::string>().size() == 6000);
    }
    CHECK(wire_size(headers, m.data.size()) <= static_cast<size_t>(kMaxPayload));
  }
  MESSAGE("dead letters: 2, raw_base64 omitted " << raw_omitted << ", body omitted " << body_omitted);
  CHECK(raw_omitted >= 1);
  CHECK(body_omitted == 1);
  CHECK(consumer.stats().front().dead_lettered == 2);
}
