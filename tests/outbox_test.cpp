// The outbox against real SQLite files and a real PostgreSQL server: enqueue in the caller's
// transaction, claims, marks, backoff, leases, per-key order with concurrent relays, cleanup.
#include <doctest/doctest.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <map>
#include <mutex>
#include <random>
#include <set>
#include <string>
#include <thread>
#include <vector>

#include <pqxx/transaction>

#include <natspubsub/outbox.hpp>
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

std::unique_ptr<Database> open_migrated(const std::string& url) {
  auto db = store::open_database(url);
  store::migrate(*db);
  return db;
}

OutboxMessage message(const std::string& event_id, std::optional<std::string> key = std::nullopt) {
  OutboxMessage m;
  m.event_id = event_id;
  m.subject = "test.orders.order.created";
  m.payload = R"({"event_id":")" + event_id + R"(","message":{}})";
  m.headers = {{"topic", "order.created"}};
  m.partition_key = std::move(key);
  return m;
}

std::int64_t count(Database& db, const std::string& sql) {
  std::int64_t n = 0;
  db.in_transaction([&](Transaction& tx) { n = tx.query(sql).at(0).as_int(0); });
  return n;
}

std::vector<std::int64_t> ids_of(const std::vector<OutboxRow>& rows) {
  std::vector<std::int64_t> ids;
  for (const auto& r : rows) ids.push_back(r.id);
  return ids;
}

std::vector<std::string> events_of(const std::vector<OutboxRow>& rows) {
  std::vector<std::string> events;
  for (const auto& r : rows) events.push_back(r.event_id);
  return events;
}

// ---------------------------------------------------------------------------------------------

void enqueue_commits_and_rolls_back_with_the_business_write(const std::string& url) {
  auto db = open_migrated(url);
  db->in_transaction([](Transaction& tx) { tx.execute("CREATE TABLE orders (id INTEGER PRIMARY KEY, total INTEGER)"); });

  // Rolled back: neither the order nor its event.
  CHECK_THROWS_AS(db->in_transaction([](Transaction& tx) {
    tx.execute("INSERT INTO orders (id, total) VALUES ($1, $2)", {1, 100});
    enqueue(tx, message("evt-rolled-back", "order-1"));
    throw std::runtime_error("payment declined");
  }),
                  std::runtime_error);
  CHECK(count(*db, "SELECT count(*) FROM orders") == 0);
  CHECK(count(*db, "SELECT count(*) FROM natspubsub_outbox") == 0);

  // Committed: both.
  std::int64_t id = 0;
  db->in_transaction([&](Transaction& tx) {
    tx.execute("INSERT INTO orders (id, total) VALUES ($1, $2)", {2, 200});
    id = enqueue(tx, message("evt-committed", "order-2"));
  });
  CHECK(id > 0);
  CHECK(count(*db, "SELECT count(*) FROM orders") == 1);
  CHECK(count(*db, "SELECT count(*) FROM natspubsub_outbox WHERE event_id = 'evt-committed' AND status = 'pending' "
                   "AND attempts = 0 AND partition_key = 'order-2'") == 1);

  // The database-specific transaction types work the same way.
  if (db->backend() == Backend::sqlite) {
    auto& sqlite = dynamic_cast<store::SqliteDatabase&>(*db);
    {
      auto txn = sqlite.begin();
      txn.execute("INSERT INTO orders (id, total) VALUES ($1, $2)", {3, 300});
      enqueue(txn, message("evt-sqlite-dropped"));
    }  // not committed
    auto txn = sqlite.begin();
    txn.execute("INSERT INTO orders (id, total) VALUES ($1, $2)", {4, 400});
    enqueue(txn, message("evt-sqlite-committed"));
    txn.commit();
  } else {
    auto& pg = dynamic_cast<store::PostgresDatabase&>(*db);
    {
      pqxx::work txn(pg.connection());
      txn.exec_params("INSERT INTO orders (id, total) VALUES ($1, $2)", 3, 300);
      enqueue(txn, message("evt-pg-dropped", "order-3"));
      txn.abort();
    }
    pqxx::work txn(pg.connection());
    txn.exec_params("INSERT INTO orders (id, total) VALUES ($1, $2)", 4, 400);
    enqueue(txn, message("evt-pg-committed", "order-4"));
    txn.commit();
  }
  CHECK(count(*db, "SELECT count(*) FROM orders") == 2);
  CHECK(count(*db, "SELECT count(*) FROM natspubsub_outbox") == 2);
  CHECK(count(*db, "SELECT count(*) FROM orders WHERE id = 4") == 1);

  // A second event with the same event_id is refused, and takes its business write with it.
  CHECK_THROWS_AS(db->in_transaction([](Transaction& tx) {
    tx.execute("INSERT INTO orders (id, total) VALUES ($1, $2)", {5, 500});
    enqueue(tx, message("evt-committed"));
  }),
                  store::UniqueViolationError);
  CHECK(count(*db, "SELECT count(*) FROM orders WHERE id = 5") == 0);

  // Invalid messages never reach the database.
  auto no_id = message("");
  auto bad_headers = message("evt-bad-headers");
  bad_headers.headers = nlohmann::json::array();
  auto number_header = message("evt-number-header");
  number_header.headers = {{"retries", 3}};
  auto empty_key = message("evt-empty-key", "");
  auto spaced = message("evt-spaced");
  spaced.subject = "orders created";
  for (const auto& bad : {no_id, bad_headers, number_header, empty_key, spaced}) {
    CHECK_THROWS_AS(db->in_transaction([&](Transaction& tx) { enqueue(tx, bad); }), OutboxError);
  }
}

void hand_inserted_row_is_a_valid_pending_event(const std::string& url) {
  auto db = open_migrated(url);
  db->in_transaction([](Transaction& tx) {
    // What a trigger or a service in another language would write: no status, no times.
    tx.execute("INSERT INTO natspubsub_outbox (event_id, subject, payload) VALUES ($1, $2, $3)",
               {"hand-1", "test.orders.order.created", "{\"n\":1}"});
    tx.execute("INSERT INTO natspubsub_outbox (event_id, subject, payload, headers, partition_key) "
               "VALUES ($1, $2, $3, $4, $5)",
               {"hand-2", "test.orders.order.paid", "{\"n\":2}", R"({"topic":"order.paid"})", "order-9"});
  });
  auto stats = make_outbox_store(*db)->stats();
  CHECK(stats.pending == 2);
  REQUIRE(stats.oldest_unsent_age.has_value());
  CHECK(*stats.oldest_unsent_age < 60s);

  auto rows = make_outbox_store(*db)->claim("relay-1", 10, 30s);
  REQUIRE(rows.size() == 2);
  CHECK(rows[0].event_id == "hand-1");
  CHECK(rows[0].subject == "test.orders.order.created");
  CHECK(rows[0].payload == "{\"n\":1}");
  CHECK(rows[0].headers == nlohmann::json::object());
  CHECK_FALSE(rows[0].partition_key.has_value());
  CHECK(rows[0].status == OutboxStatus::publishing);
  CHECK(rows[0].attempts == 0);
  auto age = std::chrono::system_clock::now() - rows[0].created_at;
  CHECK(age < 60s);
  CHECK(age > -60s);
  CHECK(rows[1].headers == nlohmann::json{{"topic", "order.paid"}});
  CHECK(rows[1].partition_key == std::optional<std::string>("order-9"));

  // Headers that are not a JSON object are refused by the schema itself.
  CHECK_THROWS_AS(db->in_transaction([](Transaction& tx) {
    tx.execute("INSERT INTO natspubsub_outbox (event_id, subject, payload, headers) VALUES ('h3', 's', 'p', '[1]')");
  }),
                  store::DatabaseError);
}

void claim_mark_fail_backoff_and_give_up(const std::string& url) {
  auto db = open_migrated(url);
  auto store = make_outbox_store(*db);
  db->in_transaction([](Transaction& tx) {
    for (int i = 1; i <= 3; ++i) enqueue(tx, message("evt-" + std::to_string(i)));
  });

  // Batches in id order; a second relay gets the rest.
  auto first = store->claim("relay-1", 2, 30s);
  CHECK(events_of(first) == std::vector<std::string>{"evt-1", "evt-2"});
  auto second = store->claim("relay-2", 10, 30s);
  REQUIRE(events_of(second) == std::vector<std::string>{"evt-3"});
  CHECK(store->claim("relay-3", 10, 30s).empty());
  CHECK(store->stats().publishing == 3);

  // Marks only touch rows the relay holds.
  auto first_ids = ids_of(first);
  CHECK(store->mark_sent("relay-2", first_ids) == 0);
  CHECK(store->mark_sent("relay-1", first_ids) == 2);
  CHECK(store->mark_sent("relay-1", first_ids) == 0);
  CHECK(count(*db, "SELECT count(*) FROM natspubsub_outbox WHERE status = 'sent' AND sent_at IS NOT NULL "
                   "AND locked_by IS NULL") == 2);

  // A failed publish: back to pending, not claimable before the backoff has passed.
  auto id3 = second[0].id;
  std::vector<OutboxFailure> failure{{id3, "nats: timeout", 400ms}};
  auto result = store->mark_failed("relay-2", failure, 3);
  CHECK(result.rescheduled == std::vector<std::int64_t>{id3});
  CHECK(result.failed.empty());
  CHECK(store->claim("relay-2", 10, 30s).empty());
  std::this_thread::sleep_for(500ms);
  auto retry = store->claim("relay-2", 10, 30s);
  REQUIRE(retry.size() == 1);
  CHECK(retry[0].attempts == 1);
  CHECK(retry[0].last_error == std::optional<std::string>("nats: timeout"));

  // Attempts 2 and 3 fail without delay; the third reaches the maximum: failed.
  failure[0].retry_delay = 0ms;
  failure[0].error = "nats: no responders";
  CHECK(store->mark_failed("relay-2", failure, 3).rescheduled.size() == 1);
  REQUIRE(store->claim("relay-2", 10, 30s).size() == 1);
  result = store->mark_failed("relay-2", failure, 3);
  CHECK(result.failed == std::vector<std::int64_t>{id3});
  CHECK(store->claim("relay-2", 10, 30s).empty());

  auto stats = store->stats();
  CHECK(stats.pending == 0);
  CHECK(stats.sent == 2);
  CHECK(stats.failed == 1);
  CHECK_FALSE(stats.oldest_unsent_age.has_value());

  auto failed = store->list_failed(10);
  REQUIRE(failed.size() == 1);
  CHECK(failed[0].status == OutboxStatus::failed);
  CHECK(failed[0].attempts == 3);
  CHECK(failed[0].last_error == std::optional<std::string>("nats: no responders"));

  // The operator retries: pending again with fresh attempts.
  CHECK(store->retry_failed(std::vector<std::int64_t>{id3}) == 1);
  auto again = store->claim("relay-1", 10, 30s);
  REQUIRE(again.size() == 1);
  CHECK(again[0].attempts == 0);

  // Release (shutdown) gives it back at once, attempts unchanged; renew extends a lease.
  CHECK(store->renew_lease("relay-1", ids_of(again), 60s) == 1);
  CHECK(store->renew_lease("relay-2", ids_of(again), 60s) == 0);
  CHECK(store->release("relay-1", ids_of(again)) == 1);
  again = store->claim("relay-1", 10, 30s);
  REQUIRE(again.size() == 1);
  CHECK(again[0].attempts == 0);

  // Retention "delete".
  CHECK(store->delete_sent("relay-1", ids_of(again)) == 1);
  CHECK(count(*db, "SELECT count(*) FROM natspubsub_outbox") == 2);

  // Giving up at once, then retry_all_failed.
  db->in_transaction([](Transaction& tx) { enqueue(tx, message("evt-4")); });
  auto four = store->claim("relay-1", 10, 30s);
  REQUIRE(four.size() == 1);
  CHECK(store->mark_failed("relay-1", std::vector<OutboxFailure>{{four[0].id, std::string(5000, 'x'), 0ms}}, 1)
            .failed.size() == 1);
  auto stored_error = store->list_failed(10).at(0).last_error.value();
  CHECK(stored_error.size() < 2100);  // bounded
  CHECK(store->retry_all_failed() == 1);
  CHECK(store->claim("relay-1", 10, 30s).size() == 1);
}

void expired_lease_makes_rows_claimable(const std::string& url) {
  auto db = open_migrated(url);
  auto store = make_outbox_store(*db);
  db->in_transaction([](Transaction& tx) {
    enqueue(tx, message("lease-1", "k"));
    enqueue(tx, message("lease-2", "k"));
  });
  auto held = store->claim("dead-relay", 10, 300ms);
  REQUIRE(held.size() == 2);
  CHECK(store->claim("relay-2", 10, 30s).empty());  // lease still running
  std::this_thread::sleep_for(450ms);
  auto taken = store->claim("relay-2", 10, 30s);
  CHECK(events_of(taken) == std::vector<std::string>{"lease-1", "lease-2"});
  // The old holder lost them: its marks change nothing.
  CHECK(store->mark_sent("dead-relay", ids_of(held)) == 0);
  CHECK(store->mark_failed("dead-relay", std::vector<OutboxFailure>{{held[0].id, "late", 0ms}}, 5).rescheduled.empty());
  CHECK(store->mark_sent("relay-2", ids_of(taken)) == 2);
}

void per_key_order_rules(const std::string& url) {
  auto db = open_migrated(url);
  auto store = make_outbox_store(*db);
  db->in_transaction([](Transaction& tx) {
    enqueue(tx, message("A1", "A"));
    enqueue(tx, message("A2", "A"));
    enqueue(tx, message("B1", "B"));
    enqueue(tx, message("A3", "A"));
    enqueue(tx, message("N1"));
    enqueue(tx, message("B2", "B"));
  });

  // relay-1 takes the first two rows; a consecutive run of one key in one batch is allowed.
  auto r1 = store->claim("relay-1", 2, 30s);
  CHECK(events_of(r1) == std::vector<std::string>{"A1", "A2"});
  // relay-2 may not take A3 while A1 and A2 are held elsewhere; everything else it may.
  auto r2 = store->claim("relay-2", 10, 30s);
  CHECK(events_of(r2) == std::vector<std::string>{"B1", "N1", "B2"});

  // A1 fails (backoff); relay-1 gives A2 back instead of publishing it after A1 failed.
  CHECK(store->mark_failed("relay-1", std::vector<OutboxFailure>{{r1[0].id, "boom", 400ms}}, 5).rescheduled.size() == 1);
  CHECK(store->release("relay-1", std::vector<std::int64_t>{r1[1].id}) == 1);
  CHECK(store->claim("relay-3", 10, 30s).empty());  // A2 and A3 wait behind A1's backoff
  std::this_thread::sleep_for(500ms);
  auto r3 = store->claim("relay-3", 10, 30s);
  CHECK(events_of(r3) == std::vector<std::string>{"A1", "A2", "A3"});

  // A failed row blocks its key until the operator acts; other keys go on.
  CHECK(store->mark_failed("relay-3", std::vector<OutboxFailure>{{r3[0].id, "poison", 0ms}}, 1).failed.size() == 1);
  CHECK(store->release("relay-3", std::vector<std::int64_t>{r3[1].id, r3[2].id}) == 2);
  db->in_transaction([](Transaction& tx) { enqueue(tx, message("C1", "C")); });
  CHECK(events_of(store->claim("relay-3", 10, 30s)) == std::vector<std::string>{"C1"});
  CHECK(store->retry_all_failed() == 1);
  CHECK(events_of(store->claim("relay-3", 10, 30s)) == std::vector<std::string>{"A1", "A2", "A3"});
}

// Several relays, each with its own connection, claim until everything is published. Publishing
// is simulated by appending to a shared log under a mutex; one publish in ten fails, and then
// the relay, as a real one must, releases the later rows of that key in its batch unpublished.
// Afterwards: every event published exactly once, and each key's events in id order.
void concurrent_relays_keep_per_key_order(const std::string& url, int relays) {
  constexpr int kEvents = 240;
  {
    auto db = open_migrated(url);
    db->in_transaction([](Transaction& tx) {
      for (int i = 0; i < kEvents; ++i) {
        std::optional<std::string> key;
        if (i % 9 != 0) key = "key-" + std::to_string(i % 5);
        enqueue(tx, message("evt-" + std::to_string(i), key));
      }
    });
  }
  std::mutex mutex;
  std::vector<std::pair<std::string, std::int64_t>> log;  // (key, id) in publish order
  std::map<std::int64_t, int> published;
  std::atomic<int> done{0};
  std::atomic<int> overlaps{0};
  auto deadline = std::chrono::steady_clock::now() + 60s;

  run_concurrently(relays, [&](int r) {
    auto db = store::open_database(url);
    auto store = make_outbox_store(*db);
    auto relay = "relay-" + std::to_string(r);
    std::mt19937 random(static_cast<unsigned>(r) * 7919u + 1u);
    std::set<std::int64_t> mine;
    while (done.load() < kEvents && std::chrono::steady_clock::now() < deadline) {
      auto rows = store->claim(relay, 1 + random() % 6, 30s);
      if (rows.empty()) {
        std::this_thread::sleep_for(2ms);
        continue;
      }
      std::vector<std::int64_t> sent;
      std::vector<std::int64_t> give_back;
      std::vector<OutboxFailure> failed;
      std::set<std::string> broken_keys;
      for (const auto& row : rows) {
        auto key = row.partition_key.value_or("");
        if (row.partition_key && broken_keys.contains(key)) {
          give_back.push_back(row.id);
          continue;
        }
        if (random() % 10 == 0) {
          failed.push_back({row.id, "simulated PubAck error", 0ms});
          if (row.partition_key) broken_keys.insert(key);
          continue;
        }
        {
          std::lock_guard lock(mutex);
          log.emplace_back(key, row.id);
          if (++published[row.id] > 1) overlaps++;
        }
        sent.push_back(row.id);
      }
      if (random() % 3 == 0) std::this_thread::sleep_for(1ms);  // let other relays interleave
      if (!failed.empty()) store->mark_failed(relay, failed, 1000);
      if (!give_back.empty()) store->release(relay, give_back);
      if (!sent.empty()) {
        CHECK(store->mark_sent(relay, sent) == sent.size());
        done += static_cast<int>(sent.size());
      }
    }
  });

  CHECK(done.load() == kEvents);
  CHECK(overlaps.load() == 0);
  CHECK(published.size() == static_cast<std::size_t>(kEvents));
  std::map<std::string, std::int64_t> last;
  int out_of_order = 0;
  for (const auto& [key, id] : log) {
    if (key.empty()) continue;
    if (last.contains(key) && last[key] > id) out_of_order++;
    last[key] = id;
  }
  CHECK(out_of_order == 0);
  auto db = store::open_database(url);
  CHECK(make_outbox_store(*db)->stats().sent == kEvents);
}

void cleanup_is_bounded(const std::string& url) {
  auto db = open_migrated(url);
  auto store = make_outbox_store(*db);
  db->in_transaction([](Transaction& tx) {
    for (int i = 0; i < 25; ++i) enqueue(tx, message("old-" + std::to_string(i)));
  });
  auto rows = store->claim("relay", 100, 30s);
  REQUIRE(rows.size() == 25);
  CHECK(store->mark_sent("relay", ids_of(rows)) == 25);
  db->in_transaction([](Transaction& tx) { enqueue(tx, message("still-pending")); });
  // 23 were sent an hour ago, 2 just now.
  auto backdate = db->backend() == Backend::sqlite
                      ? "UPDATE natspubsub_outbox SET sent_at = sent_at - 3600000 WHERE status = 'sent' AND id <= $1"
                      : "UPDATE natspubsub_outbox SET sent_at = sent_at - interval '1 hour' WHERE status = 'sent' AND id <= $1";
  db->in_transaction([&](Transaction& tx) { tx.execute(backdate, {rows[22].id}); });

  CHECK(store->cleanup_sent(30min, 10) == 10);
  CHECK(store->cleanup_sent(30min, 10) == 10);
  CHECK(store->cleanup_sent(30min, 10) == 3);
  CHECK(store->cleanup_sent(30min, 10) == 0);
  auto stats = store->stats();
  CHECK(stats.sent == 2);
  CHECK(stats.pending == 1);
  CHECK(store->cleanup_sent(0ms, 10) == 2);
  CHECK(store->stats().pending == 1);
}

}  // namespace

TEST_CASE("sqlite: enqueue commits and rolls back with the business write") {
  TempDir dir;
  enqueue_commits_and_rolls_back_with_the_business_write(sqlite_url(dir));
}
TEST_CASE("postgres: enqueue commits and rolls back with the business write") {
  enqueue_commits_and_rolls_back_with_the_business_write(fresh_postgres_database("outbox_enqueue"));
}

TEST_CASE("sqlite: a hand-inserted row with event_id, subject, payload is a pending event") {
  TempDir dir;
  hand_inserted_row_is_a_valid_pending_event(sqlite_url(dir));
}
TEST_CASE("postgres: a hand-inserted row with event_id, subject, payload is a pending event") {
  hand_inserted_row_is_a_valid_pending_event(fresh_postgres_database("outbox_hand"));
}

TEST_CASE("sqlite: claim, mark sent, failed attempts with backoff, failed after the maximum") {
  TempDir dir;
  claim_mark_fail_backoff_and_give_up(sqlite_url(dir));
}
TEST_CASE("postgres: claim, mark sent, failed attempts with backoff, failed after the maximum") {
  claim_mark_fail_backoff_and_give_up(fresh_postgres_database("outbox_claim"));
}

TEST_CASE("sqlite: rows of a relay whose lease expired are claimable again") {
  TempDir dir;
  expired_lease_makes_rows_claimable(sqlite_url(dir));
}
TEST_CASE("postgres: rows of a relay whose lease expired are claimable again") {
  expired_lease_makes_rows_claimable(fresh_postgres_database("outbox_lease"));
}

TEST_CASE("sqlite: per-key order: runs of one key, waiting behind held, backing-off and failed rows") {
  TempDir dir;
  per_key_order_rules(sqlite_url(dir));
}
TEST_CASE("postgres: per-key order: runs of one key, waiting behind held, backing-off and failed rows") {
  per_key_order_rules(fresh_postgres_database("outbox_order"));
}

// The relay's claim ahead marks the last batch in the claim's transaction: the claim already
// sees those rows sent, so the next rows of their keys come in the same call.
void mark_sent_and_claim_in_one(const std::string& url) {
  auto db = open_migrated(url);
  auto store = make_outbox_store(*db);
  db->in_transaction([](Transaction& tx) {
    for (int i = 0; i < 3; ++i) enqueue(tx, message("k-" + std::to_string(i), "k"));
    enqueue(tx, message("d-0", "d"));
    enqueue(tx, message("d-1", "d"));
  });
  auto first = store->claim("relay-1", 1, 30s);
  REQUIRE(events_of(first) == std::vector<std::string>{"k-0"});
  auto second = store->mark_sent_and_claim("relay-1", ids_of(first), false, 1, 30s, std::numeric_limits<std::int64_t>::max());
  CHECK(events_of(second) == std::vector<std::string>{"k-1"});
  CHECK(count(*db, "SELECT count(*) FROM natspubsub_outbox WHERE status = 'sent'") == 1);
  auto third = store->mark_sent_and_claim("relay-1", ids_of(second), true, 10, 30s, std::numeric_limits<std::int64_t>::max());
  CHECK(events_of(third) == std::vector<std::string>{"k-2", "d-0", "d-1"});
  CHECK(count(*db, "SELECT count(*) FROM natspubsub_outbox") == 4);  // k-1 deleted
  // Marks only what relay-1 holds: relay-2's ids are left alone.
  CHECK(store->mark_sent_and_claim("relay-2", ids_of(third), false, 10, 30s, std::numeric_limits<std::int64_t>::max()).empty());
  CHECK(count(*db, "SELECT count(*) FROM natspubsub_outbox WHERE status = 'publishing'") == 3);

  // relay-1's batch outlives its lease while still publishing: its claim ahead does not take
  // those rows back, nor the rows behind them; another relay may.
  db->in_transaction([](Transaction& tx) {
    enqueue(tx, message("d-2", "d"));
    enqueue(tx, message("u-0"));
  });
  CHECK(store->release("relay-1", ids_of(third)) == 3);
  auto short_lease = store->claim("relay-1", 3, 50ms);
  REQUIRE(events_of(short_lease) == std::vector<std::string>{"k-2", "d-0", "d-1"});
  std::this_thread::sleep_for(150ms);
  CHECK(events_of(store->mark_sent_and_claim("relay-1", {}, false, 10, 30s, std::numeric_limits<std::int64_t>::max())) ==
        std::vector<std::string>{"u-0"});
  CHECK(events_of(store->claim("relay-2", 10, 30s)) == std::vector<std::string>{"k-2", "d-0", "d-1", "d-2"});
}

TEST_CASE("sqlite: mark_sent_and_claim marks and claims in one transaction, the claim seeing the marks") {
  TempDir dir;
  mark_sent_and_claim_in_one(sqlite_url(dir));
}
TEST_CASE("postgres: mark_sent_and_claim marks and claims in one transaction, the claim seeing the marks") {
  mark_sent_and_claim_in_one(fresh_postgres_database("outbox_mark_claim"));
}

// PostgreSQL claims look at a bounded window of unsent rows (src/store/postgres_outbox.cpp), so
// that a claim while another relay holds the head of every key stays cheap. The window must not
// let a key with many due rows behind a long-lived blocker (failed, in backoff, scheduled later)
// starve the others: those keys are left out of the window. With a batch of 10 the window is
// 40 rows; each blocked key here has 100 due rows behind its blocker.
TEST_CASE("postgres: the claim window leaves out keys behind failed, backing-off and scheduled rows") {
  const auto url = fresh_postgres_database("outbox_window");
  auto db = open_migrated(url);
  auto store = make_outbox_store(*db);
  db->in_transaction([](Transaction& tx) {
    for (const std::string key : {"failed", "backoff", "later"})
      for (int i = 0; i < 101; ++i) enqueue(tx, message(key + "-" + std::to_string(i), key));
    for (int i = 0; i < 6; ++i) enqueue(tx, message("free-" + std::to_string(i), "free"));
    for (int i = 0; i < 6; ++i) enqueue(tx, message("unkeyed-" + std::to_string(i)));
  });
  // The heads of the three keys: failed for good, in backoff for a minute, and written by hand
  // to be published an hour from now (attempts 0).
  auto heads = store->claim("relay-1", 1, 30s);
  REQUIRE(events_of(heads) == std::vector<std::string>{"failed-0"});
  CHECK(store->mark_failed("relay-1", std::vector<OutboxFailure>{{heads[0].id, "poison", 0ms}}, 1).failed.size() == 1);
  db->in_transaction([](Transaction& tx) {
    tx.execute("UPDATE natspubsub_outbox SET attempts = 1, next_attempt_at = now() + interval '1 minute' "
               "WHERE event_id = 'backoff-0'");
    tx.execute("UPDATE natspubsub_outbox SET next_attempt_at = now() + interval '1 hour' WHERE event_id = 'later-0'");
  });

  auto rows = store->claim("relay-1", 10, 30s);
  std::vector<std::string> expected;
  for (int i = 0; i < 6; ++i) expected.push_back("free-" + std::to_string(i));
  for (int i = 0; i < 4; ++i) expected.push_back("unkeyed-" + std::to_string(i));
  CHECK(events_of(rows) == expected);
  CHECK(events_of(store->claim("relay-1", 10, 30s)) == std::vector<std::string>{"unkeyed-4", "unkeyed-5"});

  // The backoff over, its key runs again, in order, the window now starting at it.
  db->in_transaction([](Transaction& tx) {
    tx.execute("UPDATE natspubsub_outbox SET next_attempt_at = now() WHERE event_id = 'backoff-0'");
  });
  auto again = store->claim("relay-1", 10, 30s);
  REQUIRE(again.size() == 10);
  for (int i = 0; i < 10; ++i) CHECK(again[static_cast<std::size_t>(i)].event_id == "backoff-" + std::to_string(i));
}

// Rows that are not due themselves (backoff, scheduled later) and rows other relays hold do not
// fill the window either: with a batch of 10 (window 40), 50 unkeyed rows in backoff and 50 held
// by two other relays come before the due ones.
TEST_CASE("postgres: the claim window skips rows in backoff and rows other relays hold") {
  const auto url = fresh_postgres_database("outbox_window_due");
  auto db = open_migrated(url);
  auto store = make_outbox_store(*db);
  db->in_transaction([](Transaction& tx) {
    for (int i = 0; i < 150; ++i) enqueue(tx, message("u-" + std::to_string(i)));
  });
  db->in_transaction([](Transaction& tx) {
    tx.execute("UPDATE natspubsub_outbox SET attempts = 2, next_attempt_at = now() + interval '10 minutes' "
               "WHERE id IN (SELECT id FROM natspubsub_outbox ORDER BY id LIMIT 50)");
  });
  CHECK(store->claim("relay-1", 25, 30s).size() == 25);
  CHECK(store->claim("relay-2", 25, 30s).size() == 25);
  auto rows = store->claim("relay-3", 10, 30s);
  REQUIRE(rows.size() == 10);
  CHECK(rows.front().event_id == "u-100");
}

// Another relay's batch holds the earliest rows of every key: a claim finds nothing claimable in
// its window and returns empty (the benchmark relay_postgres_scaling measures what that costs);
// once those rows are sent the next claim takes the following rows of every key, in order.
TEST_CASE("postgres: a claim behind another relay's batch over every key returns empty, then continues in order") {
  const auto url = fresh_postgres_database("outbox_window_held");
  auto db = open_migrated(url);
  auto store = make_outbox_store(*db);
  constexpr int kKeys = 10;
  db->in_transaction([](Transaction& tx) {
    for (int i = 0; i < 1000; ++i) enqueue(tx, message("e-" + std::to_string(i), "k" + std::to_string(i % kKeys)));
  });
  auto first = store->claim("relay-1", 20, 30s);  // two rows of every key
  REQUIRE(first.size() == 20);
  CHECK(store->claim("relay-2", 20, 30s).empty());
  CHECK(store->mark_sent("relay-1", ids_of(first)) == 20);
  auto next = store->claim("relay-2", 20, 30s);
  REQUIRE(next.size() == 20);
  for (int i = 0; i < 20; ++i) CHECK(next[static_cast<std::size_t>(i)].event_id == "e-" + std::to_string(20 + i));
}

TEST_CASE("sqlite: concurrent relays never claim the same row and keep per-key order") {
  TempDir dir;
  concurrent_relays_keep_per_key_order(sqlite_url(dir), 3);
}
TEST_CASE("postgres: concurrent relays never claim the same row and keep per-key order") {
  concurrent_relays_keep_per_key_order(fresh_postgres_database("outbox_concurrent"), 4);
}

TEST_CASE("sqlite: cleanup deletes old sent rows in bounded batches") {
  TempDir dir;
  cleanup_is_bounded(sqlite_url(dir));
}
TEST_CASE("postgres: cleanup deletes old sent rows in bounded batches") {
  cleanup_is_bounded(fresh_postgres_database("outbox_cleanup"));
}
