// ctest-labels: integration
// The progress ticker (src/progress_ticker.hpp) alone against a real nats-server: it keeps the
// outstanding deliveries of a bound subscription from being redelivered past ack_wait, lets one
// go after max_in_progress, and counts unanswered acks as failed.
#include <chrono>
#include <memory>
#include <thread>

#include <doctest/doctest.h>
#include <nats/nats.h>

#include <natspubsub/connection.hpp>
#include <natspubsub/dlq.hpp>
#include <natspubsub/middleware.hpp>
#include <natspubsub/topology.hpp>

#include "progress_ticker.hpp"
#include "subscription.hpp"
#include "support/eventually.hpp"
#include "support/nats_helpers.hpp"
#include "support/pull_consumer.hpp"
#include "support/servers.hpp"

using namespace natspubsub;
using namespace std::chrono_literals;
using detail::Delivery;
using detail::ProgressTicker;
using detail::Subscription;
using Clock = std::chrono::steady_clock;

namespace {

constexpr const char* kEvents = "test-orders-events";
constexpr const char* kDurable = "ticked";

struct Fixture {
  testing::NatsServer server;
  testing::RawNats raw{server.url()};
  Connection connection{testing::test_config(server.url(), "orders")};
  DlqPublisher dlq{connection};
  std::unique_ptr<testing::PullConsumer> pull;  // the durable, and the fetches of this test
  ProgressTicker::Subscriptions subs;

  explicit Fixture(Millis ack_wait) {
    raw.add_stream(kEvents, {"test.orders.>"});
    Topology(connection).ensure_dlq_stream();
    pull = std::make_unique<testing::PullConsumer>(raw, kEvents, kDurable, "test.orders.>",
                                                   testing::PullConsumer::Options{.ack_wait = ack_wait});
  }

  // A bound subscription that is not started: its queue holds what the test puts there.
  Subscription& add(Millis in_progress_interval, Millis max_in_progress, Millis ack_timeout = Millis{5000}) {
    auto s = std::make_unique<Subscription>();
    s->filter = "test.orders.>";
    s->durable = kDurable;
    s->stream = kEvents;
    s->concurrency = 10;
    s->backoff = Backoff::list({Millis{50}});
    s->in_progress_interval = in_progress_interval;
    s->max_in_progress = max_in_progress;
    s->fetch_timeout = Millis{500};
    s->max_deliver = -1;
    s->chain = compose({}, [](const Message&) {});
    s->bind(connection, dlq, ack_timeout, false);
    subs.push_back(std::move(s));
    return *subs.back();
  }

  std::shared_ptr<Delivery> fetch() {
    natsMsg* msg = pull->fetch_one(5s);
    REQUIRE(msg != nullptr);
    return std::make_shared<Delivery>(detail::MsgPtr(msg), Clock::now());
  }
};


}  // namespace

TEST_CASE("the tick: a quarter of the shortest in_progress_interval, between 5 ms and 1 s") {
  ProgressTicker::Subscriptions subs;
  subs.push_back(std::make_unique<Subscription>());
  subs.back()->in_progress_interval = Millis{2000};
  CHECK(ProgressTicker::tick_for(subs) == Millis{500});
  subs.push_back(std::make_unique<Subscription>());
  subs.back()->in_progress_interval = Millis{400};
  CHECK(ProgressTicker::tick_for(subs) == Millis{100});
  subs.push_back(std::make_unique<Subscription>());
  subs.back()->in_progress_interval = Millis{8};
  CHECK(ProgressTicker::tick_for(subs) == Millis{5});
  ProgressTicker::Subscriptions slow;
  slow.push_back(std::make_unique<Subscription>());
  slow.back()->in_progress_interval = Millis{60000};
  CHECK(ProgressTicker::tick_for(slow) == Millis{1000});
}

TEST_CASE("outstanding deliveries are kept past ack_wait; one past max_in_progress is let go") {
  Fixture f(Millis{600});
  auto& s = f.add(Millis{200}, Millis{1500});
  f.pull->publish("test.orders.a", "a");
  f.pull->publish("test.orders.b", "b");
  auto held = f.fetch();
  auto second = f.fetch();
  s.queue->push({held, second});
  ProgressTicker ticker(f.subs);
  CHECK(ticker.tick() == Millis{50});
  // Two ack waits later nothing was redelivered.
  std::this_thread::sleep_for(1200ms);
  CHECK(f.raw.durable_state(kEvents, kDurable).redelivered == 0);
  CHECK(f.pull->fetch_one(100ms) == nullptr);
  // Past max_in_progress the signals stop, and the server redelivers both after ack_wait.
  auto back = f.pull->fetch(2, 3s);
  if (back.size() < 2) {
    auto more = f.pull->fetch(2, 3s);
    back.insert(back.end(), more.begin(), more.end());
  }
  CHECK(back.size() == 2);
  for (auto* m : back) {
    CHECK(testing::deliveries_of(m) == 2);
    natsMsg_Destroy(m);
  }
  CHECK(Clock::now() - held->fetched_at >= 1500ms);
}

TEST_CASE("acks left unanswered past the ack timeout are counted as failed") {
  Fixture f(Millis{30000});
  auto& s = f.add(Millis{10000}, Millis{600000}, Millis{300});
  f.pull->publish("test.orders.a", "a");
  auto d = f.fetch();
  s.acks->close();  // no answer will be read
  s.acks->ack(*d, "event-1", 1);
  CHECK(s.acks->pending() == 1);
  ProgressTicker ticker(f.subs);
  CHECK(testing::eventually([&] { return s.acks->failed() == 1; }, 5s));
  CHECK(s.acks->pending() == 0);
  CHECK(s.acks->confirmed() == 0);
}
