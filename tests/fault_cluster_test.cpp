// ctest-labels: fault
// A 3-node JetStream cluster on loopback with replicated (R3) streams: the stream leader is
// SIGKILLed while a batch is being published and an inbox consumer is applying it. Nothing may be
// lost or applied twice, and publishing and consuming must carry on with the two nodes left.
#include <algorithm>
#include <atomic>
#include <map>
#include <chrono>
#include <string>
#include <thread>
#include <vector>

#include <doctest/doctest.h>

#include <natspubsub/connection.hpp>
#include <natspubsub/consumer.hpp>
#include <natspubsub/envelope.hpp>
#include <natspubsub/outbox.hpp>
#include <natspubsub/inbox_handler.hpp>
#include <natspubsub/publisher.hpp>
#include <natspubsub/store/database.hpp>
#include <natspubsub/store/migrations.hpp>
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

Config cluster_config(const testing::NatsCluster& cluster, const std::string& app) {
  auto c = testing::test_config(cluster.url(), app);
  c.servers = cluster.urls();
  c.stream.replicas = 3;
  c.stream.memory_storage = false;
  c.connection.reconnect_wait = 200ms;
  c.connection.reconnect_jitter = 100ms;
  return c;
}

// The name of the server leading `stream`, or "" while there is none (during an election).
std::string stream_leader(const std::string& url, const std::string& stream) {
  try {
    testing::RawNats raw(url);
    jsStreamInfo* si = nullptr;
    jsErrCode jerr = static_cast<jsErrCode>(0);
    if (js_GetStreamInfo(&si, raw.js(), stream.c_str(), nullptr, &jerr) != NATS_OK) return {};
    std::string leader = (si->Cluster != nullptr && si->Cluster->Leader != nullptr) ? si->Cluster->Leader : "";
    jsStreamInfo_Destroy(si);
    return leader;
  } catch (...) {
    return {};
  }
}

std::vector<std::string> ledger_ids(const std::string& db_url) {
  auto db = store::open_database(db_url);
  std::vector<std::string> ids;
  for (const auto& row : testing::query(*db, "SELECT event_id FROM ledger")) ids.push_back(row[0].as_text());
  return ids;
}

std::vector<OutgoingEvent> make_events(int n, int offset, std::vector<std::string>& ids) {
  std::vector<OutgoingEvent> batch;
  for (int i = 0; i < n; ++i) {
    OutgoingEvent e{"order.created", {{"i", offset + i}}, {}};
    e.options.event_id = new_uuid();
    ids.push_back(*e.options.event_id);
    batch.push_back(std::move(e));
  }
  return batch;
}

// Publishes, then retries failures with the same event ids until all are acknowledged (bounded).
int publish_all(Publisher& publisher, const std::vector<OutgoingEvent>& batch) {
  BatchOptions bo;
  bo.window = 64;
  bo.ack_timeout = 2s;
  std::vector<PublishResult> results = publisher.publish_batch(batch, bo);
  int rounds = 0;
  for (; rounds < 40; ++rounds) {
    std::vector<size_t> failed;
    for (size_t i = 0; i < results.size(); ++i)
      if (!results[i]) failed.push_back(i);
    if (failed.empty()) return rounds;
    std::this_thread::sleep_for(300ms);
    std::vector<OutgoingEvent> retry;
    for (auto i : failed) retry.push_back(batch[i]);
    auto again = publisher.publish_batch(retry, bo);
    for (size_t k = 0; k < failed.size(); ++k) results[failed[k]] = again[k];
  }
  return -1;  // never all acknowledged
}

}  // namespace

TEST_CASE("3-node cluster, R3 stream: the stream leader killed during publishing and consuming") {
  testing::NatsCluster cluster(3);
  cluster.wait_until_ready();
  testing::TempDir dir;
  const std::string db_url = "sqlite://" + testing::sqlite_file(dir);
  {
    auto db = store::open_database(db_url);
    store::migrate(*db);
    testing::execute(*db, "CREATE TABLE ledger (event_id TEXT NOT NULL)");  // no unique key: a double shows
  }
  Connection orders(cluster_config(cluster, "orders"));
  Topology(orders).ensure_events_stream();
  Connection payments(cluster_config(cluster, "payments"));

  InboxHandler handler([&] { return store::open_database(db_url); },
                       [](const Message& m, store::Transaction& tx) {
                         tx.execute("INSERT INTO ledger (event_id) VALUES ($1)", {m.envelope.event_id});
                       });
  Consumer consumer(payments);
  SubscriptionOptions so;
  so.concurrency = 4;
  so.max_attempts = 50;
  so.backoff = Backoff::list({100ms});
  so.ack_wait = 3s;
  so.fetch_timeout = 500ms;
  consumer.subscribe_subject("test.orders.>", handler, so);
  consumer.start();

  auto leader = stream_leader(cluster.url(), kStream);
  REQUIRE_FALSE(leader.empty());
  int leader_index = -1;
  for (int i = 0; i < cluster.size(); ++i)
    if (cluster.node(i).server_name() == leader) leader_index = i;
  REQUIRE(leader_index >= 0);

  std::vector<std::string> ids;
  auto first = make_events(3000, 0, ids);
  auto started = std::chrono::steady_clock::now();
  Publisher publisher(orders);
  testing::ChunkedProducer producer(publisher, first, 200);
  // Both under way: some events applied, a good part published, more to come.
  REQUIRE(testing::eventually([&] { return handler.processed() >= 100 && producer.published() >= 600; }, 60s));
  auto processed_at_kill = handler.processed();
  auto published_at_kill = producer.published();
  cluster.node(leader_index).kill();
  producer.join();

  // With the old leader still down: a new one is elected, and a second batch goes through.
  std::string new_leader;
  CHECK(testing::eventually(
      [&] {
        new_leader = stream_leader(cluster.url(), kStream);
        return !new_leader.empty() && new_leader != leader;
      },
      30s));
  auto second = make_events(1000, 3000, ids);
  int rounds_second = publish_all(publisher, second);

  bool done = testing::eventually([&] { return ledger_ids(db_url).size() >= ids.size(); }, 90s);
  std::this_thread::sleep_for(1s);  // a late redelivery would show up as a second row now
  consumer.stop(5s);
  auto seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - started).count();

  std::vector<std::string> stored;
  for (const auto& m : testing::RawNats(cluster.url()).read_stream(kStream)) stored.push_back(m.msg_id);
  auto in_stream = testing::tally(ids, stored);
  auto applied = testing::tally(ids, ledger_ids(db_url));
  MESSAGE("events " << ids.size() << ", kills 1 (stream leader " << leader << " after " << processed_at_kill
                    << " processed and " << published_at_kill << " published; new leader " << new_leader
                    << "), first batch: not acknowledged at first " << producer.first_failures() << ", resent "
                    << producer.retries() << "; second batch retry rounds " << rounds_second << "; stream: stored " << in_stream.seen << ", lost " << in_stream.lost
                    << ", duplicated " << in_stream.duplicated << "; processed: " << applied.seen << ", lost "
                    << applied.lost << ", duplicated " << applied.duplicated << ", redeliveries absorbed by the inbox "
                    << handler.duplicates() << ", " << seconds << " s");
  CHECK(producer.never_acknowledged() == 0);
  CHECK(rounds_second >= 0);
  CHECK(done);
  CHECK(processed_at_kill < 3000);  // the kill was mid-consumption
  CHECK(published_at_kill < 3000);  // and mid-publishing
  CHECK(in_stream.lost == 0);
  CHECK(in_stream.duplicated == 0);
  CHECK(applied.lost == 0);
  CHECK(applied.duplicated == 0);
  CHECK(applied.unexpected == 0);
}

TEST_CASE("3-node cluster, R3 stream: the stream leader killed while a relay drains 30,000 rows over 40 keys") {
  testing::NatsCluster cluster(3);
  cluster.wait_until_ready();
  testing::TempDir dir;
  const auto path = testing::sqlite_file(dir);
  constexpr int kEvents = 30000;
  constexpr int kKeys = 40;
  testing::KeyedEvents events;
  {
    store::SqliteDatabase db(path);
    store::migrate(db);
    events = testing::KeyedEvents::enqueue(db, "test.orders.order.created", kEvents, kKeys);
  }
  {
    Connection admin(cluster_config(cluster, "orders"));
    Topology(admin).ensure_events_stream();  // R3, file storage; the relay finds it and keeps it
  }
  auto leader = stream_leader(cluster.url(), kStream);
  REQUIRE_FALSE(leader.empty());
  int leader_index = -1;
  for (int i = 0; i < cluster.size(); ++i)
    if (cluster.node(i).server_name() == leader) leader_index = i;
  REQUIRE(leader_index >= 0);

  testing::TempDir logs("relay-logs");
  testing::RelayProcess relay({"--database", "sqlite://" + path, "--nats", cluster.url(), "--env", "test", "--app",
                               "orders", "--ack-timeout", "2000", "--lease", "10000", "--poll-interval", "20"},
                              logs.path() / "relay.log");
  auto rng = testing::fault_random("relay under a leader kill");
  const uint64_t kill_at = 2000 + rng() % 20000;
  testing::RawNats watcher(cluster.url());
  REQUIRE(testing::eventually([&] { return watcher.stream_messages(kStream) >= kill_at; }, 60s));
  const auto stored_at_kill = watcher.stream_messages(kStream);
  cluster.node(leader_index).kill();
  auto sent = [&] {
    store::SqliteDatabase db(path);
    return testing::query(db, "SELECT COUNT(*) FROM natspubsub_outbox WHERE status = 'sent'")[0].as_int(0);
  };
  const bool drained = testing::eventually([&] { return sent() >= kEvents; }, 120s);
  CHECK(relay.alive());
  relay.kill_now();
  // A leader election is not the rows' fault: no attempt was counted on any row.
  const auto max_attempts = [&] {
    store::SqliteDatabase db(path);
    return testing::query(db, "SELECT COALESCE(MAX(attempts), 0) FROM natspubsub_outbox")[0].as_int(0);
  }();
  MESSAGE("largest attempts count of a row after the leader kill: " << max_attempts);
  CHECK(max_attempts == 0);

  std::vector<std::string> seen;
  for (const auto& m : testing::RawNats(cluster.url()).read_stream(kStream)) seen.push_back(m.msg_id);
  const auto out_of_order = events.out_of_key_order(seen);
  auto t = testing::tally(events.ids, seen);
  MESSAGE("stream state: " << testing::RawNats(cluster.url()).stream_messages(kStream) << " messages");
  MESSAGE("stream leader " << leader << " killed at " << stored_at_kill << " stored; stored " << t.seen << ", lost "
                           << t.lost << ", duplicated " << t.duplicated << ", out of key order " << out_of_order);
  if (!drained || t.lost != 0) MESSAGE(testing::detail::file_tail(logs.path() / "relay.log"));
  CHECK(drained);
  CHECK(stored_at_kill < static_cast<uint64_t>(kEvents));  // the kill was mid-drain
  CHECK(t.lost == 0);
  CHECK(t.duplicated == 0);
  CHECK(out_of_order == 0);
}
