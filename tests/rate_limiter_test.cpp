// ctest-labels: integration
#include <atomic>
#include <mutex>
#include <stop_token>
#include <thread>
#include <vector>

#include <doctest/doctest.h>

#include <natspubsub/connection.hpp>
#include <natspubsub/consumer.hpp>
#include <natspubsub/error.hpp>
#include <natspubsub/publisher.hpp>
#include <natspubsub/rate_limiter.hpp>
#include <natspubsub/topology.hpp>

#include "support/nats_helpers.hpp"
#include "support/servers.hpp"

using namespace natspubsub;
using namespace std::chrono_literals;
using Clock = std::chrono::steady_clock;

TEST_CASE("a rate of R per second holds within 10% over a few seconds, across threads") {
  constexpr double kRate = 200;
  RateLimiter limiter({.rate = kRate, .burst = 10});
  std::atomic<int> taken{0};
  const auto start = Clock::now();
  const auto end = start + 2500ms;
  {
    std::vector<std::jthread> threads;
    for (int t = 0; t < 3; ++t)
      threads.emplace_back([&] {
        while (Clock::now() < end)
          if (limiter.acquire(1, Millis{50})) taken++;
      });
  }
  const double seconds = std::chrono::duration<double>(Clock::now() - start).count();
  const double expected = kRate * seconds + 10;  // the bucket starts full
  MESSAGE("took " << taken.load() << " in " << seconds << " s; expected about " << expected);
  CHECK(taken >= expected * 0.9);
  CHECK(taken <= expected * 1.1);
  CHECK(limiter.stats().acquired == static_cast<uint64_t>(taken.load()));
  CHECK(limiter.stats().waits > 0);
}

TEST_CASE("try_acquire, acquire_up_to, release and wait_time") {
  RateLimiter limiter({.rate = 10, .burst = 5});
  CHECK(limiter.options().burst == 5);
  CHECK(limiter.try_acquire(3));
  CHECK_FALSE(limiter.try_acquire(3));  // 2 left
  CHECK(limiter.acquire_up_to(10) == 2);
  CHECK(limiter.acquire_up_to(10) == 0);
  const auto wait = limiter.wait_time(1);
  CHECK(wait > Millis{50});
  CHECK(wait <= Millis{100});
  limiter.release(4);  // a fetch brought back fewer messages than tokens taken
  CHECK(limiter.acquire_up_to(10) == 4);
  CHECK(limiter.stats().acquired == 5);
  limiter.release(100);  // never more than the burst
  CHECK(limiter.stats().available <= 5.0 + 1e-9);
}

TEST_CASE("acquire waits for tokens, gives up at max_wait or on stop, and refuses more than the burst") {
  RateLimiter limiter({.rate = 20, .burst = 1});
  REQUIRE(limiter.try_acquire(1));
  auto t0 = Clock::now();
  CHECK(limiter.acquire(1, Millis{1000}));  // the next token comes after 50 ms
  auto waited = Clock::now() - t0;
  CHECK(waited >= 40ms);
  CHECK(waited < 200ms);

  t0 = Clock::now();
  CHECK_FALSE(limiter.acquire(1, Millis{10}));
  CHECK(Clock::now() - t0 < 40ms);

  RateLimiter slow({.rate = 0.5, .burst = 1});
  REQUIRE(slow.try_acquire(1));
  std::stop_source stop;
  std::jthread stopper([&] {
    std::this_thread::sleep_for(50ms);
    stop.request_stop();
  });
  t0 = Clock::now();
  CHECK_FALSE(slow.acquire(1, Millis{5000}, stop.get_token()));
  CHECK(Clock::now() - t0 < 1000ms);

  CHECK_FALSE(limiter.acquire(2, Millis{5000}));  // burst 1: two at once can never be had
}

TEST_CASE("default burst and option checks") {
  CHECK(RateLimiter({.rate = 100}).options().burst == 10);
  CHECK(RateLimiter({.rate = 3}).options().burst == 1);
  CHECK_THROWS_AS(RateLimiter({.rate = 0}), ConfigError);
  CHECK_THROWS_AS(RateLimiter({.rate = -5}), ConfigError);
  CHECK_THROWS_AS(RateLimiter({.rate = 10, .burst = 0.5}), ConfigError);
  try {
    RateLimiter bad({.rate = 10, .burst = -1});
    FAIL("negative burst accepted");
  } catch (const ConfigError& e) {
    CHECK(e.field() == "rate_limit.burst");
  }
}

TEST_CASE("consumer: a rate limit of R msgs/s holds within 10% over a few seconds, applied to fetching") {
  testing::NatsServer server;
  Connection nats(testing::test_config(server.url(), "orders"));
  Topology(nats).ensure_events_stream();
  Publisher publisher(nats);
  std::vector<OutgoingEvent> batch(400, OutgoingEvent{"order.created", {{"n", 1}}, {}});
  for (const auto& r : publisher.publish_batch(batch)) REQUIRE(r);

  constexpr double kRate = 40;
  std::mutex m;
  std::vector<Clock::time_point> handled;
  Consumer consumer(nats);
  consumer.subscribe("order.created", [&](const Message&) {
    std::lock_guard lock(m);
    handled.push_back(Clock::now());
  }, {.concurrency = 8, .rate_limit = RateLimiterOptions{.rate = kRate}});
  consumer.start();
  // The first messages come with the bucket's burst; measure the steady rate after them, over
  // 120 messages (3 s at 40/s).
  constexpr size_t kFrom = 10;
  constexpr size_t kTo = kFrom + 120;
  const auto deadline = Clock::now() + 10s;
  while (Clock::now() < deadline) {
    {
      std::lock_guard lock(m);
      if (handled.size() > kTo) break;
    }
    std::this_thread::sleep_for(20ms);
  }
  auto stats = consumer.stats()[0];
  consumer.stop(Millis{5000});
  std::lock_guard lock(m);
  REQUIRE(handled.size() > kTo);
  const double seconds = std::chrono::duration<double>(handled[kTo] - handled[kFrom]).count();
  const double rate = static_cast<double>(kTo - kFrom) / seconds;
  MESSAGE("measured " << rate << " msgs/s over " << seconds << " s (limit " << kRate << ")");
  CHECK(rate >= kRate * 0.9);
  CHECK(rate <= kRate * 1.1);
  // Fetched no faster than the limit either: messages were not fetched early and left waiting.
  CHECK(stats.received <= handled.size() + 8);
  REQUIRE(stats.rate_limit.has_value());
  CHECK(stats.rate_limit->rate == kRate);
  CHECK(stats.rate_limit->burst == 4);
  CHECK_FALSE(stats.circuit.has_value());
}

TEST_CASE("consumer: a bad rate limit is a ConfigError naming the subscription") {
  testing::NatsServer server;
  Connection nats(testing::test_config(server.url(), "orders"));
  Consumer consumer(nats);
  consumer.subscribe("order.created", [](const Message&) {}, {.rate_limit = RateLimiterOptions{.rate = 0}});
  try {
    consumer.start();
    FAIL("a zero rate was accepted");
  } catch (const ConfigError& e) {
    CHECK(e.field().find("order.created") != std::string::npos);
    CHECK(e.field().find("rate_limit.rate") != std::string::npos);
  }
}
