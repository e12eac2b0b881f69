// Held claims (src/store/postgres_held_claims.hpp) against a real PostgreSQL: a batch held by
// row locks keeps other claims off its rows and off the later rows of its keys, lets go of what
// it does not keep, writes its outcome once, and gives everything back when it is abandoned,
// when its connection dies, or when it stays idle past the lease.
#include <doctest/doctest.h>

#include <atomic>
#include <chrono>
#include <limits>
#include <map>
#include <mutex>
#include <optional>
#include <random>
#include <set>
#include <string>
#include <thread>
#include <vector>

#include <natspubsub/outbox.hpp>
#include <natspubsub/store/migrations.hpp>
#include <natspubsub/store/postgres.hpp>

#include "store/postgres_held_claims.hpp"
#include "support/databases.hpp"

using namespace natspubsub;
using namespace std::chrono_literals;
using natspubsub::detail::HeldClaims;
using natspubsub::detail::HeldOutcome;
using natspubsub::store::Transaction;
using natspubsub::testing::fresh_postgres_database;
using natspubsub::testing::run_concurrently;

namespace {

struct Outbox {
  std::string url;
  std::unique_ptr<store::PostgresDatabase> db;
  explicit Outbox(const std::string& name) : url(fresh_postgres_database(name)) {
    db = std::make_unique<store::PostgresDatabase>(url);
    store::migrate(*db);
  }
  void add(const std::string& event_id, std::optional<std::string> key = std::nullopt) {
    db->in_transaction([&](Transaction& tx) {
      OutboxMessage m;
      m.event_id = event_id;
      m.subject = "test.orders.order.created";
      m.payload = "{}";
      m.partition_key = std::move(key);
      enqueue(tx, m);
    });
  }
  std::int64_t count(const std::string& where) {
    return db->query("SELECT count(*) FROM natspubsub_outbox WHERE " + where).at(0).as_int(0);
  }
};

std::vector<std::string> events_of(const std::vector<OutboxRow>& rows) {
  std::vector<std::string> out;
  for (const auto& r : rows) out.push_back(r.event_id);
  return out;
}

std::vector<std::int64_t> ids_of(const std::vector<OutboxRow>& rows) {
  std::vector<std::int64_t> out;
  for (const auto& r : rows) out.push_back(r.id);
  return out;
}

store::DatabaseUrl parsed(const std::string& url) { return store::DatabaseUrl::parse(url); }

HeldOutcome all_sent(const std::vector<OutboxRow>& rows) {
  HeldOutcome outcome;
  outcome.sent = ids_of(rows);
  return outcome;
}

}  // namespace

TEST_CASE("held claims: others take neither the held rows nor the later rows of their keys, and are not kept off the rest") {
  Outbox outbox("held_keys");
  for (int i = 0; i < 10; ++i) outbox.add("e-" + std::to_string(i), "k" + std::to_string(i % 2));
  for (int i = 0; i < 5; ++i) outbox.add("u-" + std::to_string(i));
  HeldClaims claims(parsed(outbox.url), 30s);

  auto a = claims.claim(2, std::numeric_limits<std::int64_t>::max());  // the head of both keys
  REQUIRE(events_of(a->rows()) == std::vector<std::string>{"e-0", "e-1"});

  // Every keyed row left is behind a row `a` holds, which looks pending and due to any query:
  // only the unkeyed rows may be taken.
  auto b = claims.claim(20, std::numeric_limits<std::int64_t>::max());
  CHECK(events_of(b->rows()) == std::vector<std::string>{"u-0", "u-1", "u-2", "u-3", "u-4"});

  // `b` locked the keyed rows on its way and let them go: once `a` is written, a third claim
  // takes them, in order, while `b` is still open.
  CHECK(a->finish(all_sent(a->rows())).failed.empty());
  auto c = claims.claim(20, std::numeric_limits<std::int64_t>::max());
  std::vector<std::string> expected;
  for (int i = 2; i < 10; ++i) expected.push_back("e-" + std::to_string(i));
  CHECK(events_of(c->rows()) == expected);
  c->finish(all_sent(c->rows()));
  b->finish(all_sent(b->rows()));
  CHECK(outbox.count("status = 'sent'") == 15);
  CHECK(outbox.count("locked_by IS NOT NULL OR attempts <> 0") == 0);
}

TEST_CASE("held claims: a claim that starts after an id takes nothing before it, and keeps the per-key rule") {
  Outbox outbox("held_after");
  // k0: e-0 e-2 e-4, k1: e-1 e-3 e-5, then two unkeyed rows.
  for (int i = 0; i < 6; ++i) outbox.add("e-" + std::to_string(i), "k" + std::to_string(i % 2));
  outbox.add("u-0");
  outbox.add("u-1");
  HeldClaims claims(parsed(outbox.url), 30s);
  const auto all = std::numeric_limits<std::int64_t>::max();
  std::map<std::string, std::int64_t> id;
  for (const auto& r : outbox.db->query("SELECT event_id, id FROM natspubsub_outbox")) id[r.as_text(0)] = r.as_int(1);

  // Nothing is held or sent: after e-1, the keyed rows all have an earlier unsent row of their
  // key before the start, so only the unkeyed rows may be taken.
  auto a = claims.claim(20, all, id["e-1"]);
  CHECK(events_of(a->rows()) == std::vector<std::string>{"u-0", "u-1"});
  CHECK(a->resume_after() == id["e-2"] - 1);  // a claim after it looks at e-2 again
  a->abandon();

  // Once e-0 is sent, k0's next rows (after the start) are its first unsent ones: taken in order.
  auto head = claims.claim(1, all);
  REQUIRE(events_of(head->rows()) == std::vector<std::string>{"e-0"});
  head->finish(all_sent(head->rows()));
  auto b = claims.claim(20, all, id["e-1"]);
  CHECK(events_of(b->rows()) == std::vector<std::string>{"e-2", "e-4", "u-0", "u-1"});
  CHECK(b->resume_after() == id["e-3"] - 1);
  // And a claim from the start, while `b` is open, takes k1 only.
  auto c = claims.claim(20, all);
  CHECK(events_of(c->rows()) == std::vector<std::string>{"e-1", "e-3", "e-5"});
  b->finish(all_sent(b->rows()));
  c->finish(all_sent(c->rows()));
  CHECK(outbox.count("status = 'sent'") == 8);
}

TEST_CASE("held claims: one write per outcome; a failed row keeps the later rows of its key waiting") {
  Outbox outbox("held_outcome");
  for (int i = 0; i < 3; ++i) outbox.add("a-" + std::to_string(i), "ka");
  for (int i = 0; i < 3; ++i) outbox.add("b-" + std::to_string(i), "kb");
  outbox.add("c-0", "kc");
  outbox.add("d-0");
  HeldClaims claims(parsed(outbox.url), 30s);
  const auto all = std::numeric_limits<std::int64_t>::max();

  auto batch = claims.claim(100, all);
  REQUIRE(batch->rows().size() == 8);
  std::map<std::string, std::int64_t> id;
  for (const auto& r : batch->rows()) id[r.event_id] = r.id;
  // a-0 fails (retried in a minute), b-0 is refused (failed now), c-0 and d-0 are sent; the rest
  // of ka and kb was not published: left as it was.
  HeldOutcome outcome;
  outcome.sent = {id["c-0"], id["d-0"]};
  outcome.failures = {{id["a-0"], "timeout", 60s}};
  outcome.max_attempts = 5;
  outcome.refused = {{id["b-0"], "not publishable: bad subject", 0ms}};
  auto result = batch->finish(outcome);
  CHECK(result.rescheduled == std::vector<std::int64_t>{id["a-0"]});
  CHECK(result.failed == std::vector<std::int64_t>{id["b-0"]});
  CHECK(outbox.count("status = 'sent'") == 2);
  CHECK(outbox.count("status = 'failed' AND attempts = 1 AND event_id = 'b-0'") == 1);
  CHECK(outbox.count("status = 'pending' AND attempts = 1 AND next_attempt_at > now() AND event_id = 'a-0'") == 1);
  CHECK(outbox.count("status = 'pending' AND attempts = 0 AND event_id IN ('a-1', 'a-2', 'b-1', 'b-2')") == 4);

  // Both keys wait behind their head: nothing is claimable.
  auto next = claims.claim(100, all);
  CHECK(next->rows().empty());
}

TEST_CASE("held claims: an abandoned batch, a dead connection and a batch idle past the lease give the rows back as they were") {
  Outbox outbox("held_give_back");
  for (int i = 0; i < 5; ++i) outbox.add("e-" + std::to_string(i), "k");
  const auto all = std::numeric_limits<std::int64_t>::max();
  {
    HeldClaims claims(parsed(outbox.url), 30s);
    auto a = claims.claim(5, all);
    REQUIRE(a->rows().size() == 5);
    a->abandon();
    auto b = claims.claim(5, all);
    CHECK(events_of(b->rows()) == std::vector<std::string>{"e-0", "e-1", "e-2", "e-3", "e-4"});
    // The relay process dies: its connection ends, PostgreSQL rolls its transaction back.
    CHECK(outbox.db->query("SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
                           "WHERE datname = current_database() AND state LIKE 'idle in transaction%'")
              .at(0)
              .as_int(0) == 1);
    HeldClaims other(parsed(outbox.url), 30s);
    auto c = other.claim(5, all);
    CHECK(c->rows().size() == 5);
    CHECK_THROWS_AS(b->finish(all_sent(b->rows())), store::DatabaseError);
    c->abandon();
  }
  // Idle in its transaction longer than the lease (a relay cut off from PostgreSQL): the server
  // ends it, the rows are claimable again, and the late outcome is refused.
  HeldClaims claims(parsed(outbox.url), 300ms);
  auto slow = claims.claim(5, all);
  REQUIRE(slow->rows().size() == 5);
  std::this_thread::sleep_for(1200ms);
  HeldClaims other(parsed(outbox.url), 30s);
  auto taken = other.claim(5, all);
  CHECK(taken->rows().size() == 5);
  CHECK_THROWS_AS(slow->finish(all_sent(slow->rows())), store::DatabaseError);
  taken->finish(all_sent(taken->rows()));
  CHECK(outbox.count("status = 'sent'") == 5);
  CHECK(outbox.count("attempts <> 0") == 0);
}

// Four relays claim, "publish" (logged in order), fail and abandon at random, each through its
// own HeldClaims (its own connections), until every row is sent. Per key, the rows must be
// published successfully in id order, and no row twice.
TEST_CASE("held claims: concurrent relays keep per-key order and never publish a row twice") {
  Outbox outbox("held_concurrent");
  constexpr int kEvents = 600;
  outbox.db->in_transaction([&](Transaction& tx) {
    for (int i = 0; i < kEvents; ++i) {
      OutboxMessage m;
      m.event_id = "evt-" + std::to_string(i);
      m.subject = "test.orders.order.created";
      m.payload = "{}";
      if (i % 7 != 0) m.partition_key = "key-" + std::to_string(i % 5);
      enqueue(tx, m);
    }
  });
  std::mutex mutex;
  std::map<std::string, std::int64_t> last_sent;  // key -> the last id published successfully
  std::set<std::int64_t> sent_once;
  std::atomic<int> done{0}, out_of_order{0}, twice{0}, batches{0};
  const auto deadline = std::chrono::steady_clock::now() + 90s;
  run_concurrently(4, [&](int r) {
    HeldClaims claims(parsed(outbox.url), 30s);
    std::mt19937 random(static_cast<unsigned>(r) * 7919u + 3u);
    while (done.load() < kEvents && std::chrono::steady_clock::now() < deadline) {
      auto batch = claims.claim(1 + random() % 12, std::numeric_limits<std::int64_t>::max());
      if (batch->rows().empty()) {
        std::this_thread::sleep_for(1ms);
        continue;
      }
      batches++;
      if (random() % 8 == 0) {
        batch->abandon();
        continue;
      }
      HeldOutcome outcome;
      outcome.max_attempts = 1000;
      std::set<std::string> stopped;
      std::vector<std::pair<std::string, std::int64_t>> published;
      for (const auto& row : batch->rows()) {
        const auto key = row.partition_key.value_or("");
        if (row.partition_key && stopped.count(key) > 0) continue;  // left as it was
        if (random() % 10 == 0) {
          outcome.failures.push_back({row.id, "simulated PubAck error", 0ms});
          if (row.partition_key) stopped.insert(key);
          continue;
        }
        outcome.sent.push_back(row.id);
        if (row.partition_key) published.emplace_back(key, row.id);
      }
      {
        // Logged while the batch still holds its rows, as a relay publishes them: a later row
        // of a key can only be claimed, and logged, after this batch is written.
        std::lock_guard lock(mutex);
        for (const auto& [key, id] : published) {
          if (last_sent.count(key) > 0 && last_sent[key] > id) out_of_order++;
          last_sent[key] = id;
        }
        for (auto id : outcome.sent)
          if (!sent_once.insert(id).second) twice++;
      }
      if (random() % 3 == 0) std::this_thread::sleep_for(2ms);
      batch->finish(outcome);
      done += static_cast<int>(outcome.sent.size());
    }
  });
  CHECK(done.load() == kEvents);
  CHECK(out_of_order.load() == 0);
  CHECK(twice.load() == 0);
  CHECK(outbox.count("status = 'sent'") == kEvents);
  // Every successful publish of a key came after all earlier rows of the key were sent.
  auto gaps = outbox.db->query(
      "SELECT count(*) FROM natspubsub_outbox AS a JOIN natspubsub_outbox AS b "
      "ON a.partition_key = b.partition_key AND a.id < b.id AND a.sent_at > b.sent_at");
  CHECK(gaps.at(0).as_int(0) == 0);
  MESSAGE("batches: " << batches.load());
}

// A relay with lease claims (an older build during an upgrade, or --lease-claims) cannot see the
// row locks: while a held batch is open its claim waits (the claim lock, held shared by the
// batch), and then sees the batch's outcome instead of taking the rows behind a held row.
TEST_CASE("held claims: a lease claim waits for the open held batch, then continues after it in key order") {
  Outbox outbox("held_mixed");
  for (int i = 0; i < 4; ++i) outbox.add("e-" + std::to_string(i), "k");
  HeldClaims claims(parsed(outbox.url), 30s);
  auto held = claims.claim(1, std::numeric_limits<std::int64_t>::max());
  REQUIRE(events_of(held->rows()) == std::vector<std::string>{"e-0"});

  std::atomic<bool> returned{false};
  std::vector<OutboxRow> leased;
  std::thread lease_relay([&] {
    store::PostgresDatabase db(outbox.url);
    auto store = make_outbox_store(db);
    leased = store->claim("old-relay", 10, 30s);
    returned = true;
  });
  std::this_thread::sleep_for(500ms);
  CHECK_FALSE(returned.load());  // waiting for the held batch
  held->finish(all_sent(held->rows()));
  lease_relay.join();
  CHECK(events_of(leased) == std::vector<std::string>{"e-1", "e-2", "e-3"});
}
