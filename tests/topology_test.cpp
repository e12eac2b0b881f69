#include <doctest/doctest.h>
#include <nats/nats.h>

#include <natspubsub/connection.hpp>
#include <natspubsub/error.hpp>
#include <natspubsub/topology.hpp>

#include "support/nats_helpers.hpp"
#include "support/servers.hpp"

using namespace natspubsub;
using namespace std::chrono_literals;

TEST_CASE("events stream: created once, then unchanged") {
  testing::NatsServer server;
  Connection c(testing::test_config(server.url(), "orders"));
  Topology t(c);
  auto first = t.ensure_events_stream();
  CHECK(first.action == EnsureAction::created);
  CHECK(first.stream == "test-orders-events");
  CHECK(first.subjects == std::vector<std::string>{"test.orders.>"});
  auto second = t.ensure_events_stream();
  CHECK(second.action == EnsureAction::unchanged);
  CHECK(second.changes.empty());
  auto dlq = t.ensure_dlq_stream();
  CHECK(dlq.action == EnsureAction::created);
  CHECK(dlq.stream == "test-orders-dlq");
  CHECK(dlq.subjects == std::vector<std::string>{"dlq.test.orders.>"});
  CHECK(t.stream_for("test.orders.order.created") == "test-orders-events");
  CHECK(t.stream_for("dlq.test.orders.test.orders.x") == "test-orders-dlq");
  CHECK_FALSE(t.stream_for("test.payments.x").has_value());
}

TEST_CASE("a stream made by the NatsPubsub JS/Ruby layout is adopted, not refused") {
  testing::NatsServer server;
  testing::RawNats raw(server.url());
  raw.add_stream("test-events-stream", {"test.events.>", "test.orders.>"});
  Connection c(testing::test_config(server.url(), "orders"));
  Topology t(c);
  auto r = t.ensure_events_stream();
  CHECK(r.action == EnsureAction::adopted);
  CHECK(r.stream == "test-events-stream");
  CHECK(t.streams().size() == 1);  // nothing new was made
}

TEST_CASE("an overlapping stream is refused with both names") {
  testing::NatsServer server;
  testing::RawNats raw(server.url());
  raw.add_stream("legacy-orders", {"test.orders.order.*"});
  Connection c(testing::test_config(server.url(), "orders"));
  Topology t(c);
  try {
    (void)t.ensure_events_stream();
    FAIL("overlap accepted");
  } catch (const OverlapError& e) {
    CHECK(e.stream() == "test-orders-events");
    CHECK(e.other_stream() == "legacy-orders");
    std::string what = e.what();
    CHECK(what.find("test-orders-events") != std::string::npos);
    CHECK(what.find("legacy-orders") != std::string::npos);
  }
  CHECK(t.streams().size() == 1);
}

TEST_CASE("an existing stream gains missing subjects but is never weakened") {
  testing::NatsServer server;
  testing::RawNats raw(server.url());
  raw.add_stream("test-orders-events", {"test.orders.order.>"});  // an operator's narrower stream, R1
  auto config = testing::test_config(server.url(), "orders");
  config.stream.max_age = 3600000ms;  // ours differs: must be reported, not applied
  Connection c(config);
  Topology t(c);
  auto r = t.ensure_events_stream();
  CHECK(r.action == EnsureAction::updated);
  REQUIRE(r.changes.size() >= 1);
  CHECK(r.changes[0].find("test.orders.>") != std::string::npos);
  CHECK_FALSE(r.not_applied.empty());
  auto info = t.stream_info("test-orders-events");
  CHECK(info.subjects == std::vector<std::string>{"test.orders.>"});  // the broader subject replaced the narrow one
  CHECK(t.ensure_events_stream().action == EnsureAction::unchanged);
}

TEST_CASE("invalid names and subjects are rejected before reaching the server") {
  testing::NatsServer server;
  Connection c(testing::test_config(server.url(), "orders"));
  Topology t(c);
  StreamSpec bad;
  bad.name = "has.dot";
  bad.subjects = {"a.b"};
  CHECK_THROWS_AS(t.ensure_stream(bad), SubjectError);
  bad.name = "ok";
  bad.subjects = {"a..b"};
  CHECK_THROWS_AS(t.ensure_stream(bad), SubjectError);
  bad.subjects = {"a.>.b"};
  CHECK_THROWS_AS(t.ensure_stream(bad), SubjectError);
  bad.subjects = {};
  CHECK_THROWS_AS(t.ensure_stream(bad), TopologyError);
}

TEST_CASE("durable consumers: create, unchanged, update, refused change, recreate") {
  testing::NatsServer server;
  auto orders = testing::test_config(server.url(), "orders");
  auto payments = testing::test_config(server.url(), "payments");
  Connection oc(orders);
  Connection pc(payments);
  Topology(oc).ensure_events_stream();
  Topology t(pc);

  // payments consumes orders' topic: the consumer lives on the orders stream.
  auto spec = Topology::consumer_spec(payments, "test.orders.order.created");
  CHECK(spec.durable == "test-payments-test_orders_order_created");
  CHECK(spec.max_deliver == -1);  // unlimited: the consumer runtime decides the last attempt
  auto created = t.ensure_consumer(spec);
  CHECK(created.action == EnsureAction::created);
  CHECK(created.stream == "test-orders-events");
  CHECK(t.consumer_exists("test-orders-events", spec.durable));

  CHECK(t.ensure_consumer(spec).action == EnsureAction::unchanged);

  spec.max_ack_pending = 50;
  spec.ack_wait = 7s;
  auto updated = t.ensure_consumer(spec);
  CHECK(updated.action == EnsureAction::updated);
  CHECK(updated.changes.size() == 2);

  // A durable made with a finite MaxDeliver (older versions used max_attempts + 2) becomes
  // unlimited in place: nats-server 2.9.10 allows editing MaxDeliver.
  auto finite = spec;
  finite.max_deliver = payments.consumer.max_attempts + 2;
  CHECK(t.ensure_consumer(finite).action == EnsureAction::updated);
  auto unlimited = t.ensure_consumer(spec);
  CHECK(unlimited.action == EnsureAction::updated);
  REQUIRE(unlimited.changes.size() == 1);
  CHECK(unlimited.changes[0] == "max_deliver: " + std::to_string(payments.consumer.max_attempts + 2) + " -> -1");
  CHECK(t.ensure_consumer(spec).action == EnsureAction::unchanged);

  // A new filter subject is applied in place (nats-server 2.9.10 allows it).
  auto moved = spec;
  moved.filter_subject = "test.orders.order.*";
  CHECK(t.ensure_consumer(moved).action == EnsureAction::updated);

  // A push consumer of the same name cannot become a pull consumer in place: a clear error,
  // the consumer untouched, unless recreate is asked for.
  testing::RawNats raw(server.url());
  jsConsumerConfig push;
  jsConsumerConfig_Init(&push);
  push.Durable = "test-payments-push";
  push.DeliverSubject = "push.inbox";
  push.AckPolicy = js_AckExplicit;
  push.FilterSubject = "test.orders.order.created";
  jsConsumerInfo* ci = nullptr;
  jsErrCode jerr = static_cast<jsErrCode>(0);
  REQUIRE(js_AddConsumer(&ci, raw.js(), "test-orders-events", &push, nullptr, &jerr) == NATS_OK);
  jsConsumerInfo_Destroy(ci);
  auto pull = spec;
  pull.durable = "test-payments-push";
  try {
    (void)t.ensure_consumer(pull);
    FAIL("push consumer silently changed");
  } catch (const TopologyError& e) {
    CHECK(std::string(e.what()).find("recreate") != std::string::npos);
    CHECK(std::string(e.what()).find("test-payments-push") != std::string::npos);
  }
  CHECK(t.consumer_exists("test-orders-events", "test-payments-push"));
  auto recreated = t.ensure_consumer(pull, /*recreate=*/true);
  CHECK(recreated.action == EnsureAction::recreated);
  CHECK(t.ensure_consumer(pull).action == EnsureAction::unchanged);

  auto nowhere = Topology::consumer_spec(payments, "test.shipping.x");
  CHECK_THROWS_AS(t.ensure_consumer(nowhere), TopologyError);
}
