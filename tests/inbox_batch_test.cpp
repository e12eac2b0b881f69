// InboxHandler's batches in the consumer: several deliveries in one database transaction, one
// savepoint each, acks after the commit. SQLite and PostgreSQL, a real nats-server.
#include <atomic>
#include <chrono>
#include <map>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include <doctest/doctest.h>

#include <natspubsub/connection.hpp>
#include <natspubsub/consumer.hpp>
#include <natspubsub/error.hpp>
#include <natspubsub/inbox.hpp>
#include <natspubsub/inbox_handler.hpp>
#include <natspubsub/publisher.hpp>
#include <natspubsub/store/migrations.hpp>
#include <natspubsub/topology.hpp>

#include "support/databases.hpp"
#include "support/eventually.hpp"
#include "support/nats_helpers.hpp"
#include "support/servers.hpp"

using namespace natspubsub;
using namespace std::chrono_literals;
using natspubsub::testing::eventually;

namespace {

constexpr int kEvents = 40;

void create_tables(const std::string& url) {
  auto db = store::open_database(url);
  store::migrate(*db);
  db->in_transaction([](store::Transaction& tx) {
    tx.execute("CREATE TABLE ledger (event_id TEXT NOT NULL, deliveries BIGINT NOT NULL)");
    tx.execute("CREATE TABLE parent (id BIGINT PRIMARY KEY)");
    // Checked at COMMIT: a child without its parent makes the whole transaction's commit fail.
    tx.execute("CREATE TABLE child (id BIGINT REFERENCES parent (id) DEFERRABLE INITIALLY DEFERRED)");
  });
}

int64_t count(const std::string& url, const std::string& sql) {
  auto db = store::open_database(url);
  int64_t n = 0;
  db->in_transaction([&](store::Transaction& tx) { n = tx.query(sql)[0].as_int(0); });
  return n;
}

// Every event's effect is in the ledger exactly once (or, for `missing`, not at all).
void check_ledger(const std::string& url, int64_t expected_events) {
  CHECK(count(url, "SELECT COUNT(*) FROM ledger") == expected_events);
  CHECK(count(url, "SELECT COUNT(DISTINCT event_id) FROM ledger") == expected_events);
}

struct Setup {
  explicit Setup(const std::string& url) : url(url) { create_tables(url); }
  std::string url;
  testing::NatsServer server;
  Connection orders{testing::test_config(server.url(), "orders")};
  Connection nats{testing::test_config(server.url(), "payments")};

  // kEvents events published before the consumer starts, so its first pull finds them all.
  std::vector<std::string> publish(int n, const std::map<int, nlohmann::json>& special = {}) {
    Topology(orders).ensure_events_stream();
    Publisher publisher(orders);
    std::vector<RawMessage> raws;
    for (int i = 0; i < n; ++i) {
      nlohmann::json body = {{"i", i}};
      if (auto it = special.find(i); it != special.end()) body.update(it->second);
      raws.push_back(publisher.prepare("payment.requested", body));
    }
    std::vector<std::string> ids;
    for (const auto& r : publisher.publish_raw_batch(raws)) {
      REQUIRE(r);
    }
    for (const auto& r : raws) ids.push_back(r.msg_id);
    return ids;
  }

  // n events {"i": i} published now; returns them as sent (for copies with another Nats-Msg-Id).
  std::vector<RawMessage> publish_raws(int n) {
    Topology(orders).ensure_events_stream();
    Publisher publisher(orders);
    std::vector<RawMessage> raws;
    for (int i = 0; i < n; ++i) raws.push_back(publisher.prepare("payment.requested", {{"i", i}}));
    for (const auto& r : publisher.publish_raw_batch(raws)) REQUIRE(r);
    return raws;
  }

  static SubscriptionOptions options() {
    SubscriptionOptions o;
    o.concurrency = 2;
    o.prefetch = 62;  // capacity 64: a worker takes up to 32 queued deliveries at once
    o.max_attempts = 3;
    o.backoff = Backoff::list({50ms});
    return o;
  }
};

InboxHandler::Fn ledger_writer(std::atomic<int>& calls) {
  return [&calls](const Message& m, store::Transaction& tx) {
    calls++;
    tx.execute("INSERT INTO ledger (event_id, deliveries) VALUES ($1, $2)",
               {m.envelope.event_id, static_cast<int64_t>(m.metadata.deliveries)});
    if (m.envelope.message.value("flaky", false) && m.metadata.deliveries == 1)
      throw std::runtime_error("flaky: fails its first attempt after writing");
    if (m.envelope.message.value("poison", false)) throw PermanentError("poison: never works");
    if (m.envelope.message.value("orphan", false) && m.metadata.deliveries == 1)
      tx.execute("INSERT INTO child (id) VALUES (999)");  // no parent: the COMMIT fails
    if (m.envelope.message.value("always_orphan", false))
      tx.execute("INSERT INTO child (id) VALUES (998)");  // every delivery: its COMMIT always fails
    if (m.envelope.message.value("swallow", false) && m.metadata.deliveries == 1) {
      // A handler that catches a database error and goes on: on PostgreSQL the transaction is
      // aborted now (on SQLite a failed statement leaves it usable).
      try {
        tx.execute("SELECT * FROM no_such_table");
      } catch (const store::DatabaseError&) {
      }
    }
  };
}

// Handlers that swallow a database error, one of them the last event (so likely the last of its
// batch, where nothing after it would notice the aborted transaction): each such message fails
// alone and comes back; nothing is acknowledged without its effect stored.
void handler_swallowing_a_database_error(const std::string& url, bool postgres, int max_batch = 32) {
  Setup f(url);
  f.publish(kEvents, {{10, {{"swallow", true}}}, {20, {{"swallow", true}}}, {kEvents - 1, {{"swallow", true}}}});
  std::atomic<int> calls{0};
  InboxHandler handler([&] { return store::open_database(url); }, ledger_writer(calls));
  handler.max_batch(max_batch);
  Consumer consumer(f.nats);
  consumer.subscribe_subject("test.orders.>", handler, Setup::options());
  consumer.start();
  REQUIRE(eventually([&] { return consumer.stats().front().acked == kEvents; }, 30s));
  consumer.stop(5s);
  CHECK(handler.batches() >= (max_batch > 1 ? 1u : 0u));
  CHECK(consumer.stats().front().dead_lettered == 0);
  check_ledger(url, kEvents);
  CHECK(count(url, "SELECT COUNT(*) FROM natspubsub_inbox WHERE status = 'processed'") == kEvents);
  // PostgreSQL: the three ran again (their first attempt failed); SQLite: nothing to retry.
  CHECK(count(url, "SELECT COUNT(*) FROM ledger WHERE deliveries > 1") == (postgres ? 3 : 0));
}

// A message whose COMMIT fails on every delivery: its batch fails once, then each of that
// batch's messages runs alone when it comes back, so only the bad one keeps failing and goes to
// the DLQ; its neighbours are stored and acknowledged, none of them dead-lettered.
void poison_commit_fails_alone(const std::string& url) {
  Setup f(url);
  f.publish(kEvents, {{4, {{"always_orphan", true}}}});
  std::atomic<int> calls{0};
  InboxHandler handler([&] { return store::open_database(url); }, ledger_writer(calls));
  Consumer consumer(f.nats);
  consumer.subscribe_subject("test.orders.>", handler, Setup::options());
  consumer.start();
  REQUIRE(eventually([&] {
    auto s = consumer.stats().front();
    return s.acked == kEvents - 1 && s.dead_lettered == 1;
  }, 30s));
  consumer.stop(5s);
  CHECK(consumer.stats().front().dead_lettered == 1);
  CHECK(count(url, "SELECT COUNT(*) FROM child") == 0);
  // Every event but the bad one stored once (the bad one's ledger row rolled back with it).
  check_ledger(url, kEvents - 1);
}

// Middleware that runs the next step on another thread: that call is outside the batch's
// transaction, and would wait for the batch's row lock (PostgreSQL) or write turn (SQLite) while
// the batch waits for it. It is refused at once with a ConfigError instead of hanging.
void middleware_on_another_thread(const std::string& url) {
  Setup f(url);
  f.publish(kEvents);
  std::atomic<int> calls{0};
  InboxHandler handler([&] { return store::open_database(url); }, ledger_writer(calls));
  Consumer consumer(f.nats);
  std::atomic<int> config_errors{0};
  consumer.use([&](const Message& m, const Next& next) {
    std::exception_ptr error;
    std::thread([&] {
      try {
        next(m);
      } catch (const ConfigError&) {
        config_errors++;
        error = std::current_exception();
      } catch (...) {
        error = std::current_exception();
      }
    }).join();
    if (error) std::rethrow_exception(error);
  });
  auto o = Setup::options();
  o.max_attempts = 2;
  consumer.subscribe_subject("test.orders.>", handler, o);
  consumer.start();
  // Settled, one way or the other, within seconds: nothing hangs.
  REQUIRE(eventually([&] {
    auto s = consumer.stats().front();
    return s.acked + s.dead_lettered == static_cast<uint64_t>(kEvents);
  }, 30s));
  consumer.stop(5s);
  CHECK(handler.batches() >= 1);
  CHECK(config_errors.load() >= 1);
  // What was acknowledged ran alone, in a transaction of its own: stored once.
  CHECK(count(url, "SELECT COUNT(*) FROM ledger") == count(url, "SELECT COUNT(DISTINCT event_id) FROM ledger"));
  CHECK(count(url, "SELECT COUNT(*) FROM ledger") == static_cast<int64_t>(consumer.stats().front().acked));
}

// Another copy of an event (a producer's retry outside the duplicate window, a replay) run by
// another worker while a batch is running the first copy: it waits for the batch, then finds
// the inbox row and is acknowledged as a duplicate. It is not the case above (same delivery,
// another thread) and must not be refused as it. Before the fix it was refused with a
// ConfigError, counted a failure and retried (seen in CI in inbox_handler_test).
void copy_of_an_event_a_batch_is_running(const std::string& url) {
  Setup f(url);
  auto raws = f.publish_raws(kEvents);

  std::atomic<int> calls{0};
  std::atomic<bool> first{true};
  std::atomic<bool> slow_started{false};
  std::mutex slow_mutex;
  std::string slow_event;
  auto writer = ledger_writer(calls);
  // The first call of all sleeps inside its transaction while the copy is published.
  InboxHandler handler([&] { return store::open_database(url); }, [&](const Message& m, store::Transaction& tx) {
    writer(m, tx);
    if (first.exchange(false)) {
      {
        std::lock_guard lock(slow_mutex);
        slow_event = m.envelope.event_id;
      }
      slow_started = true;
      std::this_thread::sleep_for(1500ms);
    }
  });
  Consumer consumer(f.nats);
  consumer.subscribe_subject("test.orders.>", handler, Setup::options());
  consumer.start();
  REQUIRE(eventually([&] { return slow_started.load(); }, 10s));
  RawMessage copy;
  {
    std::lock_guard lock(slow_mutex);
    for (const auto& r : raws)
      if (r.msg_id == slow_event) copy = r;
  }
  REQUIRE(!copy.msg_id.empty());
  copy.msg_id += "-copy";
  for (const auto& r : Publisher(f.orders).publish_raw_batch({copy})) REQUIRE(r);

  REQUIRE(eventually([&] { return consumer.stats().front().acked == kEvents + 1; }, 30s));
  consumer.stop(5s);
  CHECK(handler.batches() >= 1);
  CHECK(handler.failures() == 0);
  CHECK(handler.duplicates() == 1);
  CHECK(consumer.stats().front().retried == 0);
  check_ledger(url, kEvents);
}

void throwing_handler_in_a_batch(const std::string& url) {
  Setup f(url);
  f.publish(kEvents, {{5, {{"flaky", true}}}, {12, {{"poison", true}}}});
  std::atomic<int> calls{0};
  InboxHandler handler([&] { return store::open_database(url); }, ledger_writer(calls));
  Consumer consumer(f.nats);
  consumer.subscribe_subject("test.orders.>", handler, Setup::options());
  consumer.start();

  REQUIRE(eventually([&] {
    auto s = consumer.stats().front();
    return s.acked == kEvents - 1 && s.dead_lettered == 1;
  }, 30s));
  consumer.stop(5s);
  auto s = consumer.stats().front();
  CHECK(handler.batches() >= 1);
  CHECK(handler.batched() >= 10);
  CHECK(s.retried >= 1);          // the flaky one, alone; nobody else
  CHECK(s.retried <= 3);
  CHECK(s.dead_lettered == 1);    // the poison one, by the error policy as today
  // The flaky event ran twice but is stored once; the poison one rolled back to its savepoint.
  check_ledger(url, kEvents - 1);
  CHECK(count(url, "SELECT COUNT(*) FROM ledger WHERE deliveries > 1") == 1);
  CHECK(count(url, "SELECT COUNT(*) FROM natspubsub_inbox WHERE status = 'processed'") == kEvents - 1);
  CHECK(count(url, "SELECT COUNT(*) FROM natspubsub_inbox WHERE status = 'failed'") == 1);
  CHECK(handler.processed() == kEvents - 1);
}

void failed_commit_acks_nothing(const std::string& url) {
  Setup f(url);
  f.publish(kEvents, {{3, {{"orphan", true}}}});
  std::atomic<int> calls{0};
  InboxHandler handler([&] { return store::open_database(url); }, ledger_writer(calls));
  Consumer consumer(f.nats);
  consumer.subscribe_subject("test.orders.>", handler, Setup::options());
  consumer.start();

  REQUIRE(eventually([&] { return consumer.stats().front().acked == kEvents; }, 30s));
  consumer.stop(5s);
  auto s = consumer.stats().front();
  CHECK(handler.batches() >= 2);
  CHECK(s.dead_lettered == 0);
  // The batch holding the orphan did not commit: each of its messages was NAKed, delivered again
  // and stored by its second delivery. Had one been acked, its effect would be missing here.
  check_ledger(url, kEvents);
  const auto redone = count(url, "SELECT COUNT(*) FROM ledger WHERE deliveries > 1");
  CHECK(redone >= 2);
  CHECK(s.retried >= static_cast<uint64_t>(redone));
  CHECK(count(url, "SELECT COUNT(*) FROM child") == 0);
  CHECK(calls.load() == kEvents + redone);
}

void redelivered_batch_is_all_duplicates(const std::string& url) {
  Setup f(url);
  auto raws = f.publish_raws(kEvents);
  // The same events again (a producer retry outside the duplicate window, a replay): same body
  // and event id, a different Nats-Msg-Id.
  auto again = raws;
  for (auto& r : again) r.msg_id += "-again";
  for (const auto& r : Publisher(f.orders).publish_raw_batch(again)) REQUIRE(r);

  std::atomic<int> calls{0};
  InboxHandler handler([&] { return store::open_database(url); }, ledger_writer(calls));
  Consumer consumer(f.nats);
  consumer.subscribe_subject("test.orders.>", handler, Setup::options());
  consumer.start();
  REQUIRE(eventually([&] { return consumer.stats().front().acked == 2 * kEvents; }, 30s));
  consumer.stop(5s);
  CHECK(handler.batches() >= 2);
  CHECK(handler.processed() == kEvents);
  CHECK(handler.duplicates() == kEvents);
  CHECK(calls.load() == kEvents);
  check_ledger(url, kEvents);
}

void per_message_when_turned_off(const std::string& url) {
  Setup f(url);
  f.publish(kEvents);
  std::atomic<int> calls{0};
  InboxHandler handler([&] { return store::open_database(url); }, ledger_writer(calls));
  handler.max_batch(1);
  Consumer consumer(f.nats);
  consumer.subscribe_subject("test.orders.>", handler, Setup::options());
  consumer.start();
  REQUIRE(eventually([&] { return consumer.stats().front().acked == kEvents; }, 30s));
  consumer.stop(5s);
  CHECK(handler.batches() == 0);
  CHECK(handler.processed() == kEvents);
  check_ledger(url, kEvents);
}

// Middleware that does not call the handler for one message: that message is acked, and the
// inbox has no row saying it was processed (PostgreSQL inserts the batch's rows up front).
void middleware_skipping_a_message(const std::string& url) {
  Setup f(url);
  f.publish(kEvents, {{7, {{"skip", true}}}});
  std::atomic<int> calls{0};
  InboxHandler handler([&] { return store::open_database(url); }, ledger_writer(calls));
  Consumer consumer(f.nats);
  std::atomic<int> seen{0};
  consumer.use([&](const Message& m, const Next& next) {
    seen++;
    if (m.envelope.message.value("skip", false)) return;
    next(m);
  });
  consumer.subscribe_subject("test.orders.>", handler, Setup::options());
  consumer.start();
  REQUIRE(eventually([&] { return consumer.stats().front().acked == kEvents; }, 30s));
  consumer.stop(5s);
  CHECK(handler.batches() >= 1);
  CHECK(seen.load() == kEvents);  // middleware saw every message, in batches too
  CHECK(calls.load() == kEvents - 1);
  check_ledger(url, kEvents - 1);
  CHECK(count(url, "SELECT COUNT(*) FROM natspubsub_inbox") == kEvents - 1);
}

// A 3,000-message backlog consumed in batches while PostgreSQL or nats-server restarts: every
// event's effect exactly once afterwards (the ledger has no unique key, so a double shows).
enum class Restart { postgres, nats };

void restart_during_batches(const std::string& url, Restart what) {
  create_tables(url);
  testing::NatsServer server;
  auto orders_config = testing::test_config(server.url(), "orders");
  orders_config.stream.memory_storage = false;  // the stream must survive a server restart
  Connection orders(orders_config);
  auto pay_config = testing::test_config(server.url(), "payments");
  pay_config.stream.memory_storage = false;
  Connection payments(pay_config);
  Topology(orders).ensure_events_stream();
  constexpr int kBacklog = 3000;
  {
    Publisher publisher(orders);
    std::vector<RawMessage> raws;
    for (int i = 0; i < kBacklog; ++i) raws.push_back(publisher.prepare("payment.requested", {{"i", i}}));
    for (const auto& r : publisher.publish_raw_batch(raws)) REQUIRE(r);
  }
  std::atomic<int> calls{0};
  InboxHandler handler([&] { return store::open_database(url); }, ledger_writer(calls));
  Consumer consumer(payments);
  auto o = Setup::options();
  o.max_attempts = 100;  // the outage must not send healthy messages to the DLQ
  o.backoff = Backoff::list({100ms, 200ms, 400ms});
  consumer.subscribe_subject("test.orders.>", handler, o);
  consumer.start();

  REQUIRE(eventually([&] { return handler.processed() >= 500; }, 60s));
  const auto processed_at_restart = handler.processed();
  if (what == Restart::postgres) {
    testing::shared_postgres().restart();
  } else {
    server.kill();
    std::this_thread::sleep_for(500ms);
    server.start();
  }
  const bool done = eventually([&] { return handler.processed() + handler.duplicates() >= kBacklog &&
                                            count(url, "SELECT COUNT(DISTINCT event_id) FROM ledger") >= kBacklog; },
                               120s);
  consumer.stop(5s);
  const auto rows = count(url, "SELECT COUNT(*) FROM ledger");
  const auto distinct = count(url, "SELECT COUNT(DISTINCT event_id) FROM ledger");
  MESSAGE("events " << kBacklog << ", restart after " << processed_at_restart << " processed; batches "
                    << handler.batches() << " holding " << handler.batched() << "; lost " << (kBacklog - distinct)
                    << ", applied twice " << (rows - distinct) << "; duplicates suppressed " << handler.duplicates());
  CHECK(done);
  CHECK(handler.batches() >= 10);
  CHECK(distinct == kBacklog);  // 0 lost
  CHECK(rows == kBacklog);      // 0 applied twice
  CHECK(consumer.stats().front().dead_lettered == 0);
}

}  // namespace

TEST_CASE("PostgreSQL restarted during batched inbox transactions: 0 lost, 0 applied twice") {
  restart_during_batches(testing::fresh_postgres_database("inbox_batch"), Restart::postgres);
}

TEST_CASE("nats-server killed during batched inbox transactions (SQLite): 0 lost, 0 applied twice") {
  testing::TempDir dir;
  restart_during_batches("sqlite://" + testing::sqlite_file(dir), Restart::nats);
}

TEST_CASE("SQLite: middleware that skips a message: acked, no inbox row for it") {
  testing::TempDir dir;
  middleware_skipping_a_message("sqlite://" + testing::sqlite_file(dir));
}

TEST_CASE("PostgreSQL: middleware that skips a message: acked, no inbox row for it") {
  middleware_skipping_a_message(testing::fresh_postgres_database("inbox_batch"));
}

TEST_CASE("SQLite: a throwing handler in a batch rolls back alone; the others commit, each effect once") {
  testing::TempDir dir;
  throwing_handler_in_a_batch("sqlite://" + testing::sqlite_file(dir));
}

TEST_CASE("PostgreSQL: a throwing handler in a batch rolls back alone; the others commit, each effect once") {
  throwing_handler_in_a_batch(testing::fresh_postgres_database("inbox_batch"));
}

TEST_CASE("SQLite: a failed COMMIT acks none of the batch; every effect once after the retries") {
  testing::TempDir dir;
  failed_commit_acks_nothing("sqlite://" + testing::sqlite_file(dir));
}

TEST_CASE("PostgreSQL: a failed COMMIT acks none of the batch; every effect once after the retries") {
  failed_commit_acks_nothing(testing::fresh_postgres_database("inbox_batch"));
}

TEST_CASE("SQLite: a redelivered batch is all duplicates") {
  testing::TempDir dir;
  redelivered_batch_is_all_duplicates("sqlite://" + testing::sqlite_file(dir));
}

TEST_CASE("PostgreSQL: a redelivered batch is all duplicates") {
  redelivered_batch_is_all_duplicates(testing::fresh_postgres_database("inbox_batch"));
}

TEST_CASE("SQLite: max_batch(1) runs one message per transaction") {
  testing::TempDir dir;
  per_message_when_turned_off("sqlite://" + testing::sqlite_file(dir));
}

TEST_CASE("PostgreSQL: a handler that swallows a database error fails alone; nothing acked unstored") {
  handler_swallowing_a_database_error(testing::fresh_postgres_database("inbox_batch"), true);
}

TEST_CASE("SQLite: a handler that swallows a database error: every effect once") {
  testing::TempDir dir;
  handler_swallowing_a_database_error("sqlite://" + testing::sqlite_file(dir), false);
}

TEST_CASE("PostgreSQL: a message whose COMMIT always fails goes to the DLQ alone; its batch is stored") {
  poison_commit_fails_alone(testing::fresh_postgres_database("inbox_batch"));
}

TEST_CASE("SQLite: a message whose COMMIT always fails goes to the DLQ alone; its batch is stored") {
  testing::TempDir dir;
  poison_commit_fails_alone("sqlite://" + testing::sqlite_file(dir));
}

TEST_CASE("PostgreSQL: middleware running the handler on another thread is refused at once, not hung") {
  middleware_on_another_thread(testing::fresh_postgres_database("inbox_batch"));
}

TEST_CASE("PostgreSQL: a copy of an event run by another worker while a batch runs the first is a duplicate, not refused") {
  copy_of_an_event_a_batch_is_running(testing::fresh_postgres_database("inbox_batch"));
}

TEST_CASE("SQLite: a copy of an event run by another worker while a batch runs the first is a duplicate, not refused") {
  testing::TempDir dir;
  copy_of_an_event_a_batch_is_running("sqlite://" + testing::sqlite_file(dir));
}

TEST_CASE("PostgreSQL, one message per transaction: a handler that swallows a database error fails, is retried") {
  handler_swallowing_a_database_error(testing::fresh_postgres_database("inbox_batch"), true, 1);
}
