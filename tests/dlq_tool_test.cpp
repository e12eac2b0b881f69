// natspubsub-dlq against a real server: dead letters made by a real consumer, then listed,
// shown, counted, replayed (inside the duplicate window) and purged; failed outbox rows retried.
#include <atomic>
#include <chrono>
#include <set>
#include <sstream>
#include <thread>

#include <doctest/doctest.h>

#include <natspubsub/connection.hpp>
#include <natspubsub/consumer.hpp>
#include <natspubsub/error.hpp>
#include <natspubsub/publisher.hpp>
#include <natspubsub/store/migrations.hpp>
#include <natspubsub/store/sqlite.hpp>
#include <natspubsub/topology.hpp>

#include "support/nats_helpers.hpp"
#include "support/eventually.hpp"
#include "support/servers.hpp"

using namespace natspubsub;
using namespace std::chrono_literals;
using natspubsub::testing::eventually;

namespace {

const std::string kTool = NATSPUBSUB_BINARY_DIR "/workers/natspubsub-dlq";

std::vector<nlohmann::json> json_lines(const std::string& text) {
  std::vector<nlohmann::json> out;
  std::istringstream in(text);
  std::string line;
  while (std::getline(in, line)) {
    if (line.empty() || line.front() != '{') continue;
    out.push_back(nlohmann::json::parse(line));  // throws (fails the test) on malformed output
  }
  return out;
}

}  // namespace

TEST_CASE("list, show, stats, replay inside the duplicate window, purge") {
  testing::NatsServer server;
  auto orders_config = testing::test_config(server.url(), "orders");
  Connection orders(orders_config);
  Topology(orders).ensure_events_stream();
  auto config = testing::test_config(server.url(), "payments");
  Connection nats(config);

  // A consumer that refuses orders until `healthy` is set: they go to the DLQ at once.
  std::atomic<bool> healthy{false};
  std::mutex seen_mutex;
  std::multiset<std::string> handled;  // event ids handled successfully
  Consumer consumer(nats);
  consumer.subscribe_subject("test.orders.>", [&](const Message& m) {
    if (!healthy && m.envelope.topic == "order.created")
      throw PermanentError("card declined for " + m.envelope.message.at("id").dump());
    if (!healthy) throw PermanentError("shipping refused");
    std::lock_guard lock(seen_mutex);
    handled.insert(m.envelope.event_id);
  });
  consumer.start();

  Publisher publisher(orders);
  std::vector<std::string> ids;
  for (int i = 0; i < 5; ++i) ids.push_back(publisher.publish("order.created", {{"id", i}}).event_id);
  ids.push_back(publisher.publish("order.shipped", {{"id", 99}}).event_id);
  REQUIRE(eventually([&] { return consumer.stats().front().dead_lettered == 6; }));

  const std::string common = kTool + " --nats " + server.url() + " --env test --app payments ";

  auto list = testing::run_command(common + "list --json 2>/dev/null");
  REQUIRE(list.status == 0);
  auto rows = json_lines(list.output);
  REQUIRE(rows.size() == 6);
  for (const auto& r : rows) {
    CHECK(r["reason"] == "permanent_error");
    CHECK(r["seq"].is_number_unsigned());
    CHECK(r["subject"].get<std::string>().rfind("test.orders.", 0) == 0);
  }
  // Handlers run concurrently, so the DLQ order is not the publish order: find by event id.
  auto row_of = [&](const std::string& id) {
    for (const auto& r : rows)
      if (r["event_id"] == id) return r;
    return nlohmann::json();
  };
  CHECK(row_of(ids[0])["error_message"].get<std::string>().find("card declined") != std::string::npos);
  CHECK(row_of(ids[5])["error_message"] == "shipping refused");

  auto filtered = json_lines(testing::run_command(common + "list --json --topic order.shipped 2>/dev/null").output);
  REQUIRE(filtered.size() == 1);
  CHECK(filtered[0]["event_id"] == ids[5]);
  CHECK(json_lines(testing::run_command(common + "list --json --reason malformed 2>/dev/null").output).empty());
  CHECK(json_lines(testing::run_command(common + "list --json --limit 2 2>/dev/null").output).size() == 2);
  CHECK(json_lines(testing::run_command(common + "list --json --since 1h 2>/dev/null").output).size() == 6);
  CHECK(json_lines(testing::run_command(common + "list --json --since 2099-01-01T00:00:00Z 2>/dev/null").output).empty());

  auto table = testing::run_command(common + "list 2>&1");
  CHECK(table.output.find("REASON") != std::string::npos);
  CHECK(table.output.find("6 dead letter(s)") != std::string::npos);

  auto show = testing::run_command(common + "show " + ids[1] + " 2>&1");
  INFO(show.output);
  CHECK(show.status == 0);
  CHECK(show.output.find("Context:") != std::string::npos);
  CHECK(show.output.find("topic: order.created") != std::string::npos);  // the original headers
  CHECK(show.output.find("\"reason\": \"permanent_error\"") != std::string::npos);
  CHECK(show.output.find(ids[1]) != std::string::npos);
  auto missing = testing::run_command(common + "show 9999 2>&1");
  CHECK(missing.status != 0);

  auto stats = testing::run_command(common + "stats --json 2>/dev/null");
  auto s = json_lines(stats.output);
  REQUIRE(s.size() == 1);
  CHECK(s[0]["total"] == 6);
  CHECK(s[0]["by_topic"]["order.created"]["permanent_error"] == 5);
  CHECK(s[0]["by_reason"]["permanent_error"] == 6);

  // Without --yes and without a terminal the tool refuses rather than guess.
  auto refused = testing::run_command(common + "replay --all < /dev/null 2>&1");
  CHECK(refused.status != 0);
  CHECK(refused.output.find("--yes") != std::string::npos);

  auto dry = testing::run_command(common + "replay --all --topic order.created --dry-run 2>&1");
  CHECK(dry.output.find("5 dead letter(s) would be replayed") != std::string::npos);

  // The dependency is back: replay the order.created dead letters. They were published seconds
  // ago, inside the 2-minute duplicate window, so the replay needs its fresh Nats-Msg-Id.
  healthy = true;
  auto replay = testing::run_command(common + "replay --all --topic order.created --yes 2>&1");
  INFO(replay.output);
  CHECK(replay.status == 0);
  CHECK(replay.output.find("5 replayed, 0 failed") != std::string::npos);
  REQUIRE(eventually([&] {
    std::lock_guard lock(seen_mutex);
    return handled.size() == 5;
  }));
  {
    std::lock_guard lock(seen_mutex);
    for (int i = 0; i < 5; ++i) CHECK(handled.count(ids[i]) == 1);  // same event ids reached the handler
  }
  auto after = json_lines(testing::run_command(common + "list --json 2>/dev/null").output);
  REQUIRE(after.size() == 1);  // replayed ones left the DLQ, only the shipped one stays
  CHECK(after[0]["event_id"] == ids[5]);

  // Replay one by sequence, then purge an empty DLQ.
  auto seq = std::to_string(after[0]["seq"].get<uint64_t>());
  CHECK(testing::run_command(common + "replay " + seq + " --yes 2>&1").status == 0);
  REQUIRE(eventually([&] {
    std::lock_guard lock(seen_mutex);
    return handled.count(ids[5]) == 1;
  }));
  CHECK(json_lines(testing::run_command(common + "list --json 2>/dev/null").output).empty());

  healthy = false;
  auto extra = publisher.publish("order.created", {{"id", 7}});
  REQUIRE(eventually([&] { return consumer.stats().front().dead_lettered == 7; }));
  auto purge = testing::run_command(common + "purge --all --yes 2>&1");
  CHECK(purge.output.find("1 purged") != std::string::npos);
  CHECK(json_lines(testing::run_command(common + "list --json 2>/dev/null").output).empty());
  consumer.stop(5s);
}

TEST_CASE("outbox list and retry of failed rows") {
  testing::TempDir dir;
  auto path = (dir.path() / "o.db").string();
  {
    store::SqliteDatabase db(path);
    store::migrate(db);
    db.execute(
        "INSERT INTO natspubsub_outbox (event_id, subject, payload, status, attempts, last_error) VALUES "
        "('e1', 'test.orders.x', '{}', 'failed', 10, 'no stream'), ('e2', 'test.orders.y', '{}', 'failed', 10, 'no stream'), "
        "('e3', 'test.orders.z', '{}', 'pending', 0, NULL)");
  }
  const std::string common = kTool + " outbox --database sqlite://" + path + " ";
  auto list = json_lines(testing::run_command(common + "list --json 2>/dev/null").output);
  REQUIRE(list.size() == 2);
  CHECK(list[0]["event_id"] == "e1");
  CHECK(list[0]["attempts"] == 10);
  CHECK(list[0]["last_error"] == "no stream");
  auto one = testing::run_command(common + "retry " + std::to_string(list[0]["id"].get<int64_t>()) + " 2>&1");
  CHECK(one.output.find("1 row(s) pending again") != std::string::npos);
  CHECK(json_lines(testing::run_command(common + "list --json 2>/dev/null").output).size() == 1);
  auto all = testing::run_command(common + "retry --all 2>&1");
  CHECK(all.output.find("1 row(s) pending again") != std::string::npos);
  auto pending = testing::run_command("sqlite3 " + path + " \"SELECT COUNT(*) FROM natspubsub_outbox WHERE status='pending' AND attempts=0\"");
  CHECK(pending.output == "3\n");
  auto bad = testing::run_command(kTool + " outbox --database mysql://nope list 2>&1");
  CHECK(bad.status == 4);
}
