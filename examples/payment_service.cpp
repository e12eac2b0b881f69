// The payment service of the demo: consumes the orders app's `order.created` through the inbox
// (each order is paid exactly once, even when JetStream delivers it twice), records the payment
// and enqueues `payment.completed` in the same transaction. An order with a negative amount can
// never be paid: PermanentError sends it to the DLQ at once.
//
//   payment_service DATABASE_URL EXPECTED [IDLE_EXIT_MS]
//     stops after EXPECTED orders were settled (paid or dead-lettered), or after IDLE_EXIT_MS
//     (default 10000) without progress.
//   Environment: NATS_URL, NATSPUBSUB_ENV.
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <thread>

#include <natspubsub/connection.hpp>
#include <natspubsub/consumer.hpp>
#include <natspubsub/envelope.hpp>
#include <natspubsub/error.hpp>
#include <natspubsub/inbox_handler.hpp>
#include <natspubsub/outbox.hpp>
#include <natspubsub/store/migrations.hpp>
#include <natspubsub/topology.hpp>

int main(int argc, char** argv) try {
  if (argc < 3) {
    std::fprintf(stderr, "usage: %s DATABASE_URL EXPECTED [IDLE_EXIT_MS]\n", argv[0]);
    return 2;
  }
  const std::string url = argv[1];
  const uint64_t expected = std::strtoull(argv[2], nullptr, 10);
  const auto idle_exit = std::chrono::milliseconds(argc > 3 ? std::atoll(argv[3]) : 10000);
  auto config = natspubsub::Config::from_env(natspubsub::Config::development("payments"));

  {
    auto db = natspubsub::store::open_database(url);
    natspubsub::store::migrate(*db);
    db->in_transaction([](natspubsub::store::Transaction& tx) {
      tx.execute("CREATE TABLE IF NOT EXISTS payments (order_id BIGINT PRIMARY KEY, amount_cents BIGINT NOT NULL)");
    });
  }

  natspubsub::Connection nats(config);
  natspubsub::Topology(nats).ensure_events_stream();  // where payment.completed will go

  natspubsub::InboxHandler pay([&] { return natspubsub::store::open_database(url); },
                               [&](const natspubsub::Message& m, natspubsub::store::Transaction& tx) {
    const auto order_id = m.envelope.message.at("order_id").get<int64_t>();
    const auto amount = m.envelope.message.at("amount_cents").get<int64_t>();
    if (amount < 0) throw natspubsub::PermanentError("order " + std::to_string(order_id) + " has a negative amount");
    tx.execute("INSERT INTO payments (order_id, amount_cents) VALUES ($1, $2)", {order_id, amount});
    auto paid = natspubsub::Envelope::make("payment.completed", config.app, {{"order_id", order_id}, {"amount_cents", amount}});
    paid.trace_id = m.envelope.trace_id;
    natspubsub::enqueue(tx, config.subject("payment.completed"), paid, "order-" + std::to_string(order_id));
  });

  natspubsub::Consumer consumer(nats);
  natspubsub::SubscriptionOptions options;
  options.concurrency = 4;
  options.max_attempts = 3;
  options.backoff = natspubsub::Backoff::list({std::chrono::milliseconds(200), std::chrono::milliseconds(1000)});
  consumer.subscribe_subject(config.env + ".orders.order.created", pay, options);
  consumer.start();

  // Run until every expected order is settled, or nothing happens for idle_exit.
  auto settled = [&] {
    auto s = consumer.stats().front();
    return s.acked + s.dead_lettered;
  };
  auto last = settled();
  auto last_change = std::chrono::steady_clock::now();
  while (settled() < expected && std::chrono::steady_clock::now() - last_change < idle_exit) {
    std::this_thread::sleep_for(std::chrono::milliseconds(50));
    if (auto now = settled(); now != last) {
      last = now;
      last_change = std::chrono::steady_clock::now();
    }
  }
  consumer.stop(std::chrono::milliseconds(10000));
  auto s = consumer.stats().front();
  std::printf("payments: %llu\ninbox duplicates suppressed: %llu\ndead-lettered: %llu\nretried: %llu\n",
              static_cast<unsigned long long>(pay.processed()), static_cast<unsigned long long>(pay.duplicates()),
              static_cast<unsigned long long>(s.dead_lettered), static_cast<unsigned long long>(s.retried));
  return settled() >= expected ? 0 : 1;
} catch (const std::exception& e) {
  std::fprintf(stderr, "payment_service: %s\n", e.what());
  return 1;
}
