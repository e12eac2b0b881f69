// ctest-labels: fault
// PostgreSQL restarted while an outbox relay and an inbox consumer run against it (and a producer
// keeps enqueueing). Both must reconnect by themselves; nothing may be lost or doubled: every
// enqueued event is in the stream once, every outbox row ends `sent`, the ledger written through
// the inbox has each event once.
#include <atomic>
#include <chrono>
#include <string>
#include <thread>
#include <vector>

#include <doctest/doctest.h>

#include <natspubsub/connection.hpp>
#include <natspubsub/consumer.hpp>
#include <natspubsub/envelope.hpp>
#include <natspubsub/error.hpp>
#include <natspubsub/inbox_handler.hpp>
#include <natspubsub/outbox.hpp>
#include <natspubsub/outbox_relay.hpp>
#include <natspubsub/store/database.hpp>
#include <natspubsub/store/migrations.hpp>
#include <natspubsub/topology.hpp>

#include "support/databases.hpp"
#include "support/fault.hpp"
#include "support/nats_helpers.hpp"
#include "support/servers.hpp"

using namespace natspubsub;
using namespace std::chrono_literals;

namespace {

constexpr const char* kStream = "test-orders-events";

// Reads that tolerate the database being down for a moment (the test's own checks, not the code
// under test): -1 / empty while it is unreachable.
int64_t count_or_minus_one(const std::string& url, const std::string& sql) {
  try {
    auto db = store::open_database(url);
    return testing::query(*db, sql)[0].as_int(0);
  } catch (const std::exception&) {
    return -1;
  }
}

}  // namespace

TEST_CASE("PostgreSQL restarted while the relay and an inbox consumer run: both reconnect, nothing lost or doubled") {
  auto& pg = testing::shared_postgres();
  const auto url = testing::fresh_postgres_database("fault_pg");
  {
    auto db = store::open_database(url);
    store::migrate(*db);
    testing::execute(*db, "CREATE TABLE ledger (event_id TEXT NOT NULL)");  // no unique key: a double shows
  }
  testing::NatsServer server;
  auto orders_config = testing::test_config(server.url(), "orders");
  orders_config.stream.memory_storage = false;
  Connection orders(orders_config);
  Topology(orders).ensure_events_stream();
  auto pay_config = testing::test_config(server.url(), "payments");
  pay_config.stream.memory_storage = false;
  Connection payments(pay_config);

  // The relay, in process, with its own connection to the database.
  auto relay_db = store::open_database(url);
  RelayOptions ro;
  ro.batch_size = 200;
  ro.poll_interval = 20ms;
  ro.lease = 3s;
  ro.ack_timeout = 2s;
  ro.backoff = {50ms, 100ms};
  OutboxRelay relay(orders, *relay_db, ro);
  std::jthread relay_thread([&](std::stop_token stop) { relay.run(stop); });

  InboxHandler handler([&] { return store::open_database(url); },
                       [](const Message& m, store::Transaction& tx) {
                         tx.execute("INSERT INTO ledger (event_id) VALUES ($1)", {m.envelope.event_id});
                       });
  Consumer consumer(payments);
  SubscriptionOptions so;
  so.concurrency = 4;
  so.max_attempts = 100;  // the database being away must not send healthy messages to the DLQ
  so.backoff = Backoff::list({100ms, 200ms, 400ms});
  consumer.subscribe_subject("test.orders.>", handler, so);
  consumer.start();

  // The producer: 3,000 events in transactions of 50, spread over a few seconds so that some are
  // enqueued before, some during and some after the restart. A failed transaction is retried with
  // the same event ids; a unique violation on retry means its commit had gone through.
  constexpr int kEvents = 3000;
  constexpr int kPerTx = 50;
  std::vector<std::string> ids;
  std::vector<Envelope> events;
  for (int i = 0; i < kEvents; ++i) {
    events.push_back(Envelope::make("order.created", "orders", {{"i", i}}));
    ids.push_back(events.back().event_id);
  }
  std::atomic<int> enqueued{0};
  std::atomic<int> producer_retries{0};
  std::jthread producer([&](std::stop_token stop) {
    std::unique_ptr<store::Database> db;
    for (int start = 0; start < kEvents && !stop.stop_requested();) {
      try {
        if (!db) db = store::open_database(url);
        db->in_transaction([&](store::Transaction& tx) {
          for (int i = start; i < start + kPerTx; ++i)
            enqueue(tx, "test.orders.order.created", events[static_cast<size_t>(i)]);
        });
        start += kPerTx;
        enqueued = start;
        std::this_thread::sleep_for(60ms);
      } catch (const store::UniqueViolationError&) {
        start += kPerTx;  // committed before the connection dropped
        enqueued = start;
      } catch (const std::exception&) {
        producer_retries++;
        db.reset();
        std::this_thread::sleep_for(200ms);
      }
    }
  });

  // Restart PostgreSQL once the relay has published and the consumer has applied a good part,
  // while the producer is still going.
  auto started = std::chrono::steady_clock::now();
  REQUIRE(testing::eventually([&] { return handler.processed() >= 500; }, 60s));
  auto processed_at_restart = handler.processed();
  auto enqueued_at_restart = enqueued.load();
  pg.restart();
  auto restarted_after = std::chrono::duration<double>(std::chrono::steady_clock::now() - started).count();

  producer.join();
  bool done = testing::eventually(
      [&] {
        return count_or_minus_one(url, "SELECT COUNT(*) FROM ledger") >= kEvents &&
               count_or_minus_one(url, "SELECT COUNT(*) FROM natspubsub_outbox WHERE status = 'sent'") == kEvents;
      },
      90s);
  std::this_thread::sleep_for(1s);  // a late redelivery would show up as a second row now
  consumer.stop(5s);
  relay_thread.request_stop();
  relay_thread.join();
  auto seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - started).count();

  std::vector<std::string> stored;
  for (const auto& m : testing::RawNats(server.url()).read_stream(kStream)) stored.push_back(m.msg_id);
  std::vector<std::string> ledger;
  for (const auto& row : testing::query(*store::open_database(url), "SELECT event_id FROM ledger")) ledger.push_back(row[0].as_text());
  auto sent = count_or_minus_one(url, "SELECT COUNT(*) FROM natspubsub_outbox WHERE status = 'sent'");
  auto in_stream = testing::tally(ids, stored);
  auto applied = testing::tally(ids, ledger);
  auto rs = relay.stats();
  MESSAGE("events " << kEvents << ", PostgreSQL restarts 1 (after " << restarted_after << " s: " << enqueued_at_restart
                    << " enqueued, " << processed_at_restart << " processed); producer retries " << producer_retries.load()
                    << ", relay cycles failed and retried " << rs.errors << ", handler failures " << handler.failures()
                    << "; stream: stored " << in_stream.seen << ", lost " << in_stream.lost << ", duplicated "
                    << in_stream.duplicated << "; rows sent " << sent << "; processed: " << applied.seen << ", lost "
                    << applied.lost << ", duplicated " << applied.duplicated << "; " << seconds << " s");
  CHECK(done);
  CHECK(enqueued_at_restart < kEvents);  // the restart happened while events were still coming
  CHECK(in_stream.lost == 0);
  CHECK(in_stream.duplicated == 0);
  CHECK(in_stream.unexpected == 0);
  CHECK(sent == kEvents);
  CHECK(applied.lost == 0);
  CHECK(applied.duplicated == 0);
  CHECK(applied.unexpected == 0);
  CHECK(consumer.stats().front().dead_lettered == 0);
}
