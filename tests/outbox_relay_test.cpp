// The outbox relay against a real nats-server, SQLite files and a real PostgreSQL.
#include <fcntl.h>
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <filesystem>
#include <map>
#include <set>
#include <thread>

#include <doctest/doctest.h>
#include <pqxx/pqxx>

#include <natspubsub/connection.hpp>
#include <natspubsub/envelope.hpp>
#include <natspubsub/outbox.hpp>
#include <natspubsub/outbox_relay.hpp>
#include <natspubsub/store/migrations.hpp>
#include <natspubsub/store/postgres.hpp>
#include <natspubsub/store/sqlite.hpp>
#include <natspubsub/topology.hpp>

#include "support/databases.hpp"
#include "support/eventually.hpp"
#include "support/nats_helpers.hpp"
#include "support/servers.hpp"

using namespace natspubsub;
using namespace std::chrono_literals;
using natspubsub::testing::eventually;

namespace {

constexpr const char* kStream = "test-orders-events";

// Enqueues n events (keys cycle over `keys` partition keys when keys > 0) in one transaction.
std::vector<std::string> enqueue_sqlite(store::SqliteDatabase& db, int n, int keys = 0) {
  std::vector<std::string> ids;
  auto tx = db.begin();
  for (int i = 0; i < n; ++i) {
    auto e = Envelope::make("order.created", "orders", {{"i", i}});
    std::optional<std::string> key;
    if (keys > 0) key = "order-" + std::to_string(i % keys);
    enqueue(tx, OutboxMessage::from_envelope("test.orders.order.created", e, key));
    ids.push_back(e.event_id);
  }
  tx.commit();
  return ids;
}

// `half_keyed`: only the odd rows have a key (cycling over `keys`), the even ones none.
std::vector<std::string> enqueue_postgres(store::PostgresDatabase& db, int n, int keys, bool half_keyed = false) {
  std::vector<std::string> ids;
  pqxx::work tx(db.connection());
  for (int i = 0; i < n; ++i) {
    auto e = Envelope::make("order.created", "orders", {{"i", i}});
    std::optional<std::string> key;
    if (half_keyed) {
      if (i % 2 == 1) key = "order-" + std::to_string((i / 2) % keys);
    } else if (keys > 0) {
      key = "order-" + std::to_string(i % keys);
    }
    enqueue(tx, OutboxMessage::from_envelope("test.orders.order.created", e, key));
    ids.push_back(e.event_id);
  }
  tx.commit();
  return ids;
}

struct StreamCheck {
  size_t stored = 0;
  size_t distinct = 0;
  size_t missing = 0;
  size_t out_of_order = 0;  // per partition key: stream order differs from enqueue order
};

// Reads the stream and compares it with the enqueued ids (in enqueue order).
StreamCheck check_stream(const std::string& url, const std::vector<std::string>& ids, int keys) {
  testing::RawNats raw(url);
  auto stored = raw.read_stream(kStream);
  StreamCheck c;
  c.stored = stored.size();
  std::map<std::string, size_t> position;  // event id -> stream index
  for (size_t i = 0; i < stored.size(); ++i) position.emplace(stored[i].msg_id, i);
  c.distinct = position.size();
  for (const auto& id : ids) c.missing += position.count(id) ? 0 : 1;
  if (keys > 0) {
    std::map<int, size_t> last;  // key -> last stream index seen
    for (size_t i = 0; i < ids.size(); ++i) {
      auto it = position.find(ids[i]);
      if (it == position.end()) continue;
      int key = static_cast<int>(i) % keys;
      if (last.count(key) && it->second < last[key]) c.out_of_order++;
      last[key] = it->second;
    }
  }
  return c;
}

// Reads the stream and compares it with the outbox's rows (in id order, keys from the table).
struct OutboxStreamCheck {
  size_t stored = 0;
  size_t distinct = 0;
  size_t missing = 0;
  size_t out_of_order = 0;  // per partition key: stream order differs from outbox id order
  size_t keys = 0;
};
OutboxStreamCheck check_stream_against_outbox(const std::string& url, store::PostgresDatabase& db) {
  std::map<std::string, size_t> position;  // event id -> stream index
  const auto stored = testing::RawNats(url).read_stream(kStream);
  for (size_t i = 0; i < stored.size(); ++i) position.emplace(stored[i].msg_id, i);
  OutboxStreamCheck c;
  c.stored = stored.size();
  c.distinct = position.size();
  std::map<std::string, size_t> last;  // key -> stream index of its last event seen
  for (const auto& row : db.query("SELECT event_id, partition_key FROM natspubsub_outbox ORDER BY id")) {
    auto it = position.find(row.as_text(0));
    if (it == position.end()) {
      ++c.missing;
      continue;
    }
    if (row.is_null(1)) continue;
    const auto key = row.as_text(1);
    if (last.count(key) > 0 && it->second < last[key]) ++c.out_of_order;
    last[key] = it->second;
  }
  c.keys = last.size();
  return c;
}

int64_t count_status(store::Database& db, const std::string& status) {
  int64_t n = 0;
  db.in_transaction([&](store::Transaction& tx) {
    n = tx.query("SELECT COUNT(*) FROM natspubsub_outbox WHERE status = $1", {status})[0].as_int(0);
  });
  return n;
}

RelayOptions fast_options() {
  RelayOptions o;
  o.batch_size = 500;
  o.poll_interval = 20ms;
  o.lease = 5s;
  o.ack_timeout = 2s;
  o.backoff = {20ms, 40ms};
  return o;
}

}  // namespace

TEST_CASE("SQLite: the relay drains 10,000 rows, each event once, each row sent") {
  testing::NatsServer server;
  testing::TempDir dir;
  store::SqliteDatabase db(testing::sqlite_file(dir));
  store::migrate(db);
  auto ids = enqueue_sqlite(db, 10000);

  Connection nats(testing::test_config(server.url(), "orders"));
  Topology(nats).ensure_events_stream();
  OutboxRelay relay(nats, db, fast_options());
  auto started = std::chrono::steady_clock::now();
  auto handled = relay.drain();
  auto seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - started).count();
  MESSAGE("relayed " << handled << " rows in " << seconds << " s (" << static_cast<int>(handled / seconds)
                     << " rows/s, SQLite, batch 500)");
  CHECK(handled == 10000);
  auto c = check_stream(server.url(), ids, 0);
  CHECK(c.stored == 10000);
  CHECK(c.distinct == 10000);
  CHECK(c.missing == 0);
  CHECK(count_status(db, "sent") == 10000);
  auto s = relay.stats();
  CHECK(s.published == 10000);
  CHECK(s.duplicates == 0);
  CHECK(s.publish_latency.count == 10000);
  CHECK(relay.drain() == 0);  // nothing left
}

TEST_CASE("SQLite: a row nobody can store is retried with backoff, then failed; others are not held up") {
  testing::NatsServer server;
  testing::TempDir dir;
  store::SqliteDatabase db(testing::sqlite_file(dir));
  store::migrate(db);
  auto good = enqueue_sqlite(db, 3);
  db.execute("INSERT INTO natspubsub_outbox (event_id, subject, payload) VALUES ($1, $2, $3)",
             {new_uuid(), "test.nostream.thing", "{}"});  // no stream captures this subject

  Connection nats(testing::test_config(server.url(), "orders"));
  Topology(nats).ensure_events_stream();
  auto o = fast_options();
  o.max_attempts = 3;
  OutboxRelay relay(nats, db, o);
  for (int i = 0; i < 50 && count_status(db, "failed") == 0; ++i) {
    relay.drain();
    std::this_thread::sleep_for(30ms);
  }
  CHECK(count_status(db, "sent") == 3);
  CHECK(count_status(db, "failed") == 1);
  auto failed = relay.store().list_failed(10);
  REQUIRE(failed.size() == 1);
  CHECK(failed[0].attempts == 3);
  REQUIRE(failed[0].last_error.has_value());
  CHECK(failed[0].last_error->find("test.nostream.thing") != std::string::npos);
  CHECK(relay.stats().retried == 2);
  CHECK(relay.stats().failed == 1);
}

// The relay's default on SQLite: it holds the file's relay lock alone, and its claims read.
// Counted from outside: a trigger counts every UPDATE of an outbox row, the stream is read back.
TEST_CASE("SQLite: one relay per file; its claims read, so each row is written once; a pipelined drain publishes nothing twice and keeps key order") {
  testing::NatsServer server;
  testing::TempDir dir;
  const auto path = testing::sqlite_file(dir);
  store::SqliteDatabase db(path);
  store::migrate(db);
  constexpr int kKeys = 40;
  auto keyed = enqueue_sqlite(db, 20000, kKeys);
  auto unkeyed = enqueue_sqlite(db, 5000);
  db.execute("CREATE TABLE row_writes (id INTEGER)");
  db.execute("CREATE TRIGGER count_row_writes AFTER UPDATE ON natspubsub_outbox BEGIN "
             "INSERT INTO row_writes VALUES (NEW.id); END");
  Connection nats(testing::test_config(server.url(), "orders"));
  Topology(nats).ensure_events_stream();

  auto o = fast_options();
  o.lease = 30s;  // covers two batches: claims ahead (pipelined)
  {
    OutboxRelay relay(nats, db, o);
    // No second relay on the file while it runs, whatever its claims.
    store::SqliteDatabase other(path);
    CHECK_THROWS_AS(OutboxRelay(nats, other, o), ConfigError);
    auto lease = o;
    lease.hold_claims = false;
    CHECK_THROWS_AS(OutboxRelay(nats, other, lease), ConfigError);
    // The same file by another name: the lock goes by the file's real path.
    const auto link = (dir.path() / "link.db").string();
    std::filesystem::create_symlink(path, link);
    store::SqliteDatabase via_link(link);
    CHECK_THROWS_AS(OutboxRelay(nats, via_link, o), ConfigError);
    store::SqliteDatabase via_uri("file:" + path);
    CHECK_THROWS_AS(OutboxRelay(nats, via_uri, o), ConfigError);
    // Nor lease claims made through the public store by another program.
    auto store = make_outbox_store(other);
    CHECK_THROWS_AS((void)store->claim("someone", 10, 30s), ConfigError);

    CHECK(relay.drain() == 25000);
    const auto st = relay.stats();
    CHECK(st.published == 25000);
    CHECK(st.duplicates == 0);  // no row was published again while its batch was in flight
    CHECK(st.errors == 0);
  }
  CHECK(count_status(db, "sent") == 25000);
  // Once: sent, with nothing written at the claim (lease claims write `publishing` first: 50,000).
  CHECK(db.query("SELECT COUNT(*) FROM row_writes")[0].as_int(0) == 25000);
  CHECK(db.query("SELECT COUNT(DISTINCT id) FROM row_writes")[0].as_int(0) == 25000);
  auto k = check_stream(server.url(), keyed, kKeys);
  auto u = check_stream(server.url(), unkeyed, 0);
  CHECK(k.stored == 25000);
  CHECK(k.distinct == 25000);
  CHECK(k.missing == 0);
  CHECK(u.missing == 0);
  CHECK(k.out_of_order == 0);

  // The lock ends with the relay. Lease relays share it, and keep a relay with read claims out.
  store::SqliteDatabase a(path);
  store::SqliteDatabase b(path);
  auto lease = o;
  lease.hold_claims = false;
  {
    OutboxRelay first(nats, a, lease);
    OutboxRelay second(nats, b, lease);
    CHECK_THROWS_AS(OutboxRelay(nats, db, o), ConfigError);
  }
  OutboxRelay again(nats, db, o);
  CHECK(again.drain() == 0);
}

// Read claims write nothing until a batch's outcome: when those writes fail (the database
// refuses every UPDATE of an outbox row for a while, from outside, under a draining relay), the
// rows are as they were and the relay takes them again. Counted afterwards: every row sent, every
// event in the stream once, in key order. Two keys: a batch is 250 rounds long and is also
// marked between rounds, so a refused mark ends it half-way; its rows stayed out of every later
// claim until the store forgot them at the next claim from the start (the relay stalled at
// about 2,350 of 10,000 before).
TEST_CASE("SQLite: outcome writes refused for a while under a draining relay: every row sent, each event once, in key order") {
  testing::NatsServer server;
  testing::TempDir dir;
  const auto path = testing::sqlite_file(dir);
  store::SqliteDatabase db(path);
  store::migrate(db);
  constexpr int kKeys = 2;  // batches of 250 rounds: marked between rounds too
  auto ids = enqueue_sqlite(db, 10000, kKeys);
  db.execute("CREATE TABLE refuse (active INTEGER NOT NULL)");
  db.execute("INSERT INTO refuse VALUES (0)");
  db.execute("CREATE TRIGGER refuse_outbox_writes BEFORE UPDATE ON natspubsub_outbox "
             "WHEN (SELECT active FROM refuse) = 1 BEGIN SELECT RAISE(ABORT, 'injected: outbox writes refused'); END");
  Connection nats(testing::test_config(server.url(), "orders"));
  Topology(nats).ensure_events_stream();

  auto o = fast_options();
  o.lease = 30s;  // pipelined: claims ahead, marks in the claim's transaction
  store::SqliteDatabase relay_db(path);
  OutboxRelay relay(nats, relay_db, o);
  std::jthread runner([&](std::stop_token st) { relay.run(st); });
  testing::RawNats watcher(server.url());
  REQUIRE(eventually([&] { return watcher.stream_messages(kStream) >= 2000; }, 30s));
  db.execute("UPDATE refuse SET active = 1");
  std::this_thread::sleep_for(600ms);
  db.execute("UPDATE refuse SET active = 0");
  const bool drained = eventually([&] { return count_status(db, "sent") == 10000; }, 60s);
  runner.request_stop();
  runner.join();
  CHECK(drained);
  CHECK(relay.stats().errors >= 1);  // the refusal was met
  auto c = check_stream(server.url(), ids, kKeys);
  MESSAGE("stored " << c.stored << ", distinct " << c.distinct << ", errors " << relay.stats().errors
                    << ", published again and dropped as duplicates " << relay.stats().duplicates);
  CHECK(c.missing == 0);
  CHECK(c.stored == 10000);
  CHECK(c.distinct == 10000);
  CHECK(c.out_of_order == 0);
}

TEST_CASE("SQLite: retention delete and cleanup of old sent rows") {
  testing::NatsServer server;
  testing::TempDir dir;
  store::SqliteDatabase db(testing::sqlite_file(dir));
  store::migrate(db);
  enqueue_sqlite(db, 20);
  Connection nats(testing::test_config(server.url(), "orders"));
  Topology(nats).ensure_events_stream();

  auto o = fast_options();
  o.cleanup_after = 0ms;
  o.cleanup_batch = 7;
  {
    OutboxRelay keep(nats, db, o);  // one relay per SQLite file at a time (its relay lock)
    CHECK(keep.drain() == 20);
    CHECK(count_status(db, "sent") == 20);
    std::this_thread::sleep_for(5ms);
    CHECK(keep.cleanup() == 20);  // 7 + 7 + 6 in bounded batches
    CHECK(count_status(db, "sent") == 0);
  }

  enqueue_sqlite(db, 5);
  o.delete_sent = true;
  OutboxRelay deleting(nats, db, o);
  CHECK(deleting.drain() == 5);
  int64_t rows = db.query("SELECT COUNT(*) FROM natspubsub_outbox")[0].as_int(0);
  CHECK(rows == 0);
  testing::RawNats raw(server.url());
  CHECK(raw.stream_messages(kStream) == 25);
}

// Two relays on one PostgreSQL outbox, with held claims (the default) or lease claims.
void two_postgres_relays(bool hold_claims, int keys, bool both_take_part) {
  testing::NatsServer server;
  auto url = testing::fresh_postgres_database("relay");
  store::PostgresDatabase setup(url);
  store::migrate(setup);
  constexpr int kEvents = 4000;
  auto ids = enqueue_postgres(setup, kEvents, keys);

  {
    Connection admin(testing::test_config(server.url(), "orders"));
    Topology(admin).ensure_events_stream();
  }
  std::atomic<size_t> handled{0};
  testing::run_concurrently(2, [&](int i) {
    store::PostgresDatabase db(url);
    Connection nats(testing::test_config(server.url(), "orders"));
    auto o = fast_options();
    o.batch_size = 100;
    o.relay_id = "relay-" + std::to_string(i);
    o.hold_claims = hold_claims;
    OutboxRelay relay(nats, db, o);
    // Keep going until the whole outbox is sent: the other relay may hold rows for a while.
    for (int round = 0; round < 2000 && count_status(db, "sent") < kEvents; ++round) {
      auto n = relay.drain();
      handled += n;
      if (n == 0) std::this_thread::sleep_for(10ms);
    }
    MESSAGE(o.relay_id << " published " << relay.stats().published);
    if (both_take_part) CHECK(relay.stats().published > 0);
  });
  auto c = check_stream(server.url(), ids, keys);
  MESSAGE("stored " << c.stored << ", distinct " << c.distinct << ", missing " << c.missing << ", out of order "
                    << c.out_of_order);
  CHECK(c.stored == kEvents);
  CHECK(c.distinct == kEvents);
  CHECK(c.missing == 0);
  CHECK(c.out_of_order == 0);
  CHECK(count_status(setup, "sent") == kEvents);
  CHECK(count_status(setup, "publishing") == 0);
}

// Many keys, so that both relays find rows whose predecessors are sent.
TEST_CASE("PostgreSQL: two relays at once publish each event once and keep per-key order (held claims)") {
  two_postgres_relays(true, 1000, true);
}
TEST_CASE("PostgreSQL: two relays at once publish each event once and keep per-key order (lease claims)") {
  two_postgres_relays(false, 1000, true);
}
// 20 hot keys: each relay's claims run into rows the other holds, which look pending to a query.
TEST_CASE("PostgreSQL: two relays with held claims over 20 hot keys: each event once, per-key order") {
  two_postgres_relays(true, 20, false);
}

// A claim made ahead starts after the last batch claimed (held claims, outbox_relay.cpp): a row
// below it that becomes claimable later (here: committed after rows with higher ids) is taken by
// the claim from the start made at least every 250 ms, not left until the backlog is drained.
TEST_CASE("PostgreSQL: a row committed late, below ids already claimed, is published while the backlog lasts") {
  testing::NatsServer server;
  auto url = testing::fresh_postgres_database("relay_late");
  store::PostgresDatabase setup(url);
  store::migrate(setup);
  {
    Connection admin(testing::test_config(server.url(), "orders"));
    Topology(admin).ensure_events_stream();
  }
  store::PostgresDatabase late_db(url);
  auto late_tx = std::make_unique<pqxx::work>(late_db.connection());
  auto late = Envelope::make("order.created", "orders", {{"late", true}});
  enqueue(*late_tx, OutboxMessage::from_envelope("test.orders.order.created", late));  // takes the lowest id
  constexpr int kEvents = 30000;
  auto ids = enqueue_postgres(setup, kEvents, 0);  // no keys: every claim ahead finds rows

  store::PostgresDatabase db(url);
  Connection nats(testing::test_config(server.url(), "orders"));
  auto o = fast_options();
  o.lease = 30s;  // covers two batches: claims are made ahead
  OutboxRelay relay(nats, db, o);
  std::jthread worker([&](std::stop_token st) { relay.run(st); });
  REQUIRE(eventually([&] { return count_status(setup, "sent") >= 1000; }, 60s));
  late_tx->commit();
  REQUIRE(eventually([&] { return count_status(setup, "sent") == kEvents + 1; }, 120s));
  worker.request_stop();
  worker.join();
  auto rows = setup.query(
      "SELECT (SELECT sent_at FROM natspubsub_outbox WHERE event_id = $1) < "
      "(SELECT max(sent_at) FROM natspubsub_outbox WHERE event_id <> $1), "
      "(SELECT count(*) FROM natspubsub_outbox WHERE event_id <> $1 AND sent_at > "
      "(SELECT sent_at FROM natspubsub_outbox WHERE event_id = $1))",
      {late.event_id});
  MESSAGE("rows sent after the late row: " << rows.at(0).as_int(1));
  CHECK(rows.at(0).as_text(0) == "t");
  CHECK(rows.at(0).as_int(1) > 0);
  auto c = check_stream(server.url(), ids, 0);
  CHECK(c.missing == 0);
  CHECK(c.stored == kEvents + 1);
}

// A held batch's outcome that cannot be written (outbox_relay.cpp, Impl::publish, "The previous
// batch's outcome first"): while run() pipelines, batch N's outcome is written on its own thread
// while N+1 publishes. A trigger made here fails N's outcome once (the first statement that sets
// a chosen row `sent`). N+1's outcome must still be written, then the error reaches run(), which
// backs off and publishes N's rows again: JetStream drops the copies, every row ends sent, each
// event is in the stream once, and each key's events are in the stream in outbox order.
// A failed statement rolls back whatever it wrote, so the trigger records what it saw in
// sequences (nextval and setval are not rolled back).
TEST_CASE("PostgreSQL: a held batch's outcome that fails while the next batch publishes: the next is still written, the failed one is published again, each event once, in key order") {
  testing::NatsServer server;
  auto url = testing::fresh_postgres_database("relay_outcome_fault");
  store::PostgresDatabase setup(url);
  store::migrate(setup);
  {
    Connection admin(testing::test_config(server.url(), "orders"));
    Topology(admin).ensure_events_stream();
  }
  // Half of the rows have one of 20 keys, half have none: a claim made ahead while a batch
  // publishes finds rows (the unkeyed ones) all along, so the batch with the chosen row has one
  // publishing after it.
  constexpr int kEvents = 3000;
  constexpr int kKeys = 20;
  enqueue_postgres(setup, kEvents, kKeys, /*half_keyed=*/true);
  // The chosen row: keyed, about 40% into the outbox (batches before and after it).
  const auto target = setup.query("SELECT id FROM natspubsub_outbox WHERE partition_key IS NOT NULL ORDER BY id "
                                  "OFFSET 600 LIMIT 1")
                          .at(0)
                          .as_int(0);
  {
    pqxx::work tx(setup.connection());
    tx.exec(R"sql(
CREATE SEQUENCE test_fault_seen;    -- statements that set the chosen row sent
CREATE SEQUENCE test_fault_rows;    -- rows the failed statement set sent
CREATE SEQUENCE test_fault_at_us;   -- when it failed: microseconds since the epoch
CREATE FUNCTION test_fail_once() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
  IF EXISTS (SELECT 1 FROM new_rows WHERE id = )sql" + std::to_string(target) + R"sql( AND status = 'sent') THEN
    IF nextval('test_fault_seen') = 1 THEN  -- nested: SQL does not promise to evaluate AND in order
      PERFORM setval('test_fault_rows', (SELECT count(*) FROM new_rows WHERE status = 'sent'));
      PERFORM setval('test_fault_at_us', (extract(epoch FROM clock_timestamp()) * 1000000)::bigint);
      RAISE EXCEPTION 'test fault: the outcome of the batch with the chosen row fails once';
    END IF;
  END IF;
  RETURN NULL;
END $$;
CREATE TRIGGER test_fail_once AFTER UPDATE ON natspubsub_outbox
  REFERENCING NEW TABLE AS new_rows FOR EACH STATEMENT EXECUTE FUNCTION test_fail_once();
)sql");
    tx.commit();
  }

  store::PostgresDatabase db(url);
  Connection nats(testing::test_config(server.url(), "orders"));
  auto o = fast_options();
  o.lease = 30s;  // covers two batches: claims are made ahead and outcomes written on their own thread
  OutboxRelay relay(nats, db, o);
  const auto started = std::chrono::steady_clock::now();
  {
    std::jthread worker([&](std::stop_token st) { relay.run(st); });
    CHECK(eventually([&] { return count_status(setup, "sent") == kEvents; }, 15s));
  }  // stops and joins run()
  const auto seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - started).count();

  // The trigger failed one statement, and the chosen row was set sent once more afterwards.
  auto seq = [&](const std::string& name) {
    auto r = setup.query("SELECT CASE WHEN is_called THEN last_value ELSE 0 END FROM " + name);
    return r.at(0).as_int(0);
  };
  const auto seen = seq("test_fault_seen");
  const auto fault_rows = seq("test_fault_rows");
  const auto fault_at_us = seq("test_fault_at_us");
  // The batch whose outcome was written between the failure and the republish of the failed
  // batch: only N+1 (run() backs off 500 ms before claiming again, and the batch claimed ahead
  // of it is given back unpublished).
  auto between = setup.query(
      "SELECT count(*), count(DISTINCT sent_at) FROM natspubsub_outbox "
      "WHERE (extract(epoch FROM sent_at) * 1000000)::bigint >= $1 "
      "AND sent_at < (SELECT sent_at FROM natspubsub_outbox WHERE id = $2)",
      {fault_at_us, target});
  const auto s = relay.stats();
  MESSAGE("drained " << kEvents << " rows in " << seconds << " s; the failed outcome had " << fault_rows
                     << " rows; the next batch's outcome, written after it, " << between.at(0).as_int(0)
                     << " rows; errors " << s.errors << ", duplicates " << s.duplicates << ", published "
                     << s.published << ", batches " << s.batches);
  CHECK(seen == 2);        // failed once, then written when published again
  CHECK(fault_rows > 0);
  CHECK(between.at(0).as_int(0) > 0);  // N+1's outcome was written, after N's failed
  CHECK(between.at(0).as_int(1) == 1);  // in one statement: one batch
  CHECK(s.errors >= 1);                 // the failure reached run()
  // Only the failed batch's rows were published twice (N+1's were not: its outcome was kept).
  CHECK(s.duplicates == static_cast<uint64_t>(fault_rows));
  // Published counts acknowledgements whose outcome was written: the failed batch's first
  // round of acknowledgements is not in it, its second (all duplicates) is.
  CHECK(s.published == static_cast<uint64_t>(kEvents));
  CHECK(count_status(setup, "sent") == kEvents);

  // The stream: every event once, each key's events in the order of their outbox ids.
  const auto c = check_stream_against_outbox(server.url(), setup);
  CHECK(c.stored == static_cast<size_t>(kEvents));
  CHECK(c.distinct == static_cast<size_t>(kEvents));
  CHECK(c.missing == 0);
  CHECK(c.out_of_order == 0);
  CHECK(c.keys == static_cast<size_t>(kKeys));
}

// The wait for the previous outcome is not counted in a held batch's round limit (outbox_relay.cpp,
// Impl::publish): batch N+1's transaction is idle while N's outcome is written. Here N's outcome
// takes about 4 s against a 3 s lease (two statements of 2 s: the update that sets a chosen row
// sent, then the COMMIT, through a deferred trigger; each under the lease, PostgreSQL's
// statement_timeout), so PostgreSQL ends N+1's transaction (idle for the lease) before its outcome
// is written. N+1's rows, all published by then, are published again: JetStream drops the
// copies; nothing is lost or reordered.
TEST_CASE("PostgreSQL: a previous outcome slower than the lease margin ends the next held batch's transaction: it is published again, each event once, in key order") {
  testing::NatsServer server;
  auto url = testing::fresh_postgres_database("relay_slow_outcome");
  store::PostgresDatabase setup(url);
  store::migrate(setup);
  {
    Connection admin(testing::test_config(server.url(), "orders"));
    Topology(admin).ensure_events_stream();
  }
  constexpr int kEvents = 1000;
  constexpr int kKeys = 10;
  enqueue_postgres(setup, kEvents, kKeys, /*half_keyed=*/true);
  const auto target = setup.query("SELECT id FROM natspubsub_outbox WHERE partition_key IS NOT NULL ORDER BY id "
                                  "OFFSET 150 LIMIT 1")
                          .at(0)
                          .as_int(0);
  const auto target_text = std::to_string(target);
  {
    pqxx::work tx(setup.connection());
    tx.exec(R"sql(
CREATE SEQUENCE test_slow_seen;   -- statements that set the chosen row sent
CREATE SEQUENCE test_slow_txid;   -- the transaction made slow
CREATE FUNCTION test_slow_update() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
  IF EXISTS (SELECT 1 FROM new_rows WHERE id = )sql" + target_text + R"sql( AND status = 'sent') THEN
    IF nextval('test_slow_seen') = 1 THEN
      PERFORM setval('test_slow_txid', txid_current());
      PERFORM pg_sleep(2);
    END IF;
  END IF;
  RETURN NULL;
END $$;
CREATE TRIGGER test_slow_update AFTER UPDATE ON natspubsub_outbox
  REFERENCING NEW TABLE AS new_rows FOR EACH STATEMENT EXECUTE FUNCTION test_slow_update();
CREATE FUNCTION test_slow_commit() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
  IF (SELECT is_called AND last_value = txid_current() FROM test_slow_txid) THEN
    PERFORM pg_sleep(2);
  END IF;
  RETURN NULL;
END $$;
CREATE CONSTRAINT TRIGGER test_slow_commit AFTER UPDATE ON natspubsub_outbox DEFERRABLE INITIALLY DEFERRED
  FOR EACH ROW WHEN (NEW.id = )sql" + target_text + R"sql( AND NEW.status = 'sent') EXECUTE FUNCTION test_slow_commit();
)sql");
    tx.commit();
  }

  store::PostgresDatabase db(url);
  Connection nats(testing::test_config(server.url(), "orders"));
  auto o = fast_options();
  o.batch_size = 100;
  o.ack_timeout = 500ms;
  o.lease = 3s;  // covers two batches (2 x 500 ms): claimed ahead, outcomes on their own thread
  OutboxRelay relay(nats, db, o);
  {
    std::jthread worker([&](std::stop_token st) { relay.run(st); });
    CHECK(eventually([&] { return count_status(setup, "sent") == kEvents; }, 20s));
  }
  const auto seen = setup.query("SELECT last_value FROM test_slow_seen").at(0).as_int(0);
  const auto s = relay.stats();
  MESSAGE("errors " << s.errors << ", duplicates " << s.duplicates << ", released " << s.released << ", batches "
                    << s.batches);
  // These three say the case happened: the slow outcome was written (it fits the lease statement
  // by statement), the next batch's was not (its transaction was ended) and its rows were
  // published again. A change that keeps the waiting batch's transaction alive drops the last two.
  CHECK(seen == 1);
  CHECK(s.errors >= 1);
  CHECK(s.duplicates > 0);
  CHECK(count_status(setup, "sent") == kEvents);

  const auto c = check_stream_against_outbox(server.url(), setup);
  CHECK(c.stored == static_cast<size_t>(kEvents));
  CHECK(c.distinct == static_cast<size_t>(kEvents));
  CHECK(c.missing == 0);
  CHECK(c.out_of_order == 0);
}

TEST_CASE("a relay process killed with SIGKILL mid-batch, then restarted: nothing lost, nothing duplicated") {
  testing::NatsServer server;
  auto config = testing::test_config(server.url(), "orders");
  config.stream.memory_storage = false;
  {
    Connection admin(config);
    Topology(admin).ensure_events_stream();
  }
  testing::TempDir dir;
  auto path = testing::sqlite_file(dir);
  std::vector<std::string> ids;
  {
    store::SqliteDatabase db(path);
    store::migrate(db);
    ids = enqueue_sqlite(db, 20000);
  }
  const std::string relay = NATSPUBSUB_BINARY_DIR "/workers/natspubsub-relay";
  const std::vector<std::string> args = {relay,           "--database",    "sqlite://" + path, "--nats",
                                         server.url(),    "--env",         "test",             "--app",
                                         "orders",        "--batch-size",  "250",              "--lease",
                                         "1500",          "--ack-timeout", "1000",             "--poll-interval",
                                         "20"};
  auto spawn = [&](bool once) {
    pid_t pid = fork();
    if (pid == 0) {
      std::vector<char*> argv;
      for (const auto& a : args) argv.push_back(const_cast<char*>(a.c_str()));
      if (once) argv.push_back(const_cast<char*>("--once"));
      argv.push_back(nullptr);
      int devnull = open("/dev/null", O_WRONLY);
      dup2(devnull, 2);
      execv(relay.c_str(), argv.data());
      _exit(127);
    }
    return pid;
  };

  testing::RawNats watcher(server.url());
  int kills = 0;
  for (int round = 0; round < 3; ++round) {
    pid_t pid = spawn(false);
    // Kill once it is part-way: some of this round's messages are stored, not all.
    auto before = watcher.stream_messages(kStream);
    auto deadline = std::chrono::steady_clock::now() + 30s;
    while (std::chrono::steady_clock::now() < deadline && watcher.stream_messages(kStream) < before + 1500)
      std::this_thread::sleep_for(1ms);
    kill(pid, SIGKILL);
    waitpid(pid, nullptr, 0);
    ++kills;
  }
  std::this_thread::sleep_for(1600ms);  // the dead relays' leases end
  int status = 0;
  for (int attempt = 0; attempt < 10; ++attempt) {
    pid_t pid = spawn(true);
    waitpid(pid, &status, 0);
    REQUIRE(WIFEXITED(status));
    CHECK(WEXITSTATUS(status) == 0);
    store::SqliteDatabase db(path);
    if (count_status(db, "sent") == 20000) break;
    std::this_thread::sleep_for(1600ms);
  }
  store::SqliteDatabase db(path);
  auto c = check_stream(server.url(), ids, 0);
  MESSAGE("events 20000, kills " << kills << ", stored " << c.stored << ", lost " << c.missing << ", duplicated "
                                 << c.stored - c.distinct);
  CHECK(count_status(db, "sent") == 20000);
  CHECK(c.missing == 0);
  CHECK(c.stored == c.distinct);
  CHECK(c.stored == 20000);
}

TEST_CASE("a lease a batch could outlive is refused with the bound it must exceed") {
  testing::NatsServer server;
  testing::TempDir dir;
  store::SqliteDatabase db(testing::sqlite_file(dir));
  store::migrate(db);
  Connection nats(testing::test_config(server.url(), "orders"));
  RelayOptions o;
  o.batch_size = 100000;  // 391 rounds of 256 messages, each up to 10 s
  try {
    OutboxRelay relay(nats, db, o);
    FAIL("a 60 s lease was accepted for batches that can take 3,910 s");
  } catch (const ConfigError& e) {
    CHECK(e.field() == "relay.lease");
    CHECK(std::string(e.what()).find("3910000 ms") != std::string::npos);
  }
  o.batch_size = 500;  // 2 rounds x 10 s = 20 s: inside the default 60 s lease
  CHECK_NOTHROW(OutboxRelay(nats, db, o));
  o.lease = Millis{20000};
  CHECK_THROWS_AS(OutboxRelay(nats, db, o), ConfigError);
}

TEST_CASE("SQLite: NATS frozen under a draining relay (SIGSTOP): rows released without an attempt, all sent once, in key order") {
  testing::NatsServer server;
  testing::TempDir dir;
  const auto path = testing::sqlite_file(dir);
  store::SqliteDatabase db(path);
  store::migrate(db);
  auto ids = enqueue_sqlite(db, 6000, 40);
  store::SqliteDatabase reader(path);  // the relay's connection is busy on its own thread
  Connection nats(testing::test_config(server.url(), "orders"));
  Topology(nats).ensure_events_stream();
  auto o = fast_options();
  o.ack_timeout = 500ms;
  o.max_attempts = 2;  // were timeouts counted, rows would fail after two of them
  OutboxRelay relay(nats, db, o);
  std::jthread worker([&](std::stop_token st) { relay.run(st); });

  REQUIRE(eventually([&] { return count_status(reader, "sent") > 0; }, 30s));
  ::kill(server.pid(), SIGSTOP);  // the server keeps the socket but answers nothing
  std::this_thread::sleep_for(3s);
  ::kill(server.pid(), SIGCONT);
  REQUIRE(eventually([&] { return count_status(reader, "sent") == 6000; }, 60s));
  worker.request_stop();
  worker.join();

  const auto s = relay.stats();
  MESSAGE("released " << s.released << " rows during the freeze; retried " << s.retried);
  CHECK(s.released > 0);  // the freeze hit a batch
  CHECK(s.retried == 0);
  CHECK(s.failed == 0);
  CHECK(count_status(reader, "failed") == 0);
  int64_t with_attempts = 0;
  reader.in_transaction([&](store::Transaction& tx) {
    with_attempts = tx.query("SELECT COUNT(*) FROM natspubsub_outbox WHERE attempts > 0")[0].as_int(0);
  });
  CHECK(with_attempts == 0);
  auto c = check_stream(server.url(), ids, 40);
  CHECK(c.stored == 6000);
  CHECK(c.distinct == 6000);
  CHECK(c.missing == 0);
  CHECK(c.out_of_order == 0);
}

TEST_CASE("SQLite: a round of a batch that could end after the lease is not started; its rows are released") {
  testing::NatsServer server;
  testing::TempDir dir;
  store::SqliteDatabase db(testing::sqlite_file(dir));
  store::migrate(db);
  auto ids = enqueue_sqlite(db, 3, /*keys=*/1);  // one key: three rounds of one row
  Connection nats(testing::test_config(server.url(), "orders"));
  Topology(nats).ensure_events_stream();
  auto o = fast_options();
  o.batch_size = 3;
  o.ack_timeout = 1000ms;
  o.lease = 1100ms;  // covers one round (1 s) with 100 ms to spare
  OutboxRelay relay(nats, db, o);

  // The server answers the first round 400 ms late (frozen, then thawed): the second round,
  // which could take another second, would end after the lease.
  ::kill(server.pid(), SIGSTOP);
  std::jthread thaw([&] {
    std::this_thread::sleep_for(400ms);
    ::kill(server.pid(), SIGCONT);
  });
  CHECK(relay.run_once() == 3);
  thaw.join();
  CHECK(count_status(db, "sent") == 1);
  CHECK(count_status(db, "pending") == 2);
  CHECK(relay.stats().released == 2);
  auto stored = testing::RawNats(server.url()).read_stream(kStream);
  REQUIRE(stored.size() == 1);
  CHECK(stored[0].msg_id == ids[0]);

  // Nothing was counted against the two rows: the next batch sends them, in order.
  CHECK(relay.drain() == 2);
  CHECK(check_stream(server.url(), ids, 1).out_of_order == 0);
  CHECK(count_status(db, "sent") == 3);
}
