// The inbox wired into the consumer runtime, on SQLite and PostgreSQL, with a real nats-server.
#include <atomic>
#include <chrono>
#include <thread>

#include <doctest/doctest.h>

#include <natspubsub/connection.hpp>
#include <natspubsub/consumer.hpp>
#include <natspubsub/inbox_handler.hpp>
#include <natspubsub/publisher.hpp>
#include <natspubsub/store/migrations.hpp>
#include <natspubsub/topology.hpp>

#include "support/databases.hpp"
#include "support/nats_helpers.hpp"
#include "support/eventually.hpp"
#include "support/servers.hpp"

using namespace natspubsub;
using namespace std::chrono_literals;
using natspubsub::testing::eventually;

namespace {

int64_t business_rows(const std::string& url) {
  auto db = store::open_database(url);
  int64_t n = 0;
  db->in_transaction([&](store::Transaction& tx) { n = tx.query("SELECT COUNT(*) FROM ledger")[0].as_int(0); });
  return n;
}

void run(const std::string& url) {
  {
    auto db = store::open_database(url);
    store::migrate(*db);
    db->in_transaction([](store::Transaction& tx) {
      tx.execute("CREATE TABLE ledger (event_id TEXT NOT NULL, amount BIGINT NOT NULL)");
    });
  }
  testing::NatsServer server;
  Connection orders(testing::test_config(server.url(), "orders"));
  Topology(orders).ensure_events_stream();
  Connection nats(testing::test_config(server.url(), "payments"));

  std::atomic<int> calls{0};
  std::atomic<int> fail_first{1};  // the first call for "flaky" fails after writing
  InboxHandler handler([&] { return store::open_database(url); },
                       [&](const Message& m, store::Transaction& tx) {
                         calls++;
                         tx.execute("INSERT INTO ledger (event_id, amount) VALUES ($1, $2)",
                                    {m.envelope.event_id, m.envelope.message.at("amount").get<int64_t>()});
                         if (m.envelope.message.value("flaky", false) && fail_first.fetch_sub(1) > 0)
                           throw std::runtime_error("database hiccup after the write");
                       });
  Consumer consumer(nats);
  SubscriptionOptions o;
  o.concurrency = 4;
  o.backoff = Backoff::list({50ms});
  consumer.subscribe_subject("test.orders.>", handler, o);
  consumer.start();

  // The same event delivered three times (as a producer retry outside JetStream's duplicate
  // window, or a DLQ replay, would): same body and event id, different Nats-Msg-Id.
  Publisher publisher(orders);
  auto raw = publisher.prepare("payment.requested", {{"amount", 42}});
  std::vector<RawMessage> copies(3, raw);
  copies[1].msg_id += "-again";
  copies[2].msg_id += "-third";
  for (const auto& r : publisher.publish_raw_batch(copies)) REQUIRE(r);

  // A failing first attempt: its write is rolled back, the retry writes once.
  auto flaky = publisher.publish("payment.requested", {{"amount", 7}, {"flaky", true}});
  CHECK(flaky.stream == "test-orders-events");

  REQUIRE(eventually([&] { return handler.processed() == 2 && handler.duplicates() == 2; }));
  // The handler's counters move before the ack; wait for the acks too.
  CHECK(eventually([&] { return consumer.stats().front().acked == 4; }));
  consumer.stop(5s);
  CHECK(business_rows(url) == 2);
  CHECK(handler.failures() == 1);
  CHECK(calls.load() == 3);  // 42 once, flaky twice (fail + success); duplicates never ran
  auto s = consumer.stats().front();
  CHECK(s.acked == 4);  // four messages: three copies of one event and the flaky one
  CHECK(s.retried == 1);
  CHECK(s.dead_lettered == 0);
}

}  // namespace

TEST_CASE("SQLite: duplicates are acked without running the handler; a failed attempt leaves nothing") {
  testing::TempDir dir;
  run("sqlite://" + testing::sqlite_file(dir));
}

TEST_CASE("PostgreSQL: the same") { run(testing::fresh_postgres_database("inbox_handler")); }
