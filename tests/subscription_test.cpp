// ctest-labels: integration
// One subscription (src/subscription.hpp), wired by hand without the Consumer class, against a
// real nats-server: a message's life from fetch to ack, retry, dead letter or deferral.
#include <atomic>
#include <chrono>
#include <memory>
#include <stdexcept>
#include <stop_token>
#include <string>

#include <doctest/doctest.h>
#include <nats/nats.h>

#include <natspubsub/circuit_breaker.hpp>
#include <natspubsub/connection.hpp>
#include <natspubsub/dlq.hpp>
#include <natspubsub/envelope.hpp>
#include <natspubsub/middleware.hpp>
#include <natspubsub/topology.hpp>

#include "subscription.hpp"
#include "support/eventually.hpp"
#include "support/nats_helpers.hpp"
#include "support/pull_consumer.hpp"
#include "support/servers.hpp"

using namespace natspubsub;
using namespace std::chrono_literals;
using detail::Subscription;

namespace {

constexpr const char* kEvents = "test-orders-events";
constexpr const char* kDlq = "test-orders-dlq";
constexpr const char* kDurable = "wired";

struct Fixture {
  testing::NatsServer server;
  testing::RawNats raw{server.url()};
  Connection connection{testing::test_config(server.url(), "orders")};
  DlqPublisher dlq{connection};
  std::unique_ptr<testing::PullConsumer> durable;  // creates the durable the subscription binds to
  std::stop_source handler_stop;

  Fixture() {
    raw.add_stream(kEvents, {"test.orders.>"});
    Topology(connection).ensure_dlq_stream();
    durable = std::make_unique<testing::PullConsumer>(raw, kEvents, kDurable, "test.orders.>");
  }

  uint64_t publish(const std::string& body) { return durable->publish("test.orders.order.created", body); }

  // Settings as the Consumer would fill them; the caller may change them before wire().
  std::unique_ptr<Subscription> subscription(Next handler) {
    auto s = std::make_unique<Subscription>();
    s->filter = "test.orders.>";
    s->durable = kDurable;
    s->stream = kEvents;
    s->concurrency = 2;
    s->max_attempts = 3;
    s->backoff = Backoff::list({Millis{50}});
    s->ack_wait = Millis{30000};
    s->in_progress_interval = Millis{10000};
    s->max_in_progress = Millis{600000};
    s->fetch_timeout = Millis{500};
    s->max_deliver = -1;
    s->max_ack_pending = 100;
    s->chain = compose({}, std::move(handler));
    s->handler_stop = handler_stop.get_token();
    return s;
  }

  void wire(Subscription& s) {
    s.bind(connection, dlq, Millis{5000}, true);
    s.start();
  }

  std::vector<DeadLetter> letters() {
    std::vector<DeadLetter> out;
    for (const auto& m : raw.read_stream(kDlq))
      out.push_back(parse_dead_letter(m.subject, m.data, Headers(m.headers.begin(), m.headers.end())));
    return out;
  }
};

std::string envelope(int n) { return Envelope::make("order.created", "orders", {{"n", n}}).encode(); }

}  // namespace

TEST_CASE("handlers that succeed: each message acked once, the server's ack floor moves") {
  Fixture f;
  std::atomic<int> calls{0};
  auto s = f.subscription([&](const Message& m) {
    CHECK(m.metadata.consumer == kDurable);
    CHECK(m.max_attempts == 3);
    calls++;
  });
  f.wire(*s);
  for (int i = 0; i < 5; ++i) f.publish(envelope(i));
  CHECK(testing::eventually([&] { return s->stats().acked == 5; }));
  const auto stats = s->stats();
  CHECK(calls == 5);
  CHECK(stats.received == 5);
  CHECK(stats.handler_errors == 0);
  CHECK(stats.durable == kDurable);
  CHECK(stats.stream == kEvents);
  CHECK(testing::eventually([&] { return f.raw.durable_state(kEvents, kDurable).ack_floor == 5; }));
  CHECK(testing::eventually([&] { return s->stats().in_flight == 0; }));
}

TEST_CASE("a handler that keeps failing: NAKed with the backoff, then dead-lettered on its last attempt") {
  Fixture f;
  std::atomic<int> calls{0};
  auto s = f.subscription([&](const Message&) {
    calls++;
    throw std::runtime_error("database is down");
  });
  f.wire(*s);
  const uint64_t seq = f.publish(envelope(1));
  CHECK(testing::eventually([&] { return s->stats().dead_lettered == 1; }));
  CHECK(calls == 3);
  const auto stats = s->stats();
  CHECK(stats.retried == 2);
  CHECK(stats.handler_errors == 3);
  const auto letters = f.letters();
  REQUIRE(letters.size() == 1);
  CHECK(letters[0].context.reason == DlqReason::attempts_exhausted);
  CHECK(letters[0].context.deliveries == 3);
  CHECK(letters[0].context.sequence == seq);
  CHECK(letters[0].context.error_message == "database is down");
  CHECK(testing::eventually([&] { return f.raw.durable_state(kEvents, kDurable).ack_pending == 0; }));
}

TEST_CASE("a delivery past max_attempts is dead-lettered without running the handler; a bad body as malformed") {
  Fixture f;
  f.publish(envelope(1));
  // Two deliveries without a verdict, as a process that crashed inside the handler leaves them.
  for (int i = 0; i < 2; ++i) {
    natsMsg* msg = f.durable->fetch_one(5s);
    REQUIRE(msg != nullptr);
    REQUIRE(natsMsg_Nak(msg, nullptr) == NATS_OK);
    natsMsg_Destroy(msg);
  }
  f.publish("this is not an envelope");
  std::atomic<int> calls{0};
  auto s = f.subscription([&](const Message&) { calls++; });
  s->max_attempts = 2;
  f.wire(*s);
  CHECK(testing::eventually([&] { return s->stats().dead_lettered == 2; }));
  const auto stats = s->stats();
  CHECK(stats.max_deliveries == 1);
  CHECK(stats.malformed == 1);
  CHECK(calls == 0);
  const auto letters = f.letters();
  REQUIRE(letters.size() == 2);
  int max_deliveries = 0, malformed = 0;
  for (const auto& l : letters) {
    if (l.context.reason == DlqReason::max_deliveries) {
      ++max_deliveries;
      CHECK(l.context.deliveries == 3);
    }
    if (l.context.reason == DlqReason::malformed) ++malformed;
  }
  CHECK(max_deliveries == 1);
  CHECK(malformed == 1);
}

TEST_CASE("a failure that opens the circuit defers the message without spending an attempt") {
  Fixture f;
  std::atomic<int> calls{0};
  auto s = f.subscription([&](const Message& m) {
    if (++calls == 1) throw std::runtime_error("payments down");
    CHECK(m.attempt() == 2);
    CHECK_FALSE(m.last_attempt());  // max_attempts 2, one delivery was a deferral
  });
  s->max_attempts = 2;
  s->breaker = std::make_shared<CircuitBreaker>(
      CircuitBreakerOptions{.name = "payments", .failure_threshold = 1, .open_duration = Millis{300}});
  f.wire(*s);
  f.publish(envelope(1));
  CHECK(testing::eventually([&] { return s->stats().acked == 1; }));
  const auto stats = s->stats();
  CHECK(calls == 2);
  CHECK(stats.deferred == 1);
  CHECK(stats.retried == 0);
  CHECK(stats.dead_lettered == 0);
  CHECK(stats.handler_errors == 1);
}

TEST_CASE("the MAX_DELIVERIES advisory is listened to only with a finite max_deliver") {
  Fixture f;
  auto unlimited = f.subscription([](const Message&) {});
  unlimited->bind(f.connection, f.dlq, Millis{5000}, true);
  CHECK_FALSE(unlimited->advisory);
  CHECK(unlimited->pull);
  CHECK(unlimited->queue->capacity() == 2);

  auto finite = f.subscription([](const Message&) {});
  finite->max_deliver = 5;
  finite->prefetch = 3;
  finite->bind(f.connection, f.dlq, Millis{5000}, true);
  CHECK(finite->advisory);
  CHECK(finite->queue->capacity() == 5);

  auto not_captured = f.subscription([](const Message&) {});
  not_captured->max_deliver = 5;
  not_captured->bind(f.connection, f.dlq, Millis{5000}, false);
  CHECK_FALSE(not_captured->advisory);
}
