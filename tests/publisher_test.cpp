#include <atomic>
#include <set>
#include <thread>

#include <doctest/doctest.h>
#include <nats/nats.h>

#include <natspubsub/connection.hpp>
#include <natspubsub/envelope.hpp>
#include <natspubsub/error.hpp>
#include <natspubsub/middleware.hpp>
#include <natspubsub/publisher.hpp>
#include <natspubsub/topology.hpp>

#include "support/nats_helpers.hpp"
#include "support/servers.hpp"

using namespace natspubsub;
using namespace std::chrono_literals;

TEST_CASE("publish -> raw pull fetch shows the envelope and headers") {
  testing::NatsServer server;
  auto config = testing::test_config(server.url(), "orders");
  Connection c(config);
  Topology(c).ensure_events_stream();
  Publisher p(c);

  PublishOptions o;
  o.message_type = "OrderCreated";
  o.trace_id = "trace-1";
  o.traceparent = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";
  o.headers["x-tenant"] = "acme";
  auto r = p.publish("order.created", {{"order_id", 42}, {"amount", 9.5}}, o);
  CHECK(r);
  CHECK(r.stream == "test-orders-events");
  CHECK(r.sequence == 1);
  CHECK_FALSE(r.duplicate);
  CHECK(is_uuid(r.event_id));
  CHECK(r.subject == "test.orders.order.created");

  // Fetch with a plain cnats pull subscription, as another language's consumer would.
  testing::RawNats raw(server.url());
  natsSubscription* sub = nullptr;
  jsErrCode jerr = static_cast<jsErrCode>(0);
  REQUIRE(js_PullSubscribe(&sub, raw.js(), "test.orders.>", "raw-reader", nullptr, nullptr, &jerr) == NATS_OK);
  natsMsgList list{};
  REQUIRE(natsSubscription_Fetch(&list, sub, 1, 5000, &jerr) == NATS_OK);
  REQUIRE(list.Count == 1);
  natsMsg* msg = list.Msgs[0];
  const char* v = nullptr;
  REQUIRE(natsMsgHeader_Get(msg, "Nats-Msg-Id", &v) == NATS_OK);
  CHECK(std::string(v) == r.event_id);
  REQUIRE(natsMsgHeader_Get(msg, "topic", &v) == NATS_OK);
  CHECK(std::string(v) == "order.created");
  REQUIRE(natsMsgHeader_Get(msg, "traceparent", &v) == NATS_OK);
  CHECK(std::string(v) == *o.traceparent);
  REQUIRE(natsMsgHeader_Get(msg, "x-tenant", &v) == NATS_OK);
  CHECK(std::string(v) == "acme");
  std::string body(natsMsg_GetData(msg), static_cast<size_t>(natsMsg_GetDataLength(msg)));
  auto json = nlohmann::json::parse(body);
  CHECK(json["event_id"] == r.event_id);
  CHECK(json["schema_version"] == 1);
  CHECK(json["topic"] == "order.created");
  CHECK(json["message_type"] == "OrderCreated");
  CHECK(json["producer"] == "orders");
  CHECK(json["trace_id"] == "trace-1");
  CHECK(json["message"]["order_id"] == 42);
  auto e = Envelope::decode(body);
  CHECK(e.event_id == r.event_id);
  natsMsg_Ack(msg, nullptr);
  natsMsgList_Destroy(&list);
  natsSubscription_Destroy(sub);
}

TEST_CASE("the same event id twice: duplicate flag, one message") {
  testing::NatsServer server;
  auto config = testing::test_config(server.url(), "orders");
  Connection c(config);
  Topology(c).ensure_events_stream();
  Publisher p(c);
  PublishOptions o;
  o.event_id = new_uuid();
  auto first = p.publish("order.created", {{"id", 1}}, o);
  auto second = p.publish("order.created", {{"id", 1}}, o);
  CHECK_FALSE(first.duplicate);
  CHECK(second.duplicate);
  CHECK(second.sequence == first.sequence);
  testing::RawNats raw(server.url());
  CHECK(raw.stream_messages("test-orders-events") == 1);
}

TEST_CASE("another app's subject, expected last sequence, no stream") {
  testing::NatsServer server;
  Connection orders(testing::test_config(server.url(), "orders"));
  Topology(orders).ensure_events_stream();
  Connection payments(testing::test_config(server.url(), "payments"));
  Publisher p(payments);

  PublishOptions o;
  o.subject = "test.orders.order.cancelled";
  auto r = p.publish("order.cancelled", {{"id", 1}}, o);
  CHECK(r.stream == "test-orders-events");

  PublishOptions expect;
  expect.subject = "test.orders.order.cancelled";
  expect.expected_last_sequence = 99;
  try {
    (void)p.publish("order.cancelled", {{"id", 2}}, expect);
    FAIL("wrong last sequence accepted");
  } catch (const PublishError& e) {
    CHECK(e.js_error_code() == 10071);
  }
  expect.expected_last_sequence = r.sequence;
  CHECK(p.publish("order.cancelled", {{"id", 2}}, expect).sequence == r.sequence + 1);

  // payments has no stream yet: nothing captures its subject.
  CHECK_THROWS_AS((void)p.publish("payment.completed", {{"id", 1}}), PublishError);
  CHECK_THROWS_AS((void)p.publish("bad topic", {{"id", 1}}), SubjectError);
  CHECK_THROWS_AS((void)p.publish("a..b", {{"id", 1}}), SubjectError);
}

TEST_CASE("payload over max_payload: clear error, nothing stored") {
  testing::NatsServer::Options so;
  so.max_payload = 4096;
  testing::NatsServer server(so);
  Connection c(testing::test_config(server.url(), "orders"));
  Topology(c).ensure_events_stream();
  Publisher p(c);
  std::string big(8000, 'x');
  try {
    (void)p.publish("order.created", {{"blob", big}});
    FAIL("oversize payload accepted");
  } catch (const PublishError& e) {
    CHECK(std::string(e.what()).find("max_payload") != std::string::npos);
  }
  std::vector<OutgoingEvent> batch(3);
  for (auto& e : batch) e.topic = "order.created";
  batch[1].message = {{"blob", big}};
  auto results = p.publish_batch(batch);
  REQUIRE(results.size() == 3);
  CHECK(results[0]);
  CHECK_FALSE(results[1]);
  CHECK_FALSE(results[1].error->retryable);
  CHECK(results[2]);
  testing::RawNats raw(server.url());
  CHECK(raw.stream_messages("test-orders-events") == 2);
  CHECK(c.connected());  // the refusal did not cost the connection
}

TEST_CASE("publish_batch: one result per message, in order, invalid items fail alone") {
  testing::NatsServer server;
  Connection c(testing::test_config(server.url(), "orders"));
  Topology(c).ensure_events_stream();
  Publisher p(c);
  std::vector<OutgoingEvent> batch;
  for (int i = 0; i < 2000; ++i) batch.push_back({"order.created", {{"i", i}}, {}});
  batch[500].topic = "not valid";
  BatchOptions bo;
  bo.window = 64;
  auto results = p.publish_batch(batch, bo);
  REQUIRE(results.size() == batch.size());
  std::set<uint64_t> seqs;
  for (size_t i = 0; i < results.size(); ++i) {
    if (i == 500) {
      CHECK_FALSE(results[i]);
      continue;
    }
    CHECK(results[i]);
    seqs.insert(results[i].sequence);
  }
  CHECK(seqs.size() == 1999);
  testing::RawNats raw(server.url());
  CHECK(raw.stream_messages("test-orders-events") == 1999);
}

TEST_CASE("server killed and restarted during publish_batch: retrying failures stores each event once") {
  testing::NatsServer server;
  auto config = testing::test_config(server.url(), "orders");
  config.stream.memory_storage = false;  // the store must survive the restart
  Connection c(config);
  Topology(c).ensure_events_stream();
  Publisher p(c);

  constexpr int kEvents = 10000;
  std::vector<OutgoingEvent> batch;
  for (int i = 0; i < kEvents; ++i) {
    OutgoingEvent e{"order.created", {{"i", i}}, {}};
    e.options.event_id = new_uuid();
    batch.push_back(std::move(e));
  }
  BatchOptions bo;
  bo.window = 128;
  bo.ack_timeout = 2s;

  testing::RawNats watcher(server.url());
  std::atomic<bool> restarted{false};
  std::thread chaos([&] {
    // Kill once part of the batch is stored, so the kill lands mid-batch.
    auto deadline = std::chrono::steady_clock::now() + 20s;
    while (std::chrono::steady_clock::now() < deadline) {
      uint64_t n = 0;
      try {
        n = watcher.stream_messages("test-orders-events");
      } catch (...) {
      }
      if (n >= 1000) break;
      std::this_thread::sleep_for(2ms);
    }
    server.kill();
    std::this_thread::sleep_for(300ms);
    server.start();
    restarted = true;
  });
  auto results = p.publish_batch(batch, bo);
  chaos.join();
  REQUIRE(restarted);

  size_t first_failures = 0;
  for (const auto& r : results) first_failures += r ? 0 : 1;
  MESSAGE("first pass: " << first_failures << " of " << kEvents << " not acknowledged");

  // Retry what failed, with the same event ids, until everything is acknowledged (bounded).
  int rounds = 0;
  for (; rounds < 20; ++rounds) {
    std::vector<size_t> failed;
    for (size_t i = 0; i < results.size(); ++i)
      if (!results[i]) failed.push_back(i);
    if (failed.empty()) break;
    std::vector<OutgoingEvent> retry;
    for (auto i : failed) retry.push_back(batch[i]);
    auto again = p.publish_batch(retry, bo);
    for (size_t k = 0; k < failed.size(); ++k) results[failed[k]] = again[k];
    if (std::any_of(again.begin(), again.end(), [](const auto& r) { return !r; })) std::this_thread::sleep_for(500ms);
  }
  for (const auto& r : results) REQUIRE(r);

  testing::RawNats raw(server.url());
  auto stored = raw.read_stream("test-orders-events");
  std::set<std::string> ids;
  for (const auto& m : stored) ids.insert(m.msg_id);
  size_t duplicates = stored.size() - ids.size();
  MESSAGE("stored " << stored.size() << " messages, " << ids.size() << " distinct event ids, " << duplicates
                    << " duplicated, retry rounds " << rounds);
  CHECK(stored.size() == kEvents);
  CHECK(ids.size() == kEvents);
  size_t missing = 0;
  for (const auto& e : batch) missing += ids.count(*e.options.event_id) == 1 ? 0 : 1;
  CHECK(missing == 0);
}

TEST_CASE("inside a trace (a handler under trace_context), events carry the trace on") {
  testing::NatsServer server;
  Connection c(testing::test_config(server.url(), "orders"));
  Topology(c).ensure_events_stream();
  Publisher p(c);
  auto parent = TraceContext::new_root();
  {
    TraceScope scope(parent);
    (void)p.publish("order.created", {{"id", 1}});
  }
  (void)p.publish("order.created", {{"id", 2}});  // no trace: no header
  testing::RawNats raw(server.url());
  auto stored = raw.read_stream("test-orders-events");
  REQUIRE(stored.size() == 2);
  std::string tp;
  for (const auto& [k, v] : stored[0].headers)
    if (k == "traceparent") tp = v;
  auto ctx = TraceContext::parse(tp);
  REQUIRE(ctx.has_value());
  CHECK(ctx->trace_id == parent.trace_id);
  CHECK(ctx->span_id != parent.span_id);
  CHECK(Envelope::decode(stored[0].data).trace_id == parent.trace_id);
  for (const auto& [k, v] : stored[1].headers) CHECK(k != "traceparent");
  CHECK_FALSE(Envelope::decode(stored[1].data).trace_id.has_value());
}
