// A complete consumer: one handler, retries with exponential backoff, a dead-letter queue for what
// cannot succeed, middleware, and a graceful stop on SIGTERM. Run a nats-server with JetStream and:
//   NATS_URL=nats://127.0.0.1:4222 ./build/examples/consumer_example --demo
// --demo publishes three orders as the "orders" app (one fine, one that fails twice before it
// works, one without an amount) and exits once each has a verdict; without it the consumer runs
// until SIGINT/SIGTERM.
#include <natspubsub/connection.hpp>
#include <natspubsub/consumer.hpp>
#include <natspubsub/error.hpp>
#include <natspubsub/publisher.hpp>
#include <natspubsub/topology.hpp>

#include <atomic>
#include <chrono>
#include <csignal>
#include <cstdio>
#include <stdexcept>
#include <string>
#include <thread>

namespace {

std::atomic<bool> signalled{false};
void on_signal(int) { signalled = true; }

void publish_demo_orders(const natspubsub::Config& billing) {
  auto config = billing;
  config.app = "orders";  // the publishing app owns the stream of its events
  natspubsub::Connection nats(config);
  natspubsub::Topology(nats).ensure_events_stream();
  natspubsub::Publisher publisher(nats);
  publisher.publish("order.created", {{"order_id", 1001}, {"amount_cents", 2599}});
  publisher.publish("order.created", {{"order_id", 1002}, {"amount_cents", 990}, {"flaky", true}});
  publisher.publish("order.created", {{"order_id", 1003}});
}

}  // namespace

int main(int argc, char** argv) try {
  using natspubsub::Millis;
  const bool demo = argc > 1 && std::string(argv[1]) == "--demo";
  // Defaults for local work, then NATS_URL / NATSPUBSUB_* from the environment.
  auto config = natspubsub::Config::from_env(natspubsub::Config::development("billing"));
  if (demo) publish_demo_orders(config);

  natspubsub::Connection nats(config);
  natspubsub::Consumer consumer(nats);  // DLQ stream "{env}-billing-dlq" is ensured by start()
  consumer.use(natspubsub::middleware::trace_context());
  consumer.use(natspubsub::middleware::logging(spdlog::level::info));

  natspubsub::ErrorPolicy policy;
  policy.dead_letter_on<std::invalid_argument>();  // bad input: retrying cannot help

  // Another app's topic: the durable consumer lives on the orders app's stream.
  consumer.subscribe_subject(config.env + ".orders.order.created", [](const natspubsub::Message& m) {
    const auto& order = m.envelope.message;
    if (!order.contains("amount_cents")) throw natspubsub::PermanentError("order without amount_cents");
    if (order.value("flaky", false) && m.attempt() < 3) throw std::runtime_error("payment gateway timeout");
    std::printf("charged order %lld on attempt %llu\n", static_cast<long long>(order.at("order_id").get<int64_t>()),
                static_cast<unsigned long long>(m.attempt()));
    std::fflush(stdout);
  }, {.concurrency = 8,
      .max_attempts = 5,                                              // then the DLQ
      .backoff = natspubsub::Backoff::exponential(Millis{200}, Millis{30000}),  // 0.2 s, 0.4 s, ... 30 s, jittered
      .ack_wait = Millis{30000},                                      // in-progress signals keep long handlers
      .error_policy = policy});
  consumer.start();

  std::signal(SIGINT, on_signal);
  std::signal(SIGTERM, on_signal);
  const auto give_up = std::chrono::steady_clock::now() + std::chrono::seconds(30);
  while (!signalled) {
    if (demo) {
      auto s = consumer.stats().at(0);
      if (s.acked + s.dead_lettered >= 3 || std::chrono::steady_clock::now() > give_up) break;
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(100));
  }

  auto report = consumer.stop(Millis{20000});  // unstarted work goes back at once; running handlers finish
  for (const auto& s : consumer.stats())
    std::printf("%s: %llu acked, %llu retried, %llu dead-lettered, p99 %lld us; stop handed back %llu\n",
                s.durable.c_str(), static_cast<unsigned long long>(s.acked),
                static_cast<unsigned long long>(s.retried), static_cast<unsigned long long>(s.dead_lettered),
                static_cast<long long>(s.latency.quantile(0.99).count()),
                static_cast<unsigned long long>(report.nacked_unstarted));
  return 0;
} catch (const natspubsub::Error& e) {
  std::fprintf(stderr, "consumer failed: %s\n", e.what());
  return 1;
}
