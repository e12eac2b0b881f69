// Pure: no server. The retry schedule and the latency histogram behind the consumer's stats.
#include <doctest/doctest.h>

#include <natspubsub/backoff.hpp>
#include <natspubsub/error.hpp>
#include <natspubsub/stats.hpp>

using namespace natspubsub;

TEST_CASE("list: one delay per attempt, the last one repeats") {
  auto b = Backoff::list({Millis{50}, Millis{100}, Millis{200}});
  CHECK(b.delay(1) == Millis{50});
  CHECK(b.delay(2) == Millis{100});
  CHECK(b.delay(3) == Millis{200});
  CHECK(b.delay(4) == Millis{200});
  CHECK(b.delay(1000000) == Millis{200});
  CHECK(b.delay(0) == Millis{50});  // a zero delivery count is treated as the first attempt
  CHECK(b.max_delay(2) == Millis{100});
  CHECK(b.describe() == "list [50ms, 100ms, 200ms]");
}

TEST_CASE("exponential: grows by the multiplier, stops at the cap") {
  auto b = Backoff::exponential(Millis{100}, Millis{1000}, 2.0, 0.0);
  CHECK(b.delay(1) == Millis{100});
  CHECK(b.delay(2) == Millis{200});
  CHECK(b.delay(3) == Millis{400});
  CHECK(b.delay(4) == Millis{800});
  CHECK(b.delay(5) == Millis{1000});
  CHECK(b.delay(60) == Millis{1000});
  CHECK(b.delay(UINT64_MAX) == Millis{1000});  // no overflow after days of redelivery
  auto slow = Backoff::exponential(Millis{1000}, Millis{60000}, 1.5, 0.0);
  CHECK(slow.delay(2) == Millis{1500});
  CHECK(slow.delay(3) == Millis{2250});
}

TEST_CASE("jitter only adds: never below the base, never above base * (1 + jitter)") {
  auto b = Backoff::exponential(Millis{100}, Millis{1000}, 2.0, 0.5);
  CHECK(b.delay(2, 0.0) == Millis{200});
  CHECK(b.delay(2, 0.5) == Millis{250});
  CHECK(b.delay(2, 0.999) == Millis{299});
  CHECK(b.delay(9, 0.999) == Millis{1499});  // jitter is on top of the capped base
  CHECK(b.base_delay(9) == Millis{1000});
  CHECK(b.max_delay(9) == Millis{1500});
  bool varied = false;
  Millis first = b.delay(3);
  for (int i = 0; i < 2000; ++i) {
    auto d = b.delay(3);
    CHECK(d >= Millis{400});
    CHECK(d <= Millis{600});
    varied = varied || d != first;
  }
  CHECK(varied);  // the random part is really random
}

TEST_CASE("invalid schedules are configuration errors") {
  CHECK_THROWS_AS((void)Backoff::list({}), ConfigError);
  CHECK_THROWS_AS((void)Backoff::list({Millis{10}, Millis{0}}), ConfigError);
  CHECK_THROWS_AS((void)Backoff::exponential(Millis{0}, Millis{10}), ConfigError);
  CHECK_THROWS_AS((void)Backoff::exponential(Millis{100}, Millis{50}), ConfigError);
  CHECK_THROWS_AS((void)Backoff::exponential(Millis{100}, Millis{500}, 0.5), ConfigError);
  CHECK_THROWS_AS((void)Backoff::exponential(Millis{100}, Millis{500}, 2.0, 1.5), ConfigError);
  try {
    (void)Backoff::list({Millis{10}, Millis{-5}});
    FAIL("negative delay accepted");
  } catch (const ConfigError& e) {
    CHECK(e.field() == "backoff[1]");
  }
}

TEST_CASE("latency histogram: counts, mean, max and bucket quantiles") {
  LatencyHistogram h;
  CHECK(h.snapshot().count == 0);
  CHECK(h.snapshot().quantile(0.5) == Micros{0});
  for (int i = 0; i < 90; ++i) h.record(Micros{800});     // bucket <= 1 ms
  for (int i = 0; i < 9; ++i) h.record(Micros{40000});    // bucket <= 50 ms
  h.record(Micros{400000000});                            // past the last bound
  auto s = h.snapshot();
  CHECK(s.count == 100);
  CHECK(s.max == Micros{400000000});
  CHECK(s.sum == Micros{90 * 800 + 9 * 40000 + 400000000});
  CHECK(s.mean() == Micros{(90 * 800 + 9 * 40000 + 400000000) / 100});
  CHECK(s.quantile(0.5) == Micros{1000});
  CHECK(s.quantile(0.9) == Micros{1000});
  CHECK(s.quantile(0.95) == Micros{50000});
  CHECK(s.quantile(1.0) == Micros{400000000});
  CHECK(s.buckets.size() == LatencyHistogram::kUpperBoundsMicros.size() + 1);
  CHECK(s.buckets.back().count == 1);
}
