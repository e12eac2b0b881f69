// ctest-labels: fault
// The natspubsub-relay process SIGKILLed at random points, ten times, while it drains 20,000
// outbox rows, on SQLite and on PostgreSQL. What must hold afterwards: the stream holds each
// event_id exactly once and every row ends `sent`. (outbox_relay_test has the three-kill SQLite
// variant at fixed points; this one picks the points at random and covers PostgreSQL too.)
#include <algorithm>
#include <map>
#include <memory>
#include <chrono>
#include <string>
#include <vector>

#include <doctest/doctest.h>
#include <pqxx/pqxx>

#include <natspubsub/connection.hpp>
#include <natspubsub/envelope.hpp>
#include <natspubsub/outbox.hpp>
#include <natspubsub/store/database.hpp>
#include <natspubsub/store/migrations.hpp>
#include <natspubsub/store/postgres.hpp>
#include <natspubsub/store/sqlite.hpp>
#include <natspubsub/topology.hpp>

#include "support/databases.hpp"
#include "support/fault.hpp"
#include "support/nats_helpers.hpp"
#include "support/process.hpp"
#include "support/servers.hpp"

using namespace natspubsub;
using namespace std::chrono_literals;

namespace {

constexpr const char* kStream = "test-orders-events";
constexpr const char* kSubject = "test.orders.order.created";
constexpr int kEvents = 20000;
constexpr int kKills = 10;

int64_t count_status(const std::string& url, const std::string& status) {
  auto db = store::open_database(url);
  return testing::query(*db, "SELECT COUNT(*) FROM natspubsub_outbox WHERE status = $1", {status})[0].as_int(0);
}

void kill_relay_repeatedly(const std::string& database_url, const std::vector<std::string>& ids,
                           const std::string& backend) {
  testing::NatsServer server;
  auto config = testing::test_config(server.url(), "orders");
  config.stream.memory_storage = false;
  {
    Connection admin(config);
    Topology(admin).ensure_events_stream();
  }
  testing::TempDir logs("relay-logs");
  const std::vector<std::string> args = {"--database", database_url, "--nats", server.url(), "--env", "test",
                                         "--app", "orders", "--batch-size", "250", "--lease", "1500",
                                         "--ack-timeout", "1000", "--poll-interval", "20"};
  auto rng = testing::fault_random(backend);
  testing::RawNats watcher(server.url());
  auto started = std::chrono::steady_clock::now();

  int kills = 0;
  std::vector<uint64_t> stored_at_kill;
  for (int round = 0; round < kKills; ++round) {
    auto before = watcher.stream_messages(kStream);
    testing::RelayProcess relay(args, logs.path() / "relay.log");
    // Half the kills come after a random time (which lands anywhere: start-up, claim, publish,
    // marking rows sent); the others once a random number of new messages is stored, i.e. surely
    // inside a batch. Either way a round ends by 1,200 new messages, so that ten rounds cannot
    // drain all 20,000 rows however fast the relay is.
    constexpr uint64_t kMaxGrowth = 1200;
    auto grown = [&](uint64_t n) { return [&, n] { return watcher.stream_messages(kStream) >= before + n; }; };
    if (rng() % 2 == 0) {
      testing::eventually(grown(kMaxGrowth), std::chrono::milliseconds(rng() % 700));
    } else {
      testing::eventually(grown(1 + rng() % kMaxGrowth), 15s);
    }
    REQUIRE(relay.alive());  // it was killed by us, not by a crash of its own
    relay.kill_now();
    ++kills;
    stored_at_kill.push_back(watcher.stream_messages(kStream));
  }
  std::string progress;
  for (auto n : stored_at_kill) progress += std::to_string(n) + " ";
  MESSAGE(backend << ": stream size at each kill: " << progress);
  CHECK(stored_at_kill.back() < static_cast<uint64_t>(kEvents));  // the kills really were mid-drain

  // A relay that is left alone finishes the job once the dead relays' leases end.
  int runs = 0;
  while (runs < 15 && count_status(database_url, "sent") < kEvents) {
    std::this_thread::sleep_for(1600ms);
    std::vector<std::string> once = args;
    once.push_back("--once");
    testing::RelayProcess finisher(once, logs.path() / "relay.log");
    CHECK(finisher.wait(60s) == 0);
    ++runs;
  }
  auto seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - started).count();

  std::vector<std::string> seen;
  for (const auto& m : watcher.read_stream(kStream)) seen.push_back(m.msg_id);
  auto t = testing::tally(ids, seen);
  auto sent = count_status(database_url, "sent");
  MESSAGE(backend << ": events " << kEvents << ", kills " << kills << ", stored " << t.seen << ", lost " << t.lost
                  << ", duplicated " << t.duplicated << ", rows sent " << sent << ", finishing runs " << runs
                  << ", " << seconds << " s");
  if (t.lost != 0 || sent != kEvents) MESSAGE(testing::detail::file_tail(logs.path() / "relay.log"));
  CHECK(t.lost == 0);
  CHECK(t.duplicated == 0);
  CHECK(t.unexpected == 0);
  CHECK(t.seen == static_cast<size_t>(kEvents));
  CHECK(sent == kEvents);
}


// 30,000 rows over 40 keys (750 a key, interleaved as producers write them) drained by `relays`
// relay processes while nats-server is SIGKILLed and restarted on the same store three times at
// random points. Afterwards, read from the stream: each event exactly once, and each key's
// events in the order they were enqueued.
constexpr int kOrderEvents = 30000;
constexpr int kOrderKeys = 40;

void restart_nats_under_relays(const std::string& database_url, const testing::KeyedEvents& events, int relays,
                               const std::string& backend) {
  testing::NatsServer server;
  auto config = testing::test_config(server.url(), "orders");
  config.stream.memory_storage = false;  // the stream outlives the restarts
  {
    Connection admin(config);
    Topology(admin).ensure_events_stream();
  }
  testing::TempDir logs("relay-logs");
  const std::vector<std::string> args = {"--database", database_url, "--nats", server.url(), "--env", "test",
                                         "--app", "orders", "--ack-timeout", "1000", "--lease", "3000",
                                         "--poll-interval", "20"};
  auto rng = testing::fault_random(backend + " NATS restarts");
  std::vector<uint64_t> kill_at;
  for (int i = 0; i < 3; ++i) kill_at.push_back(1000 + rng() % 24000);
  std::sort(kill_at.begin(), kill_at.end());

  std::vector<std::unique_ptr<testing::RelayProcess>> running;
  for (int r = 0; r < relays; ++r)
    running.push_back(std::make_unique<testing::RelayProcess>(args, logs.path() / ("relay-" + std::to_string(r) + ".log")));
  const auto started = std::chrono::steady_clock::now();
  std::string progress;
  for (auto target : kill_at) {
    testing::RawNats watcher(server.url());
    testing::eventually([&] { return watcher.stream_messages(kStream) >= target; }, 60s);
    const auto stored = watcher.stream_messages(kStream);
    server.kill();
    progress += std::to_string(stored) + " ";
    std::this_thread::sleep_for(std::chrono::milliseconds(rng() % 1000));
    server.start();
  }
  MESSAGE(backend << ": stream size at each nats-server kill: " << progress);
  for (auto& r : running) REQUIRE(r->alive());

  testing::eventually([&] { return count_status(database_url, "sent") >= kOrderEvents; }, 120s);
  const auto seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - started).count();
  running.clear();

  testing::RawNats reader(server.url());
  std::vector<std::string> seen;
  for (const auto& m : reader.read_stream(kStream)) seen.push_back(m.msg_id);
  const auto out_of_order = events.out_of_key_order(seen);
  auto t = testing::tally(events.ids, seen);
  const auto sent = count_status(database_url, "sent");
  MESSAGE(backend << ", " << relays << " relay(s): events " << kOrderEvents << ", stored " << t.seen << ", lost "
                  << t.lost << ", duplicated " << t.duplicated << ", out of key order " << out_of_order
                  << ", rows sent " << sent << ", " << seconds << " s");
  if (t.lost != 0 || sent != kOrderEvents) MESSAGE(testing::detail::file_tail(logs.path() / "relay-0.log"));
  CHECK(t.lost == 0);
  CHECK(t.duplicated == 0);
  CHECK(t.unexpected == 0);
  CHECK(out_of_order == 0);
  CHECK(sent == kOrderEvents);
}

}  // namespace

TEST_CASE("SQLite: relay SIGKILLed 10 times at random points while draining 20,000 rows") {
  testing::TempDir dir;
  auto path = testing::sqlite_file(dir);
  std::vector<std::string> ids;
  {
    store::SqliteDatabase db(path);
    store::migrate(db);
    auto tx = db.begin();
    for (int i = 0; i < kEvents; ++i) {
      auto e = Envelope::make("order.created", "orders", {{"i", i}});
      enqueue(tx, kSubject, e);
      ids.push_back(e.event_id);
    }
    tx.commit();
  }
  kill_relay_repeatedly("sqlite://" + path, ids, "SQLite");
}

TEST_CASE("PostgreSQL: relay SIGKILLed 10 times at random points while draining 20,000 rows") {
  auto url = testing::fresh_postgres_database("fault_relay");
  std::vector<std::string> ids;
  {
    store::PostgresDatabase db(url);
    store::migrate(db);
    pqxx::work tx(db.connection());
    for (int i = 0; i < kEvents; ++i) {
      auto e = Envelope::make("order.created", "orders", {{"i", i}});
      // Some rows carry a partition key so the kills also hit the per-key claim path.
      std::optional<std::string> key;
      if (i % 4 == 0) key = "order-" + std::to_string(i % 97);
      enqueue(tx, kSubject, e, key);
      ids.push_back(e.event_id);
    }
    tx.commit();
  }
  kill_relay_repeatedly(url, ids, "PostgreSQL");
}

TEST_CASE("SQLite: nats-server SIGKILLed and restarted 3 times under a draining relay: 30,000 rows, 40 keys, each once, in key order") {
  testing::TempDir dir;
  auto path = testing::sqlite_file(dir);
  store::SqliteDatabase db(path);
  store::migrate(db);
  auto events = testing::KeyedEvents::enqueue(db, kSubject, kOrderEvents, kOrderKeys);
  restart_nats_under_relays("sqlite://" + path, events, 1, "SQLite");
}

TEST_CASE("PostgreSQL: nats-server SIGKILLed and restarted 3 times under two relays: 30,000 rows, 40 keys, each once, in key order") {
  auto url = testing::fresh_postgres_database("fault_relay_order");
  store::PostgresDatabase db(url);
  store::migrate(db);
  auto events = testing::KeyedEvents::enqueue(db, kSubject, kOrderEvents, kOrderKeys);
  restart_nats_under_relays(url, events, 2, "PostgreSQL");
}
