// ctest-labels: security
// Hostile input is stored and passed literally, or refused by a stated rule: quotes, SQL
// fragments, NUL bytes, CR/LF and invalid UTF-8 in payloads, headers, event ids, partition keys
// and subjects, through the publisher, the outbox (SQLite and PostgreSQL) and relay, the consumer
// and the inbox. Nothing may break a query, the envelope, or a log line, and nothing may be
// silently changed on the way.
#include <atomic>
#include <chrono>
#include <mutex>
#include <string>
#include <vector>

#include <doctest/doctest.h>

#include <natspubsub/connection.hpp>
#include <natspubsub/consumer.hpp>
#include <natspubsub/envelope.hpp>
#include <natspubsub/error.hpp>
#include <natspubsub/inbox.hpp>
#include <natspubsub/outbox.hpp>
#include <natspubsub/outbox_relay.hpp>
#include <natspubsub/publisher.hpp>
#include <natspubsub/store/database.hpp>
#include <natspubsub/store/migrations.hpp>
#include <natspubsub/subject.hpp>
#include <natspubsub/topology.hpp>

#include "support/databases.hpp"
#include "support/fault.hpp"
#include "support/log_capture.hpp"
#include "support/nats_helpers.hpp"
#include "support/servers.hpp"

using namespace natspubsub;
using namespace std::chrono_literals;
using namespace std::string_literals;

namespace {

// Strings that have broken naive code somewhere.
const std::vector<std::string>& nasty_strings() {
  static const std::vector<std::string> strings = {
      "it's \"quoted\" `twice`",
      "'); DROP TABLE natspubsub_outbox; --",
      "1' OR '1'='1",
      "$1 $2 ? :name %s %n {}",
      "back\\slash \\u0000 \\\"",
      "nul\0inside"s,
      "\0"s,
      "line\r\nforged: header\r\n\r\nbody",
      "{\"event_id\":\"spoof\"}",
      "emoji \xF0\x9F\x92\xB3 and \xC3\xA9",
      std::string(5000, 'x'),
  };
  return strings;
}

const std::string kInvalidUtf8 = "bad \xC3\x28 \xFF\xFE end";

}  // namespace

TEST_CASE("nasty strings inside an envelope's message round-trip exactly through JetStream and the consumer") {
  testing::LogCapture logs;
  testing::NatsServer server;
  Connection orders(testing::test_config(server.url(), "orders"));
  Topology(orders).ensure_events_stream();
  Connection payments(testing::test_config(server.url(), "payments"));

  nlohmann::json sent = nlohmann::json::object();
  for (size_t i = 0; i < nasty_strings().size(); ++i) sent["k" + std::to_string(i)] = nasty_strings()[i];
  sent[nasty_strings()[1]] = "a key that is SQL";

  std::mutex mutex;
  std::vector<nlohmann::json> received;
  Consumer consumer(payments);
  consumer.subscribe_subject("test.orders.>", [&](const Message& m) {
    std::lock_guard lock(mutex);
    received.push_back(m.envelope.message);
  });
  consumer.start();
  Publisher publisher(orders);
  PublishOptions po;
  po.message_type = nasty_strings()[0];
  po.trace_id = nasty_strings()[2];
  auto ack = publisher.publish("order.created", sent, po);
  CHECK(ack.sequence == 1);
  REQUIRE(testing::eventually([&] { std::lock_guard lock(mutex); return received.size() == 1; }, 10s));
  consumer.stop(5s);
  CHECK(received[0] == sent);

  // Invalid UTF-8 cannot be JSON text: refused with a typed error naming the field.
  nlohmann::json bad = {{"note", kInvalidUtf8}};
  CHECK_THROWS_AS(publisher.publish("order.created", bad), EnvelopeError);
  CHECK(logs.text().find('\0') == std::string::npos);
}

TEST_CASE("hostile topics and subjects are refused by the subject rules, never sent") {
  testing::NatsServer server;
  Connection orders(testing::test_config(server.url(), "orders"));
  Topology(orders).ensure_events_stream();
  Publisher publisher(orders);
  for (const auto& topic : {"order.created\r\nPUB evil 1"s, "order. created"s, "order..created"s, "order.*"s,
                            "order.>"s, "nul\0topic"s, "'; DROP TABLE x; --"s, ""s, kInvalidUtf8}) {
    CAPTURE(topic);
    CHECK_THROWS_AS(publisher.publish(topic, {{"x", 1}}), SubjectError);
  }
  testing::RawNats raw(server.url());
  CHECK(raw.stream_messages("test-orders-events") == 0);
}

TEST_CASE("header values with CR/LF or NUL are refused or kept literally, never split into extra headers") {
  testing::NatsServer server;
  Connection orders(testing::test_config(server.url(), "orders"));
  Topology(orders).ensure_events_stream();
  Publisher publisher(orders);
  int stored = 0;
  for (const auto& value : {"x\r\nNats-Msg-Id: forged-id"s, "x\r\n\r\nforged body"s, "nul\0value"s, "quote\"'"s}) {
    CAPTURE(value);
    PublishOptions po;
    po.headers["x-note"] = value;
    try {
      auto ack = publisher.publish("order.created", {{"n", stored}}, po);
      ++stored;
      testing::RawNats raw(server.url());
      auto messages = raw.read_stream("test-orders-events");
      REQUIRE(!messages.empty());
      const auto& m = messages.back();
      CHECK(m.msg_id == ack.event_id);  // the header block was not rewritten from inside a value
      std::string note;
      for (const auto& [k, v] : m.headers)
        if (k == "x-note") note = v;
      CHECK(note == value);
    } catch (const PublishError& e) {
      MESSAGE("refused: " << std::string(e.what()));
      CHECK(std::string(e.what()).find("x-note") != std::string::npos);
    }
  }
  testing::RawNats raw(server.url());
  for (const auto& m : raw.read_stream("test-orders-events")) {
    for (const auto& [k, v] : m.headers) CHECK(k != "forged body");
    CHECK(m.msg_id != "forged-id");
  }
}

namespace {

// The outbox, then the relay, then the stream: every accepted row arrives byte for byte.
void outbox_round_trip(const std::string& db_url) {
  testing::LogCapture logs;
  testing::NatsServer server;
  auto db = store::open_database(db_url);
  store::migrate(*db);
  Connection nats(testing::test_config(server.url(), "orders"));
  Topology(nats).ensure_events_stream();

  struct Row {
    OutboxMessage message;
    bool accepted = false;
  };
  std::vector<Row> rows;
  auto add = [&](std::string payload, nlohmann::json headers, std::optional<std::string> key) {
    OutboxMessage m{new_uuid(), "test.orders.order.created", std::move(payload), std::move(headers), std::move(key)};
    rows.push_back({m, false});
  };
  for (const auto& s : nasty_strings()) add(s, {{"x-note", "ok"}}, s.empty() || s == "\0"s ? std::nullopt : std::optional(s));
  add(kInvalidUtf8, nlohmann::json::object(), std::nullopt);
  for (const auto& s : nasty_strings())
    if (s.find('\r') == std::string::npos && s.find('\0') == std::string::npos) add("{}", {{"x-note", s}}, std::nullopt);

  int refused = 0;
  for (auto& r : rows) {
    try {
      db->in_transaction([&](store::Transaction& tx) { enqueue(tx, r.message); });
      r.accepted = true;
    } catch (const OutboxError& e) {
      ++refused;  // the outbox's own rules (headers that cannot be one text line)
      MESSAGE("refused by rule: " << std::string(e.what()));
    } catch (const store::DatabaseError& e) {
      ++refused;  // PostgreSQL text holds neither NUL nor invalid UTF-8: a typed error says which parameter
      MESSAGE("refused by the database: " << std::string(e.what()));
      CHECK(e.code() == "22021");
    }
  }
  // The SQL fragments did nothing: the table is there and has exactly the accepted rows.
  int accepted = 0;
  for (const auto& r : rows) accepted += r.accepted ? 1 : 0;
  CHECK(testing::query(*db, "SELECT COUNT(*) FROM natspubsub_outbox")[0].as_int(0) == accepted);

  RelayOptions ro;
  ro.poll_interval = 20ms;
  ro.backoff = {20ms};
  ro.max_attempts = 2;
  OutboxRelay relay(nats, *db, ro);
  relay.drain();

  testing::RawNats raw(server.url());
  auto stored = raw.read_stream("test-orders-events");
  std::map<std::string, testing::StoredMessage> by_id;
  for (auto& m : stored) by_id[m.msg_id] = m;
  int exact = 0;
  for (const auto& r : rows) {
    if (!r.accepted) continue;
    auto it = by_id.find(r.message.event_id);
    REQUIRE_MESSAGE(it != by_id.end(), "accepted row not published");
    CHECK(it->second.data == r.message.payload);
    for (const auto& [k, v] : r.message.headers.items()) {
      std::string got;
      for (const auto& [hk, hv] : it->second.headers)
        if (hk == k) got = hv;
      CHECK(got == v.get<std::string>());
    }
    exact += it->second.data == r.message.payload ? 1 : 0;
  }
  MESSAGE(db_url.substr(0, db_url.find(':')) << ": " << rows.size() << " hostile rows, " << accepted << " accepted and "
                                              << exact << " published byte for byte, " << refused << " refused by rule");
  CHECK(stored.size() == static_cast<size_t>(accepted));
  CHECK(logs.text().find('\0') == std::string::npos);
}

// The inbox keyed by hostile consumer names and event ids: one run, then duplicates.
void inbox_hostile_keys(const std::string& db_url) {
  auto db = store::open_database(db_url);
  store::migrate(*db);
  auto inbox = make_inbox(*db);
  int runs = 0, refused = 0;
  for (const auto& s : nasty_strings()) {
    InboxKey key;
    key.consumer = "c " + s;
    key.event_id = s;
    key.subject = "test.orders.x";
    key.stream = s;
    try {
      auto first = inbox->process(key, [&](store::Transaction&) { ++runs; });
      auto second = inbox->process(key, [&](store::Transaction&) { ++runs; });
      CHECK(first == InboxResult::processed);
      CHECK(second == InboxResult::duplicate);
    } catch (const store::DatabaseError& e) {
      ++refused;  // a NUL byte on PostgreSQL: text cannot hold it, and the error says so
      MESSAGE("refused: " << std::string(e.what()));
      CHECK(e.code() == "22021");
    }
  }
  MESSAGE(db_url.substr(0, db_url.find(':')) << ": " << nasty_strings().size() << " hostile keys, " << runs
                                              << " processed once (then duplicate), " << refused << " refused");
  CHECK(runs + refused == static_cast<int>(nasty_strings().size()));
  CHECK(testing::query(*db, "SELECT COUNT(*) FROM natspubsub_inbox")[0].as_int(0) == runs);
}

}  // namespace

TEST_CASE("SQLite outbox + relay: hostile payloads, headers and keys are published byte for byte or refused") {
  testing::TempDir dir;
  outbox_round_trip("sqlite://" + testing::sqlite_file(dir));
}

TEST_CASE("PostgreSQL outbox + relay: hostile payloads, headers and keys are published byte for byte or refused") {
  outbox_round_trip(testing::fresh_postgres_database("hostile"));
}

TEST_CASE("SQLite inbox: hostile consumer names and event ids are keys like any other") {
  testing::TempDir dir;
  inbox_hostile_keys("sqlite://" + testing::sqlite_file(dir));
}

TEST_CASE("PostgreSQL inbox: hostile consumer names and event ids are keys like any other") {
  inbox_hostile_keys(testing::fresh_postgres_database("hostile_inbox"));
}

TEST_CASE("a malformed body with NUL, CR/LF and invalid UTF-8 goes to the DLQ; the log stays one record per line") {
  testing::LogCapture logs;
  testing::NatsServer server;
  Connection orders(testing::test_config(server.url(), "orders"));
  Topology(orders).ensure_events_stream();
  Connection payments(testing::test_config(server.url(), "payments"));
  Consumer consumer(payments);
  std::atomic<int> calls{0};
  consumer.subscribe_subject("test.orders.>", [&](const Message&) { calls++; });
  consumer.start();
  Publisher publisher(orders);
  RawMessage m;
  m.subject = "test.orders.order.created";
  m.payload = "not json\0\r\n[error] forged log line\xFF\xFE '; DROP TABLE x; --"s;
  m.msg_id = "hostile-1";
  for (const auto& r : publisher.publish_raw_batch({m})) REQUIRE(r);
  REQUIRE(testing::eventually([&] { return consumer.stats().front().malformed == 1; }, 10s));
  consumer.stop(5s);
  CHECK(calls == 0);
  testing::RawNats raw(server.url());
  auto dead = raw.read_stream("test-payments-dlq");
  REQUIRE(dead.size() == 1);
  CHECK(dead[0].data == m.payload);  // kept exactly
  auto text = logs.text();
  CHECK(text.find('\0') == std::string::npos);
  CHECK(text.find("\n[error] forged log line") == std::string::npos);
}
