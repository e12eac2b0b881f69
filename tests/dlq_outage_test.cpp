// ctest-labels: integration;slow
// A message the runtime decided to dead-letter stays owned until the DLQ stored it, however long
// the DLQ is gone; a message whose handler never gives a verdict (it kills the process) is
// dead-lettered once its deliveries pass max_attempts. Real nats-server, real child processes.
#include <atomic>
#include <chrono>
#include <csignal>
#include <fstream>
#include <map>
#include <mutex>
#include <set>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

#include <doctest/doctest.h>
#include <nats/nats.h>
#include <nlohmann/json.hpp>

#include <natspubsub/connection.hpp>
#include <natspubsub/consumer.hpp>
#include <natspubsub/dlq.hpp>
#include <natspubsub/publisher.hpp>
#include <natspubsub/topology.hpp>

#include "support/eventually.hpp"
#include "support/nats_helpers.hpp"
#include "support/process.hpp"
#include "support/servers.hpp"

using namespace natspubsub;
using namespace std::chrono_literals;
using nlohmann::json;
using Clock = std::chrono::steady_clock;

namespace {

constexpr const char* kEvents = "test-orders-events";
constexpr const char* kDlq = "test-orders-dlq";
constexpr const char* kDurable = "test-orders-test_orders_order_created";

testing::DurableState consumer_state(testing::RawNats& raw, const std::string& durable = kDurable) {
  return raw.durable_state(kEvents, durable);
}

bool settled(testing::RawNats& raw) {
  auto s = consumer_state(raw);
  return s.ack_pending == 0 && s.pending == 0 && s.redelivered == 0;
}

std::map<std::string, std::string> headers_of(const testing::StoredMessage& m) { return {m.headers.begin(), m.headers.end()}; }

struct Fixture {
  testing::NatsServer server;
  Config config = testing::test_config(server.url(), "orders");
  Connection connection{config};
  Publisher publisher{connection};
  testing::RawNats raw{server.url()};

  Fixture() { Topology(connection).ensure_events_stream(); }

  // Dead letters by event id (x-dlq-context), as read straight from the DLQ stream.
  std::map<std::string, std::vector<testing::StoredMessage>> dead_letters() {
    std::map<std::string, std::vector<testing::StoredMessage>> out;
    std::vector<testing::StoredMessage> all;
    try {
      all = raw.read_stream(kDlq);
    } catch (const std::exception&) {
      return out;
    }
    for (auto& m : all) out[json::parse(headers_of(m)["x-dlq-context"])["event_id"].get<std::string>()].push_back(m);
    return out;
  }
  void delete_dlq_stream() {
    jsErrCode jerr = static_cast<jsErrCode>(0);
    REQUIRE(js_DeleteStream(raw.js(), kDlq, nullptr, &jerr) == NATS_OK);
  }
};

}  // namespace

TEST_CASE("DLQ stream gone for 30 s: every failing message stays owned, then reaches the DLQ once") {
  Fixture f;
  std::mutex mutex;
  std::map<std::string, int> calls;  // event id -> handler runs
  Consumer consumer(f.connection);   // ensures the DLQ stream (and the replay route)
  consumer.subscribe("order.created", [&](const Message& m) {
    {
      std::lock_guard lock(mutex);
      calls[m.envelope.event_id]++;
    }
    if (m.envelope.message.value("fail", false)) throw std::runtime_error("always fails");
  }, {.concurrency = 4, .max_attempts = 2, .backoff = Backoff::list({Millis{50}})});
  consumer.start();
  CHECK(consumer_state(f.raw).max_deliver == -1);  // the server never gives up first
  f.delete_dlq_stream();
  const auto outage_start = Clock::now();

  std::set<std::string> failing, good;
  for (int i = 0; i < 6; ++i) failing.insert(f.publisher.publish("order.created", {{"id", i}, {"fail", true}}).event_id);
  for (int i = 0; i < 2; ++i) good.insert(f.publisher.publish("order.created", {{"id", 100 + i}}).event_id);

  // Every failing message was decided and refused by the DLQ at least once.
  REQUIRE(testing::eventually([&] { return consumer.stats(kDurable).dlq_failures >= failing.size(); }, 10000ms));
  const auto refused_early = consumer.stats(kDurable).dlq_failures;
  std::this_thread::sleep_for(30s - (Clock::now() - outage_start));

  // After 30 s: the refusals went on (the server kept redelivering), nothing was dropped, and the
  // handler did not run again. The failing messages are still pending on the source consumer.
  auto during = consumer.stats(kDurable);
  CHECK(during.dead_lettered == 0);
  CHECK(during.dlq_failures > refused_early + 100);
  CHECK(during.acked == good.size());
  const auto owned = consumer_state(f.raw);
  CHECK(owned.pending == 0);
  CHECK(owned.ack_pending == failing.size());
  MESSAGE("after 30 s of outage: " << during.dlq_failures << " refused dead letters, " << owned.ack_pending
                                    << " messages held, " << owned.redelivered << " of them redelivered");

  Topology(f.connection).ensure_dlq_stream();
  REQUIRE(testing::eventually([&] { return f.dead_letters().size() == failing.size(); }, 10000ms));
  REQUIRE(testing::eventually([&] { return settled(f.raw); }, 5000ms));
  std::this_thread::sleep_for(500ms);  // ten backoff periods: no second letter arrives late

  auto letters = f.dead_letters();
  CHECK(letters.size() == failing.size());
  for (const auto& id : failing) {
    CAPTURE(id);
    REQUIRE(letters.count(id) == 1);
    CHECK(letters[id].size() == 1);
    CHECK(headers_of(letters[id][0])["x-dlq-reason"] == "attempts_exhausted");
  }
  const auto after = consumer_state(f.raw);
  CHECK(after.ack_pending == 0);
  CHECK(after.pending == 0);
  CHECK(after.redelivered == 0);
  auto st = consumer.stats(kDurable);
  CHECK(st.dead_lettered == failing.size());
  CHECK(st.acked == good.size());
  std::lock_guard lock(mutex);
  for (const auto& id : failing) CHECK(calls[id] == 2);  // max_attempts, never more
  for (const auto& id : good) CHECK(calls[id] == 1);
}

TEST_CASE("a durable made with a finite MaxDeliver (earlier versions) is made unlimited in place by start()") {
  Fixture f;
  auto spec = Topology::consumer_spec(f.config, "test.orders.order.created");
  spec.max_deliver = f.config.consumer.max_attempts + 2;  // what earlier versions set
  (void)Topology(f.connection).ensure_consumer(spec);
  REQUIRE(consumer_state(f.raw).max_deliver == f.config.consumer.max_attempts + 2);

  std::atomic<int> calls{0};
  Consumer consumer(f.connection);
  consumer.subscribe("order.created", [&](const Message&) { calls++; });
  consumer.start();
  CHECK(consumer_state(f.raw).max_deliver == -1);
  f.publisher.publish("order.created", {{"id", 1}});
  REQUIRE(testing::eventually([&] { return consumer.stats(kDurable).acked == 1; }, 5000ms));
  CHECK(calls == 1);
}

TEST_CASE("a finite max_deliver: the server's advisory still dead-letters what it gave up on") {
  Fixture f;
  std::atomic<int> calls{0};
  // No DLQ stream at first. Delivery 1 fails (the last attempt) and is refused by the DLQ,
  // delivery 2 is refused again, then the server stops at max_deliver 2: only its advisory is left.
  Consumer consumer(f.connection, ConsumerOptions{.ensure_topology = false, .replay_route = false});
  consumer.subscribe("order.created", [&](const Message&) {
    calls++;
    throw std::runtime_error("fails");
  }, {.max_attempts = 1, .backoff = Backoff::list({Millis{50}}), .max_deliver = 2});
  consumer.start();
  auto r = f.publisher.publish("order.created", {{"id", 1}});
  REQUIRE(testing::eventually([&] { return consumer.stats(kDurable).dlq_failures >= 2; }, 5000ms));
  std::this_thread::sleep_for(300ms);  // the advisory's publish tries have started
  Topology(f.connection).ensure_dlq_stream();
  REQUIRE(testing::eventually([&] { return f.dead_letters().size() == 1; }, 5000ms));
  auto letter = f.dead_letters().at(r.event_id).at(0);
  CHECK(headers_of(letter)["x-dlq-reason"] == "max_deliveries");
  CHECK(calls == 1);
  CHECK(consumer.stats(kDurable).max_deliveries == 1);
}

TEST_CASE("crash loop: a handler that aborts the process on one message; after max_attempts crashes it is in the DLQ") {
  Fixture f;
  constexpr int kMaxAttempts = 4;
  testing::TempDir dir("crash_loop");
  const auto processed_file = dir.path() / "processed.txt";
  const auto log_file = dir.path() / "consumer.log";

  std::set<std::string> good;
  std::string poison;
  for (int i = 0; i < 6; ++i) {
    const bool crash = i == 2;
    auto r = f.publisher.publish("order.created", {{"id", i}, {"crash", crash}});
    if (crash) poison = r.event_id;
    else good.insert(r.event_id);
  }
  auto processed = [&] {
    std::set<std::string> ids;
    std::ifstream in(processed_file);
    for (std::string line; std::getline(in, line);) ids.insert(line);
    return ids;
  };
  auto done = [&] {
    return f.dead_letters().count(poison) == 1 && processed() == good && settled(f.raw);
  };

  testing::detail::ChildProcess child;
  int starts = 0, crashes = 0;
  std::vector<std::string> exits;
  const auto until = Clock::now() + 60s;
  while (Clock::now() < until && !done()) {
    if (!child.running()) {
      if (starts > 0) {
        exits.push_back(child.last_exit());
        if (child.last_exit().find("SIGABRT") != std::string::npos) crashes++;
      }
      REQUIRE(starts <= kMaxAttempts);  // the first start and at most 4 restarts
      child.spawn({.argv = {CRASH_LOOP_CONSUMER, f.server.url(), processed_file.string(), std::to_string(kMaxAttempts)},
                   .log_file = log_file,
                   .working_dir = dir.path(),
                   .run_as = std::nullopt});
      starts++;
    }
    std::this_thread::sleep_for(20ms);
  }
  const bool finished = done();
  const bool still_running = child.running();
  child.stop(SIGTERM, 10000ms);
  INFO("exits: " << nlohmann::json(exits).dump() << "; consumer log:\n" << testing::detail::file_tail(log_file, 3000));
  REQUIRE(finished);
  CHECK(still_running);               // the last process survived: the poison never ran again
  CHECK(crashes == kMaxAttempts);     // one crash per attempt
  CHECK(starts == kMaxAttempts + 1);  // restarted 4 times
  CHECK(child.last_exit() == "exited with status 0");

  auto letters = f.dead_letters();
  CHECK(letters.size() == 1);
  auto h = headers_of(letters.at(poison).at(0));
  CHECK(h["x-dlq-reason"] == "max_deliveries");
  CHECK(h["x-deliveries"] == std::to_string(kMaxAttempts + 1));
  auto ctx = json::parse(h["x-dlq-context"]);
  CHECK(ctx["error_message"].get<std::string>().find("never gave a verdict") != std::string::npos);
  CHECK(processed() == good);
}
