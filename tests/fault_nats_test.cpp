// ctest-labels: fault
// NATS-side faults with the whole path running: nats-server SIGKILLed and restarted on the same
// store while a batch is being published and an inbox consumer is applying it; and a flood in
// which one message in ten always fails. Each test prints events / kills / lost / duplicated and
// asserts lost = 0 and duplicated = 0.
#include <algorithm>
#include <atomic>
#include <chrono>
#include <map>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include <doctest/doctest.h>
#include <nlohmann/json.hpp>

#include <natspubsub/connection.hpp>
#include <natspubsub/consumer.hpp>
#include <natspubsub/dlq.hpp>
#include <natspubsub/envelope.hpp>
#include <natspubsub/inbox_handler.hpp>
#include <natspubsub/publisher.hpp>
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

Config durable_config(const std::string& url, const std::string& app) {
  auto c = testing::test_config(url, app);
  c.stream.memory_storage = false;  // the streams (events and DLQ) must survive a server restart
  return c;
}

std::vector<std::string> ledger_ids(const std::string& db_url) {
  auto db = store::open_database(db_url);
  std::vector<std::string> ids;
  for (const auto& row : testing::query(*db, "SELECT event_id FROM ledger")) ids.push_back(row[0].as_text());
  return ids;
}

}  // namespace

TEST_CASE("nats-server SIGKILLed and restarted during batch publishing and inbox consumption") {
  testing::NatsServer server;
  testing::TempDir dir;
  const std::string db_url = "sqlite://" + testing::sqlite_file(dir);
  {
    auto db = store::open_database(db_url);
    store::migrate(*db);
    testing::execute(*db, "CREATE TABLE ledger (event_id TEXT NOT NULL)");  // no unique key: a double shows
  }
  Connection orders(durable_config(server.url(), "orders"));
  Topology(orders).ensure_events_stream();
  Connection payments(durable_config(server.url(), "payments"));

  InboxHandler handler([&] { return store::open_database(db_url); },
                       [](const Message& m, store::Transaction& tx) {
                         tx.execute("INSERT INTO ledger (event_id) VALUES ($1)", {m.envelope.event_id});
                       });
  Consumer consumer(payments);
  SubscriptionOptions so;
  so.concurrency = 4;
  so.max_attempts = 50;  // a restart must not push a healthy message into the DLQ
  so.backoff = Backoff::list({100ms});
  so.ack_wait = 3s;
  consumer.subscribe_subject("test.orders.>", handler, so);
  consumer.start();

  constexpr int kEvents = 5000;
  std::vector<OutgoingEvent> batch;
  std::vector<std::string> ids;
  for (int i = 0; i < kEvents; ++i) {
    OutgoingEvent e{"order.created", {{"i", i}}, {}};
    e.options.event_id = new_uuid();
    ids.push_back(*e.options.event_id);
    batch.push_back(std::move(e));
  }

  // The producer publishes in chunks, so publishing is still going on when the server dies; the
  // consumer applies what is stored meanwhile.
  Publisher publisher(orders);
  auto started = std::chrono::steady_clock::now();
  testing::ChunkedProducer producer(publisher, batch, 250);
  // Both under way: some events applied, a good part published, more to come.
  REQUIRE(testing::eventually([&] { return handler.processed() >= 100 && producer.published() >= 600; }, 60s));
  auto processed_at_kill = handler.processed();
  auto published_at_kill = producer.published();
  server.kill();
  int kills = 1;
  std::this_thread::sleep_for(500ms);
  server.start();
  producer.join();

  bool done = testing::eventually([&] { return ledger_ids(db_url).size() >= static_cast<size_t>(kEvents); }, 90s);
  std::this_thread::sleep_for(1s);  // a late redelivery would show up as a second row now
  consumer.stop(5s);
  auto seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - started).count();

  std::vector<std::string> stored;
  for (const auto& m : testing::RawNats(server.url()).read_stream(kStream)) stored.push_back(m.msg_id);
  auto in_stream = testing::tally(ids, stored);
  auto applied = testing::tally(ids, ledger_ids(db_url));
  MESSAGE("events " << kEvents << ", kills " << kills << " (after " << processed_at_kill << " processed and "
                    << published_at_kill << " published), publishes not acknowledged at first "
                    << producer.first_failures() << ", resent " << producer.retries()
                    << "; stream: stored " << in_stream.seen << ", lost "
                    << in_stream.lost << ", duplicated " << in_stream.duplicated << "; processed: "
                    << applied.seen << ", lost " << applied.lost << ", duplicated " << applied.duplicated
                    << ", redeliveries absorbed by the inbox " << handler.duplicates() << ", " << seconds << " s");
  CHECK(producer.never_acknowledged() == 0);
  CHECK(done);
  CHECK(processed_at_kill < static_cast<uint64_t>(kEvents));  // the kill was mid-consumption
  CHECK(published_at_kill < static_cast<size_t>(kEvents));  // and mid-publishing
  CHECK(in_stream.lost == 0);
  CHECK(in_stream.duplicated == 0);
  CHECK(applied.lost == 0);
  CHECK(applied.duplicated == 0);
  CHECK(applied.unexpected == 0);
  CHECK(consumer.stats().front().dead_lettered == 0);
}

TEST_CASE("a flood of 1,000 messages of which 100 always fail: exactly those 100 in the DLQ, the rest once") {
  testing::NatsServer server;
  Connection orders(durable_config(server.url(), "orders"));
  Topology(orders).ensure_events_stream();
  auto pay_config = durable_config(server.url(), "payments");
  Connection payments(pay_config);

  constexpr int kEvents = 1000;
  constexpr int kMaxAttempts = 3;
  std::mutex mutex;
  std::map<std::string, int> successes;
  std::map<std::string, int> failures;
  Consumer consumer(payments);
  SubscriptionOptions so;
  so.concurrency = 8;
  so.max_attempts = kMaxAttempts;
  so.backoff = Backoff::list({20ms, 40ms});
  consumer.subscribe_subject(
      "test.orders.>",
      [&](const Message& m) {
        std::lock_guard lock(mutex);
        if (m.envelope.message.value("fail", false)) {
          failures[m.envelope.event_id]++;
          throw std::runtime_error("payment provider says no");
        }
        successes[m.envelope.event_id]++;
      },
      so);
  consumer.start();

  std::vector<OutgoingEvent> batch;
  std::vector<std::string> good;
  std::vector<std::string> bad;
  for (int i = 0; i < kEvents; ++i) {
    bool fail = i % 10 == 3;
    OutgoingEvent e{"payment.requested", {{"i", i}, {"fail", fail}}, {}};
    e.options.event_id = new_uuid();
    (fail ? bad : good).push_back(*e.options.event_id);
    batch.push_back(std::move(e));
  }
  auto started = std::chrono::steady_clock::now();
  Publisher publisher(orders);
  for (const auto& r : publisher.publish_batch(batch)) REQUIRE(r);

  testing::RawNats raw(server.url());
  const auto dlq_stream = pay_config.dlq_stream_name();
  bool done = testing::eventually(
      [&] {
        std::lock_guard lock(mutex);
        uint64_t in_dlq = 0;
        try {
          in_dlq = raw.stream_messages(dlq_stream);
        } catch (...) {
        }
        return successes.size() == good.size() && in_dlq >= bad.size();
      },
      60s);
  std::this_thread::sleep_for(500ms);  // anything extra would arrive now
  consumer.stop(5s);
  auto seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - started).count();

  std::vector<std::string> dead;
  size_t unreadable = 0, body_changed = 0;
  std::map<std::string, std::string> body_of;
  for (const auto& m : raw.read_stream(kStream)) body_of[m.msg_id] = m.data;
  for (const auto& m : raw.read_stream(dlq_stream)) {
    Headers headers(m.headers.begin(), m.headers.end());
    try {
      auto letter = parse_dead_letter(m.subject, m.data, headers);
      dead.push_back(letter.context.event_id);
      if (body_of[letter.context.event_id] != m.data) body_changed++;
    } catch (const std::exception& e) {
      unreadable++;
    }
  }
  std::vector<std::string> processed;
  std::map<int, int> attempts_histogram;  // attempts -> failing events
  {
    std::lock_guard lock(mutex);
    for (const auto& [id, n] : successes)
      for (int k = 0; k < n; ++k) processed.push_back(id);
    for (const auto& [id, n] : failures) attempts_histogram[n]++;
  }
  auto dlq = testing::tally(bad, dead);
  auto ok = testing::tally(good, processed);
  MESSAGE("events " << kEvents << " (" << bad.size() << " always failing), DLQ: " << dlq.seen << " stored, lost "
                    << dlq.lost << ", duplicated " << dlq.duplicated << ", unexpected " << dlq.unexpected
                    << "; processed: " << ok.seen << ", lost " << ok.lost << ", duplicated " << ok.duplicated
                    << "; failing events attempted " << kMaxAttempts << " times: " << attempts_histogram[kMaxAttempts]
                    << "; " << seconds << " s");
  CHECK(done);
  CHECK(unreadable == 0);
  CHECK(body_changed == 0);
  CHECK(dlq.lost == 0);
  CHECK(dlq.duplicated == 0);
  CHECK(dlq.unexpected == 0);
  CHECK(ok.lost == 0);
  CHECK(ok.duplicated == 0);
  CHECK(ok.unexpected == 0);
  CHECK(attempts_histogram[kMaxAttempts] == static_cast<int>(bad.size()));  // retried, not a tight loop or one shot
  auto s = consumer.stats().front();
  CHECK(s.dead_lettered == bad.size());
  CHECK(s.acked == good.size());
}
