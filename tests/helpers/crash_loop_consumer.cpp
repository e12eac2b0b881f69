// A consumer process for dlq_outage_test's crash loop: it consumes test.orders.order.created and
// aborts the whole process on a message whose body has "crash": true, as a handler with a fatal
// bug would. Every other event id it handles is appended to a file, one per line.
//
//   crash_loop_consumer NATS_URL PROCESSED_FILE MAX_ATTEMPTS
//
// Runs until SIGTERM or SIGINT (then stops the consumer and exits 0), at most 120 s.
#include <sys/resource.h>

#include <atomic>
#include <chrono>
#include <csignal>
#include <cstdlib>
#include <fstream>
#include <iostream>
#include <mutex>
#include <string>
#include <thread>

#include <natspubsub/config.hpp>
#include <natspubsub/connection.hpp>
#include <natspubsub/consumer.hpp>

namespace {

std::atomic<bool> stop_requested{false};

void on_signal(int) { stop_requested = true; }

}  // namespace

int main(int argc, char** argv) {
  if (argc != 4) {
    std::cerr << "usage: crash_loop_consumer NATS_URL PROCESSED_FILE MAX_ATTEMPTS\n";
    return 2;
  }
  // The abort is the point, a core file of it is not.
  const rlimit no_core{0, 0};
  setrlimit(RLIMIT_CORE, &no_core);
  std::signal(SIGTERM, on_signal);
  std::signal(SIGINT, on_signal);
  const std::string processed_file = argv[2];

  auto config = natspubsub::Config::testing("orders");
  config.env = "test";
  config.servers = {argv[1]};
  natspubsub::Connection nats(config);
  natspubsub::Consumer consumer(nats);
  std::mutex mutex;
  consumer.subscribe("order.created", [&](const natspubsub::Message& m) {
    if (m.envelope.message.value("crash", false)) std::abort();
    std::lock_guard lock(mutex);
    std::ofstream out(processed_file, std::ios::app);
    out << m.envelope.event_id << '\n';
  }, {.concurrency = 1,
      .max_attempts = std::atoi(argv[3]),
      .backoff = natspubsub::Backoff::list({natspubsub::Millis{50}}),
      .ack_wait = natspubsub::Millis{1000}});
  consumer.start();
  const auto until = std::chrono::steady_clock::now() + std::chrono::seconds(120);
  while (!stop_requested && std::chrono::steady_clock::now() < until)
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
  consumer.stop(natspubsub::Millis{5000});
  return 0;
}
