// ctest-labels: integration
#include <algorithm>
#include <atomic>
#include <map>
#include <mutex>
#include <set>
#include <stdexcept>
#include <thread>
#include <vector>

#include <doctest/doctest.h>

#include <natspubsub/circuit_breaker.hpp>
#include <natspubsub/connection.hpp>
#include <natspubsub/consumer.hpp>
#include <natspubsub/error.hpp>
#include <natspubsub/publisher.hpp>
#include <natspubsub/request.hpp>
#include <natspubsub/topology.hpp>

#include "support/nats_helpers.hpp"
#include "support/servers.hpp"

using namespace natspubsub;
using namespace std::chrono_literals;

namespace {

using Clock = std::chrono::steady_clock;

template <typename Pred>
bool wait_until(Pred pred, std::chrono::milliseconds timeout) {
  const auto until = Clock::now() + timeout;
  while (Clock::now() < until) {
    if (pred()) return true;
    std::this_thread::sleep_for(5ms);
  }
  return pred();
}

void fail_once(CircuitBreaker& b) {
  CHECK_THROWS_AS(b.call([]() -> int { throw std::runtime_error("payments api down"); }), std::runtime_error);
}

}  // namespace

TEST_CASE("opens after N failures in the window, refuses while open, and says so in stats") {
  std::vector<std::pair<CircuitState, CircuitState>> transitions;
  std::mutex m;
  CircuitBreaker b({.name = "payments-api",
                    .failure_threshold = 3,
                    .window = Millis{10000},
                    .open_duration = Millis{60000},
                    .half_open_probes = 1,
                    .on_transition = [&](CircuitState from, CircuitState to) {
                      std::lock_guard lock(m);
                      transitions.emplace_back(from, to);
                    }});
  CHECK(b.state() == CircuitState::closed);
  CHECK(b.call([] { return 7; }) == 7);
  fail_once(b);
  fail_once(b);
  CHECK(b.state() == CircuitState::closed);  // a success in between does not reset the count
  CHECK(b.stats().failures_in_window == 2);
  fail_once(b);
  CHECK(b.state() == CircuitState::open);

  int called = 0;
  try {
    (void)b.call([&] { return ++called; });
    FAIL("an open circuit let a call through");
  } catch (const CircuitOpenError& e) {
    CHECK(e.name() == "payments-api");
    CHECK(e.retry_after() > Millis{50000});
    CHECK(std::string(e.what()).find("payments-api") != std::string::npos);
  }
  CHECK(called == 0);
  CHECK_FALSE(b.allow());

  auto s = b.stats();
  CHECK(s.state == CircuitState::open);
  CHECK(s.successes == 1);
  CHECK(s.failures == 3);
  CHECK(s.rejected == 2);
  CHECK(s.opened == 1);
  CHECK(s.last_error == "payments api down");
  CHECK(s.last_transition != SystemTime{});
  auto j = s.to_json();
  CHECK(j["state"] == "open");
  CHECK(j["rejected"] == 2);
  CHECK(j["retry_after_ms"].get<int64_t>() > 50000);
  std::lock_guard lock(m);
  REQUIRE(transitions.size() == 1);
  CHECK(transitions[0].first == CircuitState::closed);
  CHECK(transitions[0].second == CircuitState::open);
}

TEST_CASE("failures further apart than the window do not open it") {
  CircuitBreaker b({.name = "slow-drip", .failure_threshold = 2, .window = Millis{100}, .open_duration = Millis{1000}});
  b.record_failure("one");
  std::this_thread::sleep_for(150ms);
  b.record_failure("two");
  CHECK(b.state() == CircuitState::closed);
  CHECK(b.stats().failures_in_window == 1);
  b.record_failure("three");  // two inside 100 ms
  CHECK(b.state() == CircuitState::open);
}

TEST_CASE("half-open: a limited number of probes; all succeed -> closed, one fails -> open again") {
  CircuitBreaker b({.name = "probe", .failure_threshold = 1, .window = Millis{10000}, .open_duration = Millis{100},
                    .half_open_probes = 2});
  b.record_failure("down");
  CHECK(b.state() == CircuitState::open);
  CHECK(b.retry_after() > Millis{0});
  std::this_thread::sleep_for(130ms);
  CHECK(b.state() == CircuitState::half_open);
  CHECK(b.retry_after() == Millis{0});
  CHECK(b.allow());
  CHECK(b.allow());
  CHECK_FALSE(b.allow());  // both probes are out
  b.record_success();
  CHECK(b.state() == CircuitState::half_open);
  b.record_success();
  CHECK(b.state() == CircuitState::closed);
  CHECK(b.stats().closed == 1);

  b.record_failure("down again");
  CHECK(b.state() == CircuitState::open);
  std::this_thread::sleep_for(130ms);
  CHECK(b.allow());
  b.record_failure("still down");
  CHECK(b.state() == CircuitState::open);  // one failed probe reopens it for a full open_duration
  CHECK(b.retry_after() > Millis{50});
  CHECK(b.stats().opened == 3);
}

TEST_CASE("a probe whose outcome never comes back does not keep the circuit half-open for ever") {
  CircuitBreaker b({.name = "lost-probe", .failure_threshold = 1, .window = Millis{10000}, .open_duration = Millis{80}});
  b.record_failure("down");
  std::this_thread::sleep_for(100ms);
  CHECK(b.allow());         // the probe; its caller never reports
  CHECK_FALSE(b.allow());
  std::this_thread::sleep_for(100ms);
  CHECK(b.allow());         // renewed after open_duration
  b.record_success();
  CHECK(b.state() == CircuitState::closed);
}

TEST_CASE("reset closes the circuit; options are validated") {
  CircuitBreaker b({.name = "manual", .failure_threshold = 1});
  b.record_failure("x");
  CHECK(b.state() == CircuitState::open);
  b.reset();
  CHECK(b.state() == CircuitState::closed);
  CHECK(b.allow());

  auto field_of = [](CircuitBreakerOptions o) {
    try {
      CircuitBreaker bad(std::move(o));
    } catch (const ConfigError& e) {
      return e.field();
    }
    return std::string("accepted");
  };
  CHECK(field_of({.name = ""}) == "circuit_breaker.name");
  CHECK(field_of({.name = "x", .failure_threshold = 0}) == "circuit_breaker.failure_threshold");
  CHECK(field_of({.name = "x", .window = Millis{0}}) == "circuit_breaker.window");
  CHECK(field_of({.name = "x", .open_duration = Millis{-1}}) == "circuit_breaker.open_duration");
  CHECK(field_of({.name = "x", .half_open_probes = 0}) == "circuit_breaker.half_open_probes");
}

TEST_CASE("thread-safe: concurrent failures open it exactly once") {
  std::atomic<int> opened{0};
  CircuitBreaker b({.name = "race", .failure_threshold = 50, .window = Millis{60000}, .open_duration = Millis{60000},
                    .on_transition = [&](CircuitState, CircuitState to) {
                      if (to == CircuitState::open) opened++;
                    }});
  std::vector<std::jthread> threads;
  for (int t = 0; t < 4; ++t)
    threads.emplace_back([&] {
      for (int i = 0; i < 100; ++i) b.record_failure("x");
    });
  threads.clear();
  CHECK(opened == 1);
  CHECK(b.stats().failures == 400);
  CHECK(b.stats().opened == 1);
}

TEST_CASE("responder: an open circuit answers 503 unavailable at once, half-open probes close it") {
  testing::NatsServer server;
  Connection inventory(testing::test_config(server.url(), "inventory"));
  Connection orders(testing::test_config(server.url(), "orders"));

  std::atomic<bool> database_down{true};
  std::atomic<int> handler_calls{0};
  auto breaker = std::make_shared<CircuitBreaker>(CircuitBreakerOptions{
      .name = "inventory-db", .failure_threshold = 3, .window = Millis{10000}, .open_duration = Millis{300}});
  Responder stock(inventory, "stock.check", [&](const Request& r) -> nlohmann::json {
    handler_calls++;
    if (database_down) throw std::runtime_error("database unreachable");
    return {{"sku", r.data().at("sku")}, {"available", 3}};
  }, {.circuit_breaker = breaker});

  RequestOptions o{.timeout = Millis{2000}, .app = "inventory"};
  for (int i = 0; i < 3; ++i) {
    try {
      (void)request(orders, "stock.check", {{"sku", "A-1"}}, o);
      FAIL("a failing handler answered success");
    } catch (const RemoteError& e) {
      CHECK(e.code() == 500);
      CHECK(e.remote_message() == "database unreachable");
    }
  }
  CHECK(breaker->state() == CircuitState::open);
  CHECK(handler_calls == 3);

  // Open: answered at once, without calling the handler.
  const auto t0 = std::chrono::steady_clock::now();
  try {
    (void)request(orders, "stock.check", {{"sku", "A-1"}}, o);
    FAIL("an open circuit ran the handler");
  } catch (const RemoteError& e) {
    CHECK(e.code() == 503);
    CHECK(e.unavailable());
    CHECK(e.remote_message().find("inventory-db") != std::string::npos);
  }
  CHECK(std::chrono::steady_clock::now() - t0 < 250ms);
  CHECK(handler_calls == 3);
  auto s = stock.stats();
  CHECK(s.rejected == 1);
  CHECK(s.errors == 4);
  REQUIRE(s.circuit.has_value());
  CHECK(s.circuit->state == CircuitState::open);

  // The dependency recovers; after open_duration one probe goes through and closes the circuit.
  database_down = false;
  std::this_thread::sleep_for(350ms);
  auto reply = request(orders, "stock.check", {{"sku", "A-1"}}, o);
  CHECK(reply.data["available"] == 3);
  CHECK(breaker->state() == CircuitState::closed);
  CHECK(stock.stats().circuit->closed == 1);

  // A 4xx thrown by the handler is the caller's fault: it never opens the circuit.
  Responder strict(inventory, "sku.lookup", [&](const Request&) -> nlohmann::json {
    throw RemoteError(404, "unknown sku");
  }, {.circuit_breaker = breaker});
  for (int i = 0; i < 5; ++i) CHECK_THROWS_AS((void)request(orders, "sku.lookup", {{"sku", "Z"}}, o), RemoteError);
  CHECK(breaker->state() == CircuitState::closed);
}

TEST_CASE("consumer: a failing dependency opens the circuit; nothing reaches the DLQ, nothing is lost, each message processed once after recovery") {
  testing::NatsServer server;
  auto config = testing::test_config(server.url(), "orders");  // backoff 50/100/200 ms
  Connection nats(config);
  Topology(nats).ensure_events_stream();
  Publisher publisher(nats);
  constexpr int kEvents = 20;
  constexpr int kMaxAttempts = 3;
  std::set<std::string> published;
  for (int i = 0; i < kEvents; ++i) published.insert(publisher.publish("order.created", {{"n", i}}).event_id);

  std::atomic<bool> payments_down{true};
  std::atomic<int> calls{0};
  std::mutex m;
  std::map<std::string, int> processed;
  std::map<std::string, uint64_t> deliveries_at_success;
  std::set<std::string> failed_after_recovery;
  auto breaker = std::make_shared<CircuitBreaker>(CircuitBreakerOptions{
      .name = "payments-api", .failure_threshold = 3, .window = Millis{10000}, .open_duration = Millis{100}});
  Consumer consumer(nats);
  consumer.subscribe("order.created", [&](const Message& msg) {
    calls++;
    if (payments_down) throw std::runtime_error("payments api: connection refused");
    std::lock_guard lock(m);
    // Once the circuit is closed again, a message that was delivered max_attempts times or more
    // fails once more for a reason of its own: it must still be retried, because waiting was no
    // attempt.
    if (msg.metadata.deliveries >= kMaxAttempts && breaker->state() == CircuitState::closed &&
        failed_after_recovery.size() < 2 &&
        failed_after_recovery.insert(msg.envelope.event_id).second)
      throw std::runtime_error("a transient failure of this message");
    processed[msg.envelope.event_id]++;
    deliveries_at_success[msg.envelope.event_id] = msg.metadata.deliveries;
  }, {.concurrency = 1, .max_attempts = kMaxAttempts, .circuit_breaker = breaker});
  consumer.start();

  REQUIRE(wait_until([&] { return breaker->stats().opened >= 1; }, 5000ms));
  // Down long enough for many open / half-open rounds: each failed probe reopens the circuit.
  const auto down_until = Clock::now() + 1500ms;
  testing::RawNats raw(server.url());
  int open_samples = 0;
  while (Clock::now() < down_until) {
    auto s = consumer.stats()[0];
    CHECK(s.dead_lettered == 0);
    if (s.circuit->state == CircuitState::open) open_samples++;
    std::this_thread::sleep_for(50ms);
  }
  const int calls_while_down = calls.load();
  auto down = consumer.stats()[0];
  MESSAGE("while down: " << calls_while_down << " handler calls, " << down.received << " fetched, " << down.deferred
                         << " deferred, circuit opened " << down.circuit->opened << " times");
  CHECK(open_samples > 5);
  CHECK(down.circuit->opened >= 3);           // failed probes reopened it
  CHECK(down.deferred >= 3);                  // failed probes waited instead of spending attempts
  CHECK(down.received < kEvents);             // while open it stopped fetching: most never left the stream
  CHECK(down.dead_lettered == 0);
  CHECK(raw.stream_messages("test-orders-dlq") == 0);

  payments_down = false;
  REQUIRE(wait_until([&] {
    std::lock_guard lock(m);
    return processed.size() == published.size();
  }, 15000ms));
  CHECK(wait_until([&] { return consumer.stats()[0].acked == kEvents; }, 5000ms));
  consumer.stop(Millis{5000});

  std::lock_guard lock(m);
  for (const auto& id : published) CHECK(processed[id] == 1);
  CHECK(processed.size() == published.size());
  uint64_t most = 0;
  for (const auto& [id, n] : deliveries_at_success) most = std::max(most, n);
  MESSAGE("most deliveries of one message: " << most << "; failed once after recovery: " << failed_after_recovery.size());
  CHECK(!failed_after_recovery.empty());  // the case below was exercised
  CHECK(most > kMaxAttempts + 2);         // deferrals are no attempts: far past max_attempts, no DLQ
  CHECK(raw.stream_messages("test-orders-dlq") == 0);
  auto after = consumer.stats()[0];
  CHECK(after.dead_lettered == 0);
  CHECK(after.circuit->state == CircuitState::closed);
  CHECK(after.circuit->closed >= 1);
}

TEST_CASE("consumer: without a circuit breaker the same outage sends messages to the DLQ (the test above can fail)") {
  testing::NatsServer server;
  auto config = testing::test_config(server.url(), "orders");
  Connection nats(config);
  Topology(nats).ensure_events_stream();
  Publisher publisher(nats);
  for (int i = 0; i < 5; ++i) (void)publisher.publish("order.created", {{"n", i}});
  Consumer consumer(nats);
  consumer.subscribe("order.created", [&](const Message&) { throw std::runtime_error("payments api down"); },
                     {.concurrency = 2, .max_attempts = 3});
  consumer.start();
  CHECK(wait_until([&] { return consumer.stats()[0].dead_lettered == 5; }, 10000ms));
  consumer.stop(Millis{5000});
}
