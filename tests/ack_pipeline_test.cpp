// ctest-labels: integration
// The ack pipeline (src/ack_pipeline.hpp) alone against a real nats-server: acks go out without
// waiting, the server's answers count as confirmed, and acks nobody answers count as failed.
#include <chrono>
#include <memory>
#include <string>
#include <vector>

#include <doctest/doctest.h>
#include <nats/nats.h>

#include <natspubsub/connection.hpp>

#include "ack_pipeline.hpp"
#include "support/eventually.hpp"
#include "support/nats_helpers.hpp"
#include "support/pull_consumer.hpp"
#include "support/servers.hpp"

using namespace natspubsub;
using namespace std::chrono_literals;
using detail::AckPipeline;
using detail::AckTracker;
using detail::Delivery;
using detail::DeliveryState;
using Clock = std::chrono::steady_clock;

namespace {

constexpr const char* kStream = "ACKS";
constexpr const char* kDurable = "acks";

struct Fixture {
  testing::NatsServer server;
  testing::RawNats raw{server.url()};
  Connection connection{testing::test_config(server.url(), "acks")};
  std::unique_ptr<testing::PullConsumer> pull;

  explicit Fixture(testing::PullConsumer::Options options = {}) {
    raw.add_stream(kStream, {"a.>"});
    pull = std::make_unique<testing::PullConsumer>(raw, kStream, kDurable, "a.>", options);
  }

  std::vector<std::unique_ptr<Delivery>> fetch(int n) {
    std::vector<std::unique_ptr<Delivery>> out;
    for (int tries = 0; tries < 20 && static_cast<int>(out.size()) < n; ++tries) {
      for (auto* msg : pull->fetch(n - static_cast<int>(out.size()), 2s))
        out.push_back(std::make_unique<Delivery>(detail::MsgPtr(msg), Clock::now()));
    }
    REQUIRE(static_cast<int>(out.size()) == n);
    return out;
  }
};

}  // namespace

TEST_CASE("acks are confirmed by the server's answers, and the server moves its ack floor") {
  Fixture f;
  for (int i = 0; i < 20; ++i) f.pull->publish("a.x", "m" + std::to_string(i));
  auto deliveries = f.fetch(20);
  AckPipeline acks(f.connection, kDurable, 5000ms);
  for (size_t i = 0; i < deliveries.size(); ++i) acks.ack(*deliveries[i], "event-" + std::to_string(i), i + 1);
  for (auto& d : deliveries) CHECK(d->state() == DeliveryState::acked);
  CHECK(acks.wait_all(Clock::now() + 5s));
  // Every answer is counted before wait_all() returns (stop() and stats() rely on it).
  CHECK(acks.confirmed() == 20);
  CHECK(acks.failed() == 0);
  CHECK(acks.pending() == 0);
  CHECK(testing::eventually([&] { return f.raw.durable_state(kStream, kDurable).ack_floor == 20; }));
  CHECK(f.raw.durable_state(kStream, kDurable).ack_pending == 0);
  // A delivery already settled is not acked again and registers nothing.
  acks.ack(*deliveries[0], "event-0", 1);
  CHECK(acks.pending() == 0);
  CHECK(acks.confirmed() == 20);
}

TEST_CASE("an ack for a consumer that is gone is answered by no responders: a failure") {
  Fixture f;
  f.pull->publish("a.x", "m");
  auto deliveries = f.fetch(1);
  REQUIRE(js_DeleteConsumer(f.raw.js(), kStream, kDurable, nullptr, nullptr) == NATS_OK);
  AckPipeline acks(f.connection, kDurable, 5000ms);
  acks.ack(*deliveries[0], "event-gone", 1);
  CHECK(acks.wait_all(Clock::now() + 5s));
  CHECK(acks.failed() == 1);
  CHECK(acks.confirmed() == 0);
}

TEST_CASE("acks unanswered past their deadline expire as failures; a late answer is ignored") {
  AckTracker tracker("acks", "_INBOX.test", 200ms);
  const auto first = tracker.add("e1", 1);
  const auto second = tracker.add("e2", 2);
  CHECK(first != second);
  CHECK(first.rfind("_INBOX.test.", 0) == 0);
  CHECK(tracker.pending() == 2);
  tracker.expire(Clock::now(), false);  // not yet due
  CHECK(tracker.pending() == 2);
  CHECK_FALSE(tracker.wait_all(Clock::now() + 50ms));
  tracker.settle(second.c_str(), true, "");
  CHECK(tracker.confirmed() == 1);
  tracker.expire(Clock::now() + 300ms, false);
  CHECK(tracker.pending() == 0);
  CHECK(tracker.failed() == 1);
  CHECK(tracker.wait_all(Clock::now()));
  tracker.settle(first.c_str(), true, "");  // too late: already counted as failed
  CHECK(tracker.confirmed() == 1);
  tracker.add("e3", 3);
  tracker.expire(Clock::now(), true);  // all of them, due or not
  CHECK(tracker.failed() == 2);
  // Subjects outside the inbox are ignored.
  tracker.settle("_INBOX.test", true, "");
  tracker.settle(nullptr, true, "");
  CHECK(tracker.confirmed() == 1);
}

TEST_CASE("close() stops the answers: what is still pending is counted by expire()") {
  Fixture f;
  f.pull->publish("a.x", "m");
  auto deliveries = f.fetch(1);
  AckPipeline acks(f.connection, kDurable, 5000ms);
  acks.close();
  acks.ack(*deliveries[0], "event-closed", 1);
  // The server takes the ack (the ack floor moves) but its answer has no listener.
  CHECK(testing::eventually([&] { return f.raw.durable_state(kStream, kDurable).ack_floor == 1; }));
  CHECK(acks.pending() == 1);
  CHECK(acks.confirmed() == 0);
  acks.expire(Clock::now(), true);
  CHECK(acks.failed() == 1);
  CHECK(acks.pending() == 0);
}
