// A consumer whose dependency goes down: the circuit breaker opens, the subscription stops
// fetching and its messages wait (no attempt spent, nothing in the DLQ); when the dependency is
// back the circuit closes and every order is charged once. A rate limit keeps the calls to the
// payment gateway under 20 per second. Run a nats-server with JetStream and:
//   NATS_URL=nats://127.0.0.1:4222 ./build/examples/circuit_breaker_example
// It publishes ten orders, keeps the "gateway" down for two seconds, and exits once all are charged.
#include <natspubsub/circuit_breaker.hpp>
#include <natspubsub/connection.hpp>
#include <natspubsub/consumer.hpp>
#include <natspubsub/error.hpp>
#include <natspubsub/publisher.hpp>
#include <natspubsub/topology.hpp>

#include <atomic>
#include <chrono>
#include <cstdio>
#include <memory>
#include <stdexcept>
#include <thread>

int main() try {
  using natspubsub::Millis;
  using Clock = std::chrono::steady_clock;
  auto config = natspubsub::Config::from_env(natspubsub::Config::development("billing"));
  natspubsub::Connection nats(config);
  natspubsub::Topology(nats).ensure_events_stream();
  natspubsub::Publisher publisher(nats);
  for (int i = 0; i < 10; ++i) publisher.publish("order.placed", {{"order_id", 2000 + i}, {"amount_cents", 1500}});

  const auto gateway_back_at = Clock::now() + std::chrono::seconds(2);
  auto charge = [&](int64_t order_id) {
    if (Clock::now() < gateway_back_at) throw std::runtime_error("payment gateway: connection refused");
    std::printf("charged order %lld\n", static_cast<long long>(order_id));
    std::fflush(stdout);
  };

  // After 5 failures within 10 s the circuit opens for 500 ms; then one probe message decides.
  auto gateway = std::make_shared<natspubsub::CircuitBreaker>(natspubsub::CircuitBreakerOptions{
      .name = "payment-gateway",
      .failure_threshold = 5,
      .window = Millis{10000},
      .open_duration = Millis{500},
      .half_open_probes = 1});

  natspubsub::Consumer consumer(nats);
  std::atomic<int> charged{0};
  consumer.subscribe("order.placed", [&](const natspubsub::Message& m) {
    charge(m.envelope.message.at("order_id").get<int64_t>());
    charged++;
  }, {.concurrency = 4,
      .max_attempts = 3,
      .circuit_breaker = gateway,                                      // may be shared with other calls
      .rate_limit = natspubsub::RateLimiterOptions{.rate = 20}});      // fetch at most 20 messages/s
  consumer.start();

  // The same breaker also guards a direct call: refused at once while the gateway is known down.
  try {
    gateway->call([&] { charge(1999); });
  } catch (const natspubsub::CircuitOpenError& e) {
    std::printf("direct call refused: %s\n", e.what());
  } catch (const std::exception& e) {
    std::printf("direct call failed: %s\n", e.what());
  }
  std::fflush(stdout);

  const auto give_up = Clock::now() + std::chrono::seconds(30);
  while (charged < 10 && Clock::now() < give_up) std::this_thread::sleep_for(std::chrono::milliseconds(50));
  consumer.stop(Millis{10000});

  const auto s = consumer.stats().at(0);
  std::printf("%d charged; %llu deferred while the circuit was open, %llu dead-lettered; circuit %s, opened %llu time(s)\n",
              charged.load(), static_cast<unsigned long long>(s.deferred),
              static_cast<unsigned long long>(s.dead_lettered), natspubsub::to_string(s.circuit->state),
              static_cast<unsigned long long>(s.circuit->opened));
  return charged == 10 && s.dead_lettered == 0 ? 0 : 1;
} catch (const natspubsub::Error& e) {
  std::fprintf(stderr, "circuit_breaker_example failed: %s\n", e.what());
  return 1;
}
