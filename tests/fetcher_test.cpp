// ctest-labels: integration
// The fetcher and its flow control (src/fetcher.hpp, src/delivery_queue.hpp) alone against a real
// nats-server: never more deliveries held than the queue's capacity, a lone message is not held
// back, stop ends a waiting pull, an open circuit and a rate limit hold fetching back.
#include <algorithm>
#include <atomic>
#include <chrono>
#include <memory>
#include <stop_token>
#include <string>
#include <thread>

#include <doctest/doctest.h>
#include <nats/nats.h>

#include <natspubsub/circuit_breaker.hpp>
#include <natspubsub/rate_limiter.hpp>

#include "delivery_queue.hpp"
#include "fetcher.hpp"
#include "support/eventually.hpp"
#include "support/nats_helpers.hpp"
#include "support/pull_consumer.hpp"
#include "support/servers.hpp"

using namespace natspubsub;
using namespace std::chrono_literals;
using detail::Delivery;
using detail::DeliveryPtr;
using detail::DeliveryQueue;
using detail::Fetcher;
using Clock = std::chrono::steady_clock;

namespace {

constexpr const char* kStream = "FETCH";
constexpr const char* kDurable = "fetch";

struct Fixture {
  testing::NatsServer server;
  testing::RawNats raw{server.url()};
  std::unique_ptr<testing::PullConsumer> pull;

  Fixture() {
    raw.add_stream(kStream, {"f.>"});
    pull = std::make_unique<testing::PullConsumer>(raw, kStream, kDurable, "f.>");
  }
  void publish(int n) {
    for (int i = 0; i < n; ++i) pull->publish("f.x", "m" + std::to_string(i));
  }
};

// A delivery around a core NATS message, for the queue alone.
DeliveryPtr core_delivery() {
  REQUIRE(nats_Open(-1) == NATS_OK);  // cnats' library state, which natsMsg_Destroy uses
  natsMsg* msg = nullptr;
  REQUIRE(natsMsg_Create(&msg, "core.x", nullptr, "x", 1) == NATS_OK);
  return std::make_shared<Delivery>(detail::MsgPtr(msg), Clock::now());
}

// Takes and TERMs deliveries until stopped: a worker that finishes at once.
class Drainer {
 public:
  explicit Drainer(DeliveryQueue& queue)
      : thread_([&queue](std::stop_token st) {
          while (!st.stop_requested()) {
            auto d = queue.take(st, Millis{50});
            if (!d) continue;
            d->term();
            queue.finish(d);
          }
        }) {}

 private:
  std::jthread thread_;
};

void stop(Fetcher& fetcher, DeliveryQueue& queue) {
  fetcher.request_stop();
  queue.wake_all();
  fetcher.join();
}

}  // namespace

TEST_CASE("the queue: fetch order, running counts, close, hand-back of the unstarted, wait for room") {
  DeliveryQueue queue(4);
  std::stop_source never;
  const auto st = never.get_token();
  CHECK(queue.wait_for_room(st, 1s) == 4);  // empty: a pull is worth making at once
  auto a = core_delivery(), b = core_delivery(), c = core_delivery();
  queue.push({a, b, c});
  CHECK(queue.counts().outstanding == 3);
  CHECK(queue.counts().running == 0);

  // One slot free and deliveries waiting for a worker: no pull is worth making yet, so the wait
  // runs to its end, and the free slot is reported then.
  auto waited_from = Clock::now();
  CHECK(queue.wait_for_room(st, 150ms) == 1);
  CHECK(Clock::now() - waited_from >= 120ms);

  CHECK(queue.take(st, 1s) == a);
  CHECK(queue.counts().running == 1);
  // Half the slots free: the wait ends at once.
  std::jthread finisher([&] {
    std::this_thread::sleep_for(50ms);
    queue.finish(a);
  });
  waited_from = Clock::now();
  CHECK(queue.wait_for_room(st, 5s) == 2);
  CHECK(Clock::now() - waited_from < 2s);
  finisher.join();

  CHECK(queue.take(st, 1s) == b);
  queue.close();
  CHECK(queue.take(st, 100ms) == nullptr);  // closed: c stays queued
  uint64_t running = 0;
  auto unstarted = queue.take_unstarted(running);
  REQUIRE(unstarted.size() == 1);
  CHECK(unstarted.front() == c);
  CHECK(running == 1);
  CHECK(queue.counts().outstanding == 1);
  CHECK(queue.outstanding().front() == b);
  CHECK_FALSE(queue.wait_idle(Clock::now() + 50ms));
  queue.finish(b);
  CHECK(queue.wait_idle(Clock::now() + 50ms));
  CHECK(queue.counts().outstanding == 0);

  // A stop request ends take() without a delivery.
  DeliveryQueue other(2);
  std::stop_source stopping;
  stopping.request_stop();
  other.push({core_delivery()});
  CHECK(other.take(stopping.get_token(), 1s) == nullptr);
}

TEST_CASE("the fetcher never holds more than the queue's capacity, and refills as workers finish") {
  Fixture f;
  f.publish(20);
  DeliveryQueue queue(4);
  Fetcher fetcher(f.pull->subscription(), queue, {.durable = kDurable, .fetch_timeout = 500ms});
  fetcher.start();
  CHECK(testing::eventually([&] { return queue.counts().outstanding == 4; }, 5s));
  size_t most = 0;
  for (auto until = Clock::now() + 500ms; Clock::now() < until; std::this_thread::sleep_for(5ms))
    most = std::max(most, queue.counts().outstanding);
  CHECK(most == 4);
  CHECK(fetcher.received() == 4);

  std::stop_source never;
  for (int i = 0; i < 20; ++i) {
    auto d = queue.take(never.get_token(), 5s);
    REQUIRE(d);
    CHECK(queue.counts().outstanding <= 4);
    d->term();
    queue.finish(d);
  }
  CHECK(fetcher.received() == 20);
  CHECK(testing::eventually([&] { return f.raw.durable_state(kStream, kDurable).ack_pending == 0; }));
  stop(fetcher, queue);
}

TEST_CASE("a lone message is not held back for a full batch, and stop ends a waiting pull") {
  Fixture f;
  DeliveryQueue queue(10);
  Fetcher fetcher(f.pull->subscription(), queue, {.durable = kDurable, .fetch_timeout = 3000ms});
  fetcher.start();
  std::this_thread::sleep_for(300ms);  // a pull is waiting now
  const auto published_at = Clock::now();
  f.publish(1);
  CHECK(testing::eventually([&] { return queue.counts().outstanding == 1; }, 5s));
  CHECK(Clock::now() - published_at < 2s);
  const auto stopping_at = Clock::now();
  stop(fetcher, queue);
  CHECK(Clock::now() - stopping_at < 4s);  // bounded by fetch_timeout
  CHECK(fetcher.received() == 1);
}

TEST_CASE("an open circuit fetches nothing until it may probe") {
  Fixture f;
  f.publish(3);
  auto breaker = std::make_shared<CircuitBreaker>(
      CircuitBreakerOptions{.name = "fetch", .failure_threshold = 1, .open_duration = Millis{1000}});
  breaker->record_failure("down");
  REQUIRE(breaker->state() == CircuitState::open);
  DeliveryQueue queue(10);
  Fetcher fetcher(f.pull->subscription(), queue, {.durable = kDurable, .fetch_timeout = 500ms, .breaker = breaker});
  fetcher.start();
  std::this_thread::sleep_for(500ms);
  CHECK(fetcher.received() == 0);
  // Past open_duration the circuit is half-open: the fetcher pulls again (probes only).
  CHECK(testing::eventually([&] { return fetcher.received() >= 1; }, 5s));
  stop(fetcher, queue);
}

TEST_CASE("a rate limit: no more than the burst and the rate per second are fetched") {
  Fixture f;
  f.publish(60);
  RateLimiter limiter(RateLimiterOptions{.rate = 10, .burst = 2});
  DeliveryQueue queue(60);
  Fetcher fetcher(f.pull->subscription(), queue, {.durable = kDurable, .fetch_timeout = 500ms, .limiter = &limiter});
  Drainer drainer(queue);
  const auto started = Clock::now();
  fetcher.start();
  std::this_thread::sleep_for(1000ms);
  const auto received = fetcher.received();
  const double seconds = std::chrono::duration<double>(Clock::now() - started).count();
  CHECK(received >= 5);
  CHECK(static_cast<double>(received) <= 2 + 10 * seconds + 1);
  stop(fetcher, queue);
}
