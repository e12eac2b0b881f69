// The inbox against real SQLite files and a real PostgreSQL server: redeliveries and concurrent
// deliveries change the business table once; failed handlers leave nothing and can run again.
#include <doctest/doctest.h>

#include <atomic>
#include <chrono>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

#include <natspubsub/inbox.hpp>
#include <natspubsub/store/migrations.hpp>
#include <natspubsub/store/postgres.hpp>
#include <natspubsub/store/sqlite.hpp>

#include "support/databases.hpp"

using namespace natspubsub;
using namespace std::chrono_literals;
using natspubsub::store::Backend;
using natspubsub::store::Database;
using natspubsub::store::Transaction;
using natspubsub::testing::fresh_postgres_database;
using natspubsub::testing::run_concurrently;
using natspubsub::testing::TempDir;

namespace {

std::string sqlite_url(const TempDir& dir) { return "sqlite://" + natspubsub::testing::sqlite_file(dir); }

// The business table has no unique key on purpose: only the inbox keeps it from growing twice.
std::unique_ptr<Database> open_migrated(const std::string& url) {
  auto db = store::open_database(url);
  store::migrate(*db);
  db->in_transaction([](Transaction& tx) {
    tx.execute("CREATE TABLE IF NOT EXISTS payments (event_id TEXT NOT NULL, amount INTEGER NOT NULL)");
  });
  return db;
}

InboxKey key_for(const std::string& event_id, const std::string& consumer = "billing") {
  return InboxKey{.consumer = consumer, .event_id = event_id, .subject = "test.orders.order.paid",
                  .stream = "test-orders-events", .stream_seq = 42, .deliveries = 0};
}

Inbox::Handler pay(const std::string& event_id, int amount = 10) {
  return [=](Transaction& tx) {
    tx.execute("INSERT INTO payments (event_id, amount) VALUES ($1, $2)", {event_id, amount});
  };
}

std::int64_t payments(Database& db, const std::string& event_id) {
  std::int64_t n = 0;
  db.in_transaction([&](Transaction& tx) {
    n = tx.query("SELECT count(*) FROM payments WHERE event_id = $1", {event_id}).at(0).as_int(0);
  });
  return n;
}

// ---------------------------------------------------------------------------------------------

void redelivery_changes_the_database_once(const std::string& url) {
  auto db = open_migrated(url);
  auto inbox = make_inbox(*db);

  CHECK(inbox->process(key_for("evt-1"), pay("evt-1")) == InboxResult::processed);
  auto record = inbox->find("billing", "evt-1");
  REQUIRE(record.has_value());
  CHECK(record->status == InboxStatus::processed);
  CHECK(record->deliveries == 1);
  CHECK(record->subject == "test.orders.order.paid");
  CHECK(record->stream == "test-orders-events");
  CHECK(record->stream_seq == 42);
  CHECK_FALSE(record->last_error.has_value());
  REQUIRE(record->processed_at.has_value());
  CHECK(std::chrono::system_clock::now() - *record->processed_at < 60s);

  bool ran = false;
  auto redelivered = key_for("evt-1");
  redelivered.deliveries = 2;
  CHECK(inbox->process(redelivered, [&](Transaction&) { ran = true; }) == InboxResult::duplicate);
  CHECK_FALSE(ran);
  CHECK(inbox->process(key_for("evt-1"), pay("evt-1")) == InboxResult::duplicate);
  CHECK(payments(*db, "evt-1") == 1);

  // Another consumer of the same event processes it on its own.
  CHECK(inbox->process(key_for("evt-1", "shipping"), pay("evt-1")) == InboxResult::processed);
  CHECK(payments(*db, "evt-1") == 2);
  CHECK_FALSE(inbox->find("billing", "evt-unknown").has_value());

  InboxKey no_consumer = key_for("evt-2", "");
  CHECK_THROWS_AS((void)inbox->process(no_consumer, pay("evt-2")), InboxError);
  CHECK_THROWS_AS((void)inbox->process(key_for(""), pay("")), InboxError);
}

void concurrent_deliveries_change_the_database_once(const std::string& url, int instances) {
  { auto db = open_migrated(url); }
  constexpr int kEvents = 4;
  std::atomic<int> processed{0};
  std::atomic<int> duplicates{0};
  std::atomic<int> handler_runs{0};
  run_concurrently(instances, [&](int) {
    auto db = store::open_database(url);  // each instance has its own connection
    auto inbox = make_inbox(*db);
    for (int e = 0; e < kEvents; ++e) {
      auto event_id = "evt-" + std::to_string(e);
      auto result = inbox->process(key_for(event_id), [&](Transaction& tx) {
        handler_runs++;
        tx.execute("INSERT INTO payments (event_id, amount) VALUES ($1, $2)", {event_id, 10});
        std::this_thread::sleep_for(100ms);  // keep the others waiting on this delivery
      });
      (result == InboxResult::processed ? processed : duplicates)++;
    }
  });
  CHECK(processed.load() == kEvents);
  CHECK(duplicates.load() == kEvents * (instances - 1));
  CHECK(handler_runs.load() == kEvents);
  auto db = store::open_database(url);
  for (int e = 0; e < kEvents; ++e) CHECK(payments(*db, "evt-" + std::to_string(e)) == 1);
}

// The first instance fails while the second waits on it: the second then runs the handler.
void concurrent_delivery_after_a_failure_runs_once(const std::string& url) {
  { auto db = open_migrated(url); }
  std::atomic<bool> first_is_inside{false};
  std::atomic<bool> first_threw{false};
  InboxResult second_result = InboxResult::duplicate;
  run_concurrently(2, [&](int i) {
    auto db = store::open_database(url);
    auto inbox = make_inbox(*db);
    if (i == 0) {
      try {
        (void)inbox->process(key_for("evt-x"), [&](Transaction& tx) {
          tx.execute("INSERT INTO payments (event_id, amount) VALUES ($1, $2)", {"evt-x", 1});
          first_is_inside = true;
          std::this_thread::sleep_for(300ms);
          throw std::runtime_error("downstream unavailable");
        });
      } catch (const std::runtime_error&) {
        first_threw = true;
      }
    } else {
      auto deadline = std::chrono::steady_clock::now() + 10s;  // bounded, even if the first never gets there
      while (!first_is_inside.load() && std::chrono::steady_clock::now() < deadline) std::this_thread::sleep_for(1ms);
      REQUIRE(first_is_inside.load());
      second_result = inbox->process(key_for("evt-x"), pay("evt-x", 2));
    }
  });
  CHECK(first_threw.load());
  CHECK(second_result == InboxResult::processed);
  auto db = store::open_database(url);
  CHECK(payments(*db, "evt-x") == 1);
  auto record = make_inbox(*db)->find("billing", "evt-x");
  REQUIRE(record.has_value());
  CHECK(record->status == InboxStatus::processed);  // the late failure record did not overwrite it
}

void failed_handler_leaves_nothing_and_runs_again(const std::string& url) {
  auto db = open_migrated(url);
  auto inbox = make_inbox(*db);

  auto key = key_for("evt-f");
  key.deliveries = 1;
  CHECK_THROWS_WITH_AS((void)inbox->process(key,
                                            [](Transaction& tx) {
                                              tx.execute("INSERT INTO payments (event_id, amount) VALUES ($1, $2)",
                                                         {"evt-f", 99});
                                              throw std::runtime_error("card declined");
                                            }),
                       "card declined", std::runtime_error);
  CHECK(payments(*db, "evt-f") == 0);
  auto record = inbox->find("billing", "evt-f");
  REQUIRE(record.has_value());
  CHECK(record->status == InboxStatus::failed);
  CHECK(record->deliveries == 1);
  CHECK(record->last_error == std::optional<std::string>("card declined"));
  CHECK_FALSE(record->processed_at.has_value());

  // A database error inside the handler: typed, and also recorded.
  key.deliveries = 2;
  CHECK_THROWS_AS((void)inbox->process(key, [](Transaction& tx) { tx.execute("INSERT INTO no_such_table VALUES (1)"); }),
                  store::DatabaseError);
  record = inbox->find("billing", "evt-f");
  REQUIRE(record.has_value());
  CHECK(record->status == InboxStatus::failed);
  CHECK(record->deliveries == 2);
  CHECK(record->last_error.value().find("no_such_table") != std::string::npos);

  // The next delivery succeeds.
  key.deliveries = 0;  // unknown: counted on from the row
  CHECK(inbox->process(key, pay("evt-f")) == InboxResult::processed);
  CHECK(payments(*db, "evt-f") == 1);
  record = inbox->find("billing", "evt-f");
  REQUIRE(record.has_value());
  CHECK(record->status == InboxStatus::processed);
  CHECK(record->deliveries == 3);
  CHECK_FALSE(record->last_error.has_value());
  CHECK(inbox->process(key, pay("evt-f")) == InboxResult::duplicate);
  CHECK(payments(*db, "evt-f") == 1);
}

void cleanup_is_bounded(const std::string& url) {
  auto db = open_migrated(url);
  auto inbox = make_inbox(*db);
  for (int i = 0; i < 15; ++i) {
    auto id = "evt-" + std::to_string(i);
    CHECK(inbox->process(key_for(id), pay(id)) == InboxResult::processed);
  }
  CHECK_THROWS_AS((void)inbox->process(key_for("evt-failed"), [](Transaction&) { throw std::runtime_error("no"); }),
                  std::runtime_error);
  // 12 were processed an hour ago.
  auto backdate = db->backend() == Backend::sqlite
                      ? "UPDATE natspubsub_inbox SET processed_at = processed_at - 3600000 WHERE event_id IN "
                        "(SELECT event_id FROM natspubsub_inbox WHERE status = 'processed' ORDER BY event_id LIMIT 12)"
                      : "UPDATE natspubsub_inbox SET processed_at = processed_at - interval '1 hour' WHERE event_id IN "
                        "(SELECT event_id FROM natspubsub_inbox WHERE status = 'processed' ORDER BY event_id LIMIT 12)";
  db->in_transaction([&](Transaction& tx) { tx.execute(backdate); });
  CHECK(inbox->cleanup_processed(30min, 5) == 5);
  CHECK(inbox->cleanup_processed(30min, 5) == 5);
  CHECK(inbox->cleanup_processed(30min, 5) == 2);
  CHECK(inbox->cleanup_processed(30min, 5) == 0);
  CHECK(inbox->cleanup_processed(0ms, 100) == 3);
  CHECK(inbox->find("billing", "evt-failed").has_value());  // failed rows are kept
}

}  // namespace

TEST_CASE("sqlite: a redelivered event changes the business table once") {
  TempDir dir;
  redelivery_changes_the_database_once(sqlite_url(dir));
}
TEST_CASE("postgres: a redelivered event changes the business table once") {
  redelivery_changes_the_database_once(fresh_postgres_database("inbox_redelivery"));
}

TEST_CASE("sqlite: concurrent deliveries on separate connections change the business table once") {
  TempDir dir;
  concurrent_deliveries_change_the_database_once(sqlite_url(dir), 2);
}
TEST_CASE("postgres: concurrent deliveries on separate connections change the business table once") {
  concurrent_deliveries_change_the_database_once(fresh_postgres_database("inbox_concurrent"), 3);
}

TEST_CASE("sqlite: a delivery waiting on a failing one runs the handler afterwards") {
  TempDir dir;
  concurrent_delivery_after_a_failure_runs_once(sqlite_url(dir));
}
TEST_CASE("postgres: a delivery waiting on a failing one runs the handler afterwards") {
  concurrent_delivery_after_a_failure_runs_once(fresh_postgres_database("inbox_fail_race"));
}

TEST_CASE("sqlite: a failed handler leaves no business row, is recorded, and succeeds later") {
  TempDir dir;
  failed_handler_leaves_nothing_and_runs_again(sqlite_url(dir));
}
TEST_CASE("postgres: a failed handler leaves no business row, is recorded, and succeeds later") {
  failed_handler_leaves_nothing_and_runs_again(fresh_postgres_database("inbox_failed"));
}

TEST_CASE("sqlite: cleanup deletes old processed rows in bounded batches") {
  TempDir dir;
  cleanup_is_bounded(sqlite_url(dir));
}
TEST_CASE("postgres: cleanup deletes old processed rows in bounded batches") {
  cleanup_is_bounded(fresh_postgres_database("inbox_cleanup"));
}
