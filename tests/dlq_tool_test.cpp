// natspubsub-dlq against a real server: dead letters made by a real consumer, then listed,
// shown, counted, replayed (inside the duplicate window) and purged; failed outbox rows retried.
#include <atomic>
#include <chrono>
#include <csignal>
#include <filesystem>
#include <mutex>
#include <set>
#include <sstream>
#include <thread>

#include <doctest/doctest.h>

#include <natspubsub/connection.hpp>
#include <natspubsub/consumer.hpp>
#include <natspubsub/dlq.hpp>
#include <natspubsub/error.hpp>
#include <natspubsub/publisher.hpp>
#include <natspubsub/store/migrations.hpp>
#include <natspubsub/store/sqlite.hpp>
#include <natspubsub/topology.hpp>

#include "support/databases.hpp"
#include "support/nats_helpers.hpp"
#include "support/process.hpp"
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

// ---- issue 13: never lose a letter, replay to the failed consumer only ----------------------------

namespace {

std::string header_of(const testing::StoredMessage& m, const std::string& key) {
  for (const auto& [k, v] : m.headers)
    if (k == key) return v;
  return {};
}

// `n` dead letters of durable `consumer` whose originals were no envelopes (no event id), written
// straight into the DLQ stream as the consumer runtime writes them.
void write_letters(Connection& nats, const Config& config, const std::string& consumer, int n,
                   DlqReason reason = DlqReason::malformed, const std::string& reason_name = {}) {
  std::vector<RawMessage> batch;
  for (int i = 0; i < n; ++i) {
    DeadLetter l;
    l.original_subject = "test.orders.order.created";
    l.body = "not an envelope #" + std::to_string(i);
    l.context.reason = reason;
    l.context.reason_name = reason_name;
    l.context.error_class = "natspubsub::EnvelopeError";
    l.context.error_message = "not JSON";
    l.context.deliveries = 1;
    l.context.stream = "test-orders-events";
    l.context.sequence = static_cast<uint64_t>(i + 1);
    l.context.consumer = consumer;
    batch.push_back(make_dlq_message(l, dlq_subject(config, l.original_subject), 1024 * 1024));
  }
  Publisher publisher(nats);
  for (const auto& r : publisher.publish_raw_batch(batch)) REQUIRE(r);
}

// The replay route of `durable` as a started Consumer would make it, without running one.
void make_replay_route(Connection& nats, const Config& config, const std::string& durable) {
  Topology t(nats);
  t.ensure_replay_stream();
  ConsumerSpec spec;
  spec.stream = Topology::replay_stream_spec(config).name;
  spec.durable = replay_durable("test-orders-events", durable);  // write_letters' stream
  spec.filter_subject = replay_subject(config, "test-orders-events", durable);
  t.ensure_consumer(spec);
}

// Letters that are both in the replay stream (by their x-replayed-from) and still in the DLQ:
// what an interrupted replay must never leave behind.
size_t replayed_and_kept(testing::RawNats& raw, const std::string& dlq, const std::string& replay_stream) {
  std::set<std::string> replayed_from;
  for (const auto& m : raw.read_stream(replay_stream)) replayed_from.insert(header_of(m, "x-replayed-from"));
  size_t both = 0;
  for (const auto& m : raw.read_stream(dlq)) both += replayed_from.count(dlq + ":" + std::to_string(m.sequence));
  return both;
}

uint64_t consumer_delivered(jsCtx* js, const std::string& stream, const std::string& durable) {
  jsConsumerInfo* ci = nullptr;
  jsErrCode jerr = static_cast<jsErrCode>(0);
  REQUIRE(js_GetConsumerInfo(&ci, js, stream.c_str(), durable.c_str(), nullptr, &jerr) == NATS_OK);
  const uint64_t delivered = ci->Delivered.Stream;
  jsConsumerInfo_Destroy(ci);
  return delivered;
}

}  // namespace

TEST_CASE("30,000 letters without event ids replayed with --all: each exactly once, the DLQ empty") {
  testing::NatsServer server;
  auto config = testing::test_config(server.url(), "payments");
  Connection nats(config);
  Topology(nats).ensure_dlq_stream();
  make_replay_route(nats, config, "test-payments-bulk");
  constexpr int kLetters = 30000;
  write_letters(nats, config, "test-payments-bulk", kLetters);

  const std::string common = kTool + " --nats " + server.url() + " --env test --app payments ";
  const auto scan_start = std::chrono::steady_clock::now();
  auto stats = json_lines(testing::run_command(common + "stats --json 2>/dev/null").output);
  MESSAGE("stats over " << kLetters << " letters took "
          << std::chrono::duration_cast<std::chrono::milliseconds>(std::chrono::steady_clock::now() - scan_start).count()
          << " ms (tool start and connect included)");
  REQUIRE(stats.size() == 1);
  CHECK(stats[0]["total"] == kLetters);

  const auto replay_start = std::chrono::steady_clock::now();
  auto replay = testing::run_command(common + "replay --all --yes --json 2>&1", 300s);
  MESSAGE("replay --all of " << kLetters << " letters took "
          << std::chrono::duration_cast<std::chrono::milliseconds>(std::chrono::steady_clock::now() - replay_start).count()
          << " ms");
  INFO(replay.output.substr(0, 2000));
  CHECK(replay.status == 0);
  auto out = json_lines(replay.output);
  REQUIRE(out.size() == 1);
  CHECK(out[0]["replayed"] == kLetters);
  CHECK(out[0]["failed"] == 0);

  testing::RawNats raw(server.url());
  const auto replay_stream = Topology::replay_stream_spec(config).name;
  CHECK(raw.stream_messages(config.dlq_stream_name()) == 0);
  REQUIRE(raw.stream_messages(replay_stream) == kLetters);
  std::set<std::string> bodies, from, ids;
  for (const auto& m : raw.read_stream(replay_stream)) {
    bodies.insert(m.data);
    from.insert(header_of(m, "x-replayed-from"));
    ids.insert(m.msg_id);
    CHECK(m.subject == replay_subject(config, "test-orders-events", "test-payments-bulk"));
  }
  CHECK(bodies.size() == kLetters);  // every letter's body, once
  CHECK(from.size() == kLetters);    // every DLQ sequence, once
  CHECK(ids.size() == kLetters);
  CHECK(ids.begin()->size() == std::string("replay-").size() + 36);  // a full UUID
}

TEST_CASE("a replay the stream reports as duplicate keeps its letter and says so") {
  testing::NatsServer server;
  auto config = testing::test_config(server.url(), "payments");
  Connection nats(config);
  Topology(nats).ensure_dlq_stream();
  make_replay_route(nats, config, "test-payments-dup");
  write_letters(nats, config, "test-payments-dup", 2);
  const std::string common = kTool + " --nats " + server.url() + " --env test --app payments ";
  auto rows = json_lines(testing::run_command(common + "list --json 2>/dev/null").output);
  REQUIRE(rows.size() == 2);
  const auto first = std::to_string(rows[0]["seq"].get<uint64_t>());
  const auto second = std::to_string(rows[1]["seq"].get<uint64_t>());

  auto ok = testing::run_command(common + "replay " + first + " --replay-id fixed-id-1 --yes 2>&1");
  INFO(ok.output);
  CHECK(ok.status == 0);
  CHECK(ok.output.find("1 replayed, 0 failed") != std::string::npos);
  // The same replay id inside the duplicate window: JetStream stores nothing, the letter stays.
  auto dup = testing::run_command(common + "replay " + second + " --replay-id fixed-id-1 --yes 2>&1");
  INFO(dup.output);
  CHECK(dup.status == 1);
  CHECK(dup.output.find("0 replayed, 1 failed") != std::string::npos);
  CHECK(dup.output.find("duplicate") != std::string::npos);
  auto left = json_lines(testing::run_command(common + "list --json 2>/dev/null").output);
  REQUIRE(left.size() == 1);
  CHECK(std::to_string(left[0]["seq"].get<uint64_t>()) == second);
  testing::RawNats raw(server.url());
  CHECK(raw.stream_messages(Topology::replay_stream_spec(config).name) == 1);
  // --replay-id names one replay.
  CHECK(testing::run_command(common + "replay --all --replay-id x --yes 2>&1").status == 2);
}

TEST_CASE("a replay reaches only the consumer that failed; a body left out is read back from its stream") {
  // A small max_payload: a dead letter of a 3,000-byte event cannot carry the body.
  testing::NatsServer::Options o;
  o.max_payload = 4096;
  testing::NatsServer server(o);
  auto orders_config = testing::test_config(server.url(), "orders");
  Connection orders(orders_config);
  Topology(orders).ensure_events_stream();
  auto config = testing::test_config(server.url(), "payments");
  Connection nats(config);

  std::atomic<bool> healthy{false};
  std::mutex mutex;
  std::vector<std::string> failing_bodies, failing_subjects, failing_consumers, other_ids;
  Consumer failing(nats);
  failing.subscribe_subject("test.orders.order.created", [&](const Message& m) {
    if (!healthy) throw PermanentError("card declined");
    std::lock_guard lock(mutex);
    failing_bodies.push_back(m.body);
    failing_subjects.push_back(m.subject);
    failing_consumers.push_back(m.metadata.consumer);
  }, {.durable = std::string("test-payments-charge")});
  failing.start();
  Consumer other(nats);
  other.subscribe_subject("test.orders.order.created", [&](const Message& m) {
    std::lock_guard lock(mutex);
    other_ids.push_back(m.envelope.event_id);
  }, {.durable = std::string("test-payments-audit")});
  other.start();

  Publisher publisher(orders);
  auto big = publisher.publish("order.created", {{"note", std::string(3600, 'x')}});
  REQUIRE(big);
  REQUIRE(eventually([&] { return failing.stats().front().dead_lettered == 1; }));
  REQUIRE(eventually([&] {
    std::lock_guard lock(mutex);
    return other_ids.size() == 1;
  }));

  const std::string common = kTool + " --nats " + server.url() + " --env test --app payments ";
  auto rows = json_lines(testing::run_command(common + "list --json 2>/dev/null").output);
  REQUIRE(rows.size() == 1);
  CHECK(rows[0]["body_omitted"] == true);
  CHECK(rows[0]["consumer"] == "test-payments-charge");

  testing::RawNats raw(server.url());
  const auto events = orders_config.events_stream_name();
  const auto original = raw.read_stream(events).at(0);
  const uint64_t audit_before = consumer_delivered(raw.js(), events, "test-payments-audit");

  // A replay that fails again is a new dead letter (not a duplicate of the one it came from).
  auto again = testing::run_command(common + "replay --all --yes 2>&1");
  INFO(again.output);
  CHECK(again.output.find("1 replayed, 0 failed") != std::string::npos);
  REQUIRE(eventually([&] { return failing.stats(replay_durable("test-orders-events", "test-payments-charge")).dead_lettered == 1; }));
  rows = json_lines(testing::run_command(common + "list --json 2>/dev/null").output);
  REQUIRE(rows.size() == 1);
  auto shown = json_lines(testing::run_command(common + "show " + std::to_string(rows[0]["seq"].get<uint64_t>()) +
                                               " --json 2>/dev/null").output);
  REQUIRE(shown.size() == 1);
  CHECK(shown[0]["context"]["replay_sequence"].get<uint64_t>() > 0);
  CHECK(shown[0]["context"]["stream"] == "test-orders-events");  // still points at the original
  CHECK(shown[0]["context"]["consumer"] == "test-payments-charge");

  healthy = true;
  auto replay = testing::run_command(common + "replay --all --yes 2>&1");
  INFO(replay.output);
  CHECK(replay.status == 0);
  CHECK(replay.output.find("1 replayed, 0 failed") != std::string::npos);
  REQUIRE(eventually([&] {
    std::lock_guard lock(mutex);
    return failing_bodies.size() == 1;
  }));
  {
    std::lock_guard lock(mutex);
    CHECK(failing_bodies[0] == original.data);  // byte for byte
    CHECK(failing_subjects[0] == "test.orders.order.created");
    CHECK(failing_consumers[0] == "test-payments-charge");
  }
  std::this_thread::sleep_for(500ms);  // room for a wrong delivery to show up
  {
    std::lock_guard lock(mutex);
    CHECK(other_ids.size() == 1);  // the audit consumer saw the original only
  }
  CHECK(consumer_delivered(raw.js(), events, "test-payments-audit") == audit_before);
  CHECK(raw.stream_messages(events) == 1);  // nothing was republished to the events stream
  CHECK(json_lines(testing::run_command(common + "list --json 2>/dev/null").output).empty());

  // A body left out whose original is gone: refused, the letter stays.
  healthy = false;
  auto second = publisher.publish("order.created", {{"note", std::string(3600, 'y')}});
  REQUIRE(eventually([&] { return failing.stats().front().dead_lettered == 2; }));
  jsErrCode jerr = static_cast<jsErrCode>(0);
  REQUIRE(js_DeleteMsg(raw.js(), events.c_str(), second.sequence, nullptr, &jerr) == NATS_OK);
  auto refused = testing::run_command(common + "replay --all --yes 2>&1");
  INFO(refused.output);
  CHECK(refused.status == 1);
  CHECK(refused.output.find("cannot be read") != std::string::npos);
  CHECK(refused.output.find("0 replayed, 1 failed") != std::string::npos);
  CHECK(json_lines(testing::run_command(common + "list --json 2>/dev/null").output).size() == 1);
  failing.stop(5s);
  other.stop(5s);
}

TEST_CASE("an adopted DLQ stream is found; unknown reasons are listed and replayed; typos exit 3") {
  testing::NatsServer server;
  auto config = testing::test_config(server.url(), "payments");
  Connection nats(config);
  testing::RawNats raw(server.url());
  raw.add_stream("ops-dead-letters", {"dlq.test.payments.>"});
  write_letters(nats, config, "", 1, DlqReason::other, "poison_pill_v9");

  const std::string tool = kTool + " --nats " + server.url() + " ";
  // Global flags after the subcommand.
  auto list = testing::run_command(tool + "list --env test --app payments 2>&1");
  INFO(list.output);
  CHECK(list.status == 0);
  CHECK(list.output.find("poison_pill_v9") != std::string::npos);
  CHECK(list.output.find("1 dead letter(s) in ops-dead-letters") != std::string::npos);
  CHECK(list.output.find("connected") == std::string::npos);  // warnings only by default
  auto rows = json_lines(testing::run_command(tool + "list --json --env test --app payments --reason poison_pill_v9 2>/dev/null").output);
  REQUIRE(rows.size() == 1);
  CHECK(rows[0]["reason"] == "poison_pill_v9");
  const auto seq = std::to_string(rows[0]["seq"].get<uint64_t>());
  auto show = json_lines(testing::run_command(tool + "show " + seq + " --json --env test --app payments 2>/dev/null").output);
  REQUIRE(show.size() == 1);
  CHECK(show[0]["context"]["reason"] == "poison_pill_v9");
  CHECK(show[0]["stream"] == "ops-dead-letters");

  // No consumer in its context: no replay route, so the default refuses and --to-subject works.
  StreamSpec orders_stream;
  orders_stream.name = "test-orders-events";
  orders_stream.subjects = {"test.orders.>"};
  Topology(nats).ensure_stream(orders_stream);
  auto routed = testing::run_command(tool + "replay " + seq + " --yes --env test --app payments 2>&1");
  CHECK(routed.status == 1);
  CHECK(routed.output.find("--to-subject") != std::string::npos);
  auto replay = json_lines(
      testing::run_command(tool + "replay " + seq + " --to-subject --yes --json --env test --app payments 2>/dev/null").output);
  REQUIRE(replay.size() == 1);
  CHECK(replay[0]["replayed"] == 1);
  CHECK(raw.stream_messages("test-orders-events") == 1);
  CHECK(raw.stream_messages("ops-dead-letters") == 0);

  auto typo = testing::run_command(tool + "list --env test --app paymnts 2>&1");
  CHECK(typo.status == 3);
  CHECK(typo.output.find("dlq.test.paymnts.>") != std::string::npos);
  CHECK(typo.output.find("test-paymnts-dlq") != std::string::npos);
}

TEST_CASE("bad arguments: one line, exit 2; --json everywhere; a mistyped SQLite path is not created") {
  testing::NatsServer server;
  auto config = testing::test_config(server.url(), "payments");
  Connection nats(config);
  Topology(nats).ensure_dlq_stream();
  const std::string common = kTool + " --nats " + server.url() + " --env test --app payments ";
  for (const std::string args : {"show 99999999999999999999999", "list --since 99999999999999999999h",
                                 "list --since yesterday", "list --since 1x"}) {
    auto r = testing::run_command(common + args + " 2>&1");
    INFO(args << ": " << r.output);
    CHECK(r.status == 2);
    CHECK(std::count(r.output.begin(), r.output.end(), '\n') == 1);
    CHECK(r.output.find("stoull") == std::string::npos);
    CHECK(r.output.find("stoll") == std::string::npos);
  }
  CHECK(testing::run_command(common + "list --since 1w 2>&1").status == 0);
  auto stats = json_lines(testing::run_command(common + "stats --json 2>/dev/null").output);
  REQUIRE(stats.size() == 1);
  CHECK(stats[0]["total"] == 0);
  auto purge = json_lines(testing::run_command(common + "purge --all --yes --json 2>/dev/null").output);
  REQUIRE(purge.size() == 1);
  CHECK(purge[0]["purged"] == 0);

  testing::TempDir dir;
  const auto missing = dir.path() / "typo.db";
  auto r = testing::run_command(kTool + " outbox --database sqlite://" + missing.string() + " list 2>&1");
  CHECK(r.status == 4);
  CHECK(r.output.find("does not exist") != std::string::npos);
  CHECK(!std::filesystem::exists(missing));
}

// 20,000 letters of `durable`, its replay route, and natspubsub-dlq replaying them all (--json),
// already under way: for tests that interrupt or stall the replay from outside.
struct BulkReplay {
  static constexpr int kLetters = 20000;
  testing::NatsServer server;
  Config config = testing::test_config(server.url(), "payments");
  Connection nats{config};
  testing::RawNats raw{server.url()};
  std::string dlq = config.dlq_stream_name();
  std::string replay_stream = Topology::replay_stream_spec(config).name;
  testing::TempDir dir;
  std::filesystem::path log = dir.path() / "replay.log";
  testing::detail::ChildProcess tool;

  explicit BulkReplay(const std::string& durable) {
    Topology(nats).ensure_dlq_stream();
    make_replay_route(nats, config, durable);
    write_letters(nats, config, durable, kLetters);
    tool.spawn({.argv = {kTool, "--nats", server.url(), "--env", "test", "--app", "payments", "replay", "--all",
                         "--yes", "--json"},
                .log_file = log,
                .working_dir = {},
                .run_as = std::nullopt});
    REQUIRE(eventually([&] { return raw.stream_messages(dlq) < kLetters; }, 60s));
  }
};

TEST_CASE("SIGINT during a replay: the window in hand finishes, exit 130, nothing both replayed and kept") {
  BulkReplay r("test-payments-int");
  auto& raw = r.raw;
  auto& tool = r.tool;
  const auto& log = r.log;
  const auto& dlq = r.dlq;
  const auto& replay_stream = r.replay_stream;
  constexpr int kLetters = BulkReplay::kLetters;
  tool.signal(SIGINT);
  REQUIRE(tool.wait_exit(30s));
  INFO(testing::detail::file_tail(log));
  CHECK(tool.last_exit() == "exited with status 130");

  nlohmann::json outcome;
  for (const auto& j : json_lines(testing::detail::file_from(log, 0)))
    if (j.contains("replayed")) outcome = j;
  REQUIRE(outcome.is_object());
  CHECK(outcome["interrupted"] == true);
  const auto replayed = outcome["replayed"].get<uint64_t>();
  CHECK(replayed > 0);
  CHECK(replayed < static_cast<uint64_t>(kLetters));
  CHECK(raw.stream_messages(replay_stream) == replayed);
  CHECK(raw.stream_messages(dlq) == kLetters - replayed);
  const size_t both = replayed_and_kept(raw, dlq, replay_stream);
  CHECK(both == 0);
}

TEST_CASE("NatsPubsub's dead letters are listed beside ours, shown with their format, and replayed") {
  testing::NatsServer server;
  auto config = testing::test_config(server.url(), "payments");
  Connection nats(config);
  Topology(nats).ensure_dlq_stream();
  write_letters(nats, config, "test-payments-ours", 1);
  testing::RawNats raw(server.url());
  // NatsPubsub's side, as its DlqHandler writes it (attaradev/nats-pubsub,
  // packages/javascript/src/dlq/dlq-handler.ts): stream {env}-events-stream-dlq on {env}.{app}.dlq,
  // a JSON wrapper with the original bytes in raw_base64 and nats.js headers as lists.
  raw.add_stream("test-events-stream-dlq", {"test.payments.dlq"});
  raw.add_stream("test-orders-events", {"test.orders.>"});
  const std::string original =
      R"({"event_id":"js-evt-1","schema_version":1,"topic":"order.created","producer":"orders",)"
      R"("occurred_at":"2026-11-22T10:00:00.000Z","message":{"id":7}})";
  nlohmann::json wrapper{{"event_id", "js-evt-1"},
                         {"original_subject", "test.orders.order.created"},
                         {"payload", nlohmann::json::parse(original)},
                         {"raw_base64", base64_encode(original)},
                         {"headers", {{"Nats-Msg-Id", {"js-evt-1"}}, {"topic", {"order.created"}}}},
                         {"deliveries", 5},
                         {"reason", "max_deliver_exceeded"},
                         {"error", "TypeError: amount is undefined"},
                         {"occurred_at", "2026-11-22T10:00:05.000Z"},
                         {"failedSubscribers", {"BillingSubscriber"}}};
  {
    natsMsg* m = nullptr;
    const auto body = wrapper.dump();
    REQUIRE(natsMsg_Create(&m, "test.payments.dlq", nullptr, body.data(), static_cast<int>(body.size())) == NATS_OK);
    natsMsgHeader_Set(m, "x-dead-letter", "true");
    natsMsgHeader_Set(m, "x-dlq-reason", "max_deliver_exceeded");
    natsMsgHeader_Set(m, "x-deliveries", "5");
    natsMsgHeader_Set(m, "x-event-id", "js-evt-1");
    jsPubAck* ack = nullptr;
    jsErrCode jerr = static_cast<jsErrCode>(0);
    REQUIRE(js_PublishMsg(&ack, raw.js(), m, nullptr, &jerr) == NATS_OK);
    jsPubAck_Destroy(ack);
    natsMsg_Destroy(m);
  }

  const std::string common = kTool + " --nats " + server.url() + " --env test --app payments ";
  auto rows = json_lines(testing::run_command(common + "list --json 2>/dev/null").output);
  REQUIRE(rows.size() == 2);
  CHECK(rows[0]["format"] == "natspubsub");
  CHECK(rows[1]["format"] == "natspubsub-js");
  CHECK(rows[1]["dlq_stream"] == "test-events-stream-dlq");
  CHECK(rows[1]["event_id"] == "js-evt-1");
  CHECK(rows[1]["reason"] == "max_deliver_exceeded");
  CHECK(rows[1]["error_class"] == "TypeError");
  CHECK(rows[1]["deliveries"] == 5);
  CHECK(rows[1]["topic"] == "order.created");
  auto table = testing::run_command(common + "list 2>&1");
  CHECK(table.output.find("test-events-stream-dlq:1") != std::string::npos);
  CHECK(table.output.find("2 dead letter(s) in test-payments-dlq and test-events-stream-dlq") != std::string::npos);

  auto show = json_lines(testing::run_command(common + "show test-events-stream-dlq:1 --json 2>/dev/null").output);
  REQUIRE(show.size() == 1);
  CHECK(show[0]["format"] == "natspubsub-js");
  CHECK(show[0]["body"] == original);
  auto by_id = json_lines(testing::run_command(common + "show js-evt-1 --json 2>/dev/null").output);
  REQUIRE(by_id.size() == 1);
  CHECK(by_id[0]["stream"] == "test-events-stream-dlq");

  // It names no consumer of ours: the replay route refuses, --to-subject republishes the original bytes.
  CHECK(testing::run_command(common + "replay test-events-stream-dlq:1 --yes 2>&1").status == 1);
  auto replay = testing::run_command(common + "replay test-events-stream-dlq:1 --to-subject --yes 2>&1");
  INFO(replay.output);
  CHECK(replay.status == 0);
  auto stored = raw.read_stream("test-orders-events");
  REQUIRE(stored.size() == 1);
  CHECK(stored[0].data == original);
  CHECK(stored[0].subject == "test.orders.order.created");
  CHECK(stored[0].topic == "order.created");
  CHECK(raw.stream_messages("test-events-stream-dlq") == 0);
  CHECK(raw.stream_messages(config.dlq_stream_name()) == 1);  // ours untouched
  CHECK(testing::run_command(common + "show nosuch:1 2>&1").status == 2);
}

// ---- review of issue 13: ways the guarantees still break ------------------------------------------

TEST_CASE("review: a sequence given twice is replayed once") {
  testing::NatsServer server;
  auto config = testing::test_config(server.url(), "payments");
  Connection nats(config);
  Topology(nats).ensure_dlq_stream();
  make_replay_route(nats, config, "test-payments-twice");
  write_letters(nats, config, "test-payments-twice", 1);
  const std::string common = kTool + " --nats " + server.url() + " --env test --app payments ";
  auto rows = json_lines(testing::run_command(common + "list --json 2>/dev/null").output);
  REQUIRE(rows.size() == 1);
  const auto seq = std::to_string(rows[0]["seq"].get<uint64_t>());

  // An operator pasting a list of sequences with a repeat: one letter, one replay.
  auto r = testing::run_command(common + "replay " + seq + " " + seq + " --yes --json 2>&1");
  INFO(r.output);
  testing::RawNats raw(server.url());
  CHECK(raw.stream_messages(Topology::replay_stream_spec(config).name) == 1);  // was 2: the consumer got it twice
  CHECK(r.status == 0);
  CHECK(raw.stream_messages(config.dlq_stream_name()) == 0);
}

TEST_CASE("review: a header that is not UTF-8 does not break --json output") {
  testing::NatsServer server;
  auto config = testing::test_config(server.url(), "payments");
  Connection nats(config);
  Topology(nats).ensure_dlq_stream();
  DeadLetter l;
  l.original_subject = "test.orders.order.created";
  l.body = "{}";
  l.headers["topic"] = "order.\xff\xfe";  // bytes from a producer that is not careful
  l.context.reason = DlqReason::malformed;
  l.context.deliveries = 1;
  l.context.stream = "test-orders-events";
  l.context.sequence = 1;
  l.context.consumer = "test-payments-x";
  Publisher publisher(nats);
  for (const auto& r : publisher.publish_raw_batch({make_dlq_message(l, dlq_subject(config, l.original_subject), 1024 * 1024)}))
    REQUIRE(r);

  const std::string common = kTool + " --nats " + server.url() + " --env test --app payments ";
  auto list = testing::run_command(common + "list --json 2>&1");
  INFO(list.output);
  CHECK(list.status == 0);
  CHECK(json_lines(list.output).size() == 1);
  auto stats = testing::run_command(common + "stats --json 2>&1");
  INFO(stats.output);
  CHECK(stats.status == 0);  // was 1: "[json.exception.type_error.316] invalid UTF-8 byte"
  auto s = json_lines(stats.output);
  REQUIRE(s.size() == 1);
  CHECK(s[0]["total"] == 1);
}

TEST_CASE("review: an existing stream overlapping the replay subjects does not stop Consumer::start()") {
  // A deployment that ran fine before the replay route: some other stream of the account already
  // uses subjects under "replay." that overlap "replay.test.payments.>" without capturing it.
  testing::NatsServer server;
  auto orders_config = testing::test_config(server.url(), "orders");
  Connection orders(orders_config);
  Topology(orders).ensure_events_stream();
  testing::RawNats raw(server.url());
  raw.add_stream("legacy-audit-replays", {"replay.*.payments.audit"});
  auto config = testing::test_config(server.url(), "payments");
  Connection nats(config);
  Consumer consumer(nats);
  consumer.subscribe_subject("test.orders.>", [](const Message&) {});
  CHECK_NOTHROW(consumer.start());  // was: OverlapError from ensure_replay_stream()
  consumer.stop(5s);
}

TEST_CASE("review: a durable name near the server's 255-character limit still starts") {
  testing::NatsServer server;
  auto orders_config = testing::test_config(server.url(), "orders");
  Connection orders(orders_config);
  Topology(orders).ensure_events_stream();
  auto config = testing::test_config(server.url(), "payments");
  Connection nats(config);
  const std::string durable(250, 'd');  // valid for the server (255 at most) and for the library
  Consumer consumer(nats);
  consumer.subscribe_subject("test.orders.>", [](const Message&) {}, {.durable = durable});
  CHECK_NOTHROW(consumer.start());  // was: "consumer name is too long, maximum allowed is 255" for "{durable}-replay"
  consumer.stop(5s);
  CHECK(replay_durable("test-orders-events", durable).size() <= 255);
  CHECK(replay_durable("s", "short").rfind("short-", 0) == 0);
  CHECK(replay_durable("s", durable) != replay_durable("s", std::string(249, 'd') + "e"));
  CHECK(replay_durable("a", "worker") != replay_durable("b", "worker"));  // durable names are per stream
}

TEST_CASE("review: a replay stream the consumer adopted is where the tool replays to") {
  testing::NatsServer server;
  auto orders_config = testing::test_config(server.url(), "orders");
  Connection orders(orders_config);
  Topology(orders).ensure_events_stream();
  testing::RawNats raw(server.url());
  raw.add_stream("ops-replays", {"replay.test.>"});  // an operator's stream: the consumer adopts it
  auto config = testing::test_config(server.url(), "payments");
  Connection nats(config);

  std::atomic<bool> healthy{false};
  std::atomic<int> handled{0};
  Consumer consumer(nats);
  consumer.subscribe_subject("test.orders.order.created", [&](const Message&) {
    if (!healthy) throw PermanentError("card declined");
    ++handled;
  }, {.durable = std::string("test-payments-charge")});
  consumer.start();
  Publisher publisher(orders);
  REQUIRE(publisher.publish("order.created", {{"id", 1}}));
  REQUIRE(eventually([&] { return consumer.stats().front().dead_lettered == 1; }));

  healthy = true;
  const std::string common = kTool + " --nats " + server.url() + " --env test --app payments ";
  auto replay = testing::run_command(common + "replay --all --yes 2>&1");
  INFO(replay.output);
  CHECK(replay.status == 0);  // was 1: "no replay stream test-payments-replay", the letter kept
  CHECK(replay.output.find("1 replayed, 0 failed") != std::string::npos);
  CHECK(eventually([&] { return handled.load() == 1; }, 10s));
  consumer.stop(5s);
}

TEST_CASE("review: a DLQ stream shared with other apps lists this app's 0 letters at once") {
  testing::NatsServer server;
  testing::RawNats raw(server.url());
  raw.add_stream("ops-dead-letters", {"dlq.>"});  // one DLQ stream for every app
  auto orders_config = testing::test_config(server.url(), "orders");
  Connection orders(orders_config);
  write_letters(orders, orders_config, "test-orders-x", 3);  // letters of another app only

  const std::string tool = kTool + " --nats " + server.url() + " --env test --app payments ";
  const auto start = std::chrono::steady_clock::now();
  auto list = testing::run_command(tool + "list 2>&1");
  const auto took = std::chrono::steady_clock::now() - start;
  INFO(list.output);
  CHECK(list.status == 0);  // was 1 after 10 s: "reading ops-dead-letters: no message for 10 s"
  CHECK(list.output.find("0 dead letter(s) in ops-dead-letters") != std::string::npos);
  CHECK(took < 5s);
}

TEST_CASE("review: a replay goes to the subscription that failed, not to another one with the same durable name") {
  // Durable names are per stream: two services of one app may both call a durable "worker", on
  // two streams. The letter names stream and consumer; the replay route is keyed by the name only.
  testing::NatsServer server;
  auto orders_config = testing::test_config(server.url(), "orders");
  Connection orders(orders_config);
  Topology(orders).ensure_events_stream();
  auto config = testing::test_config(server.url(), "payments");
  Connection nats(config);
  Topology(nats).ensure_events_stream();

  std::atomic<int> a_handled{0}, b_handled{0};
  std::atomic<bool> healthy{false};
  {
    Consumer a(nats);  // service A: orders events
    a.subscribe_subject("test.orders.order.created", [&](const Message&) {
      if (!healthy) throw PermanentError("card declined");
      ++a_handled;
    }, {.durable = std::string("worker")});
    a.start();
    REQUIRE(Publisher(orders).publish("order.created", {{"id", 1}}));
    REQUIRE(eventually([&] { return a.stats().front().dead_lettered == 1; }));
    a.stop(5s);
  }
  Consumer b(nats);  // service B: the app's own events, also durable "worker"
  b.subscribe("refund.requested", [&](const Message&) { ++b_handled; }, {.durable = std::string("worker")});
  b.start();

  healthy = true;
  const std::string common = kTool + " --nats " + server.url() + " --env test --app payments ";
  auto replay = testing::run_command(common + "replay --all --yes 2>&1");
  INFO(replay.output);
  std::this_thread::sleep_for(2s);
  CHECK(b_handled.load() == 0);  // B's handler must never see an orders event it never failed on
  b.stop(5s);
}

TEST_CASE("review: a --to-subject replay that fails again, body left out, can be replayed again") {
  // The replay carries x-original-msg-id (the first original's id) and its own Nats-Msg-Id. When it
  // fails again, the new letter must point at what is at context.stream/sequence: the replay.
  testing::NatsServer::Options o;
  o.max_payload = 4096;
  testing::NatsServer server(o);
  auto orders_config = testing::test_config(server.url(), "orders");
  Connection orders(orders_config);
  Topology(orders).ensure_events_stream();
  auto config = testing::test_config(server.url(), "payments");
  Connection nats(config);
  std::atomic<bool> healthy{false};
  std::atomic<int> handled{0};
  Consumer consumer(nats);
  consumer.subscribe_subject("test.orders.order.created", [&](const Message&) {
    if (!healthy) throw PermanentError("card declined");
    ++handled;
  }, {.durable = std::string("test-payments-charge")});
  consumer.start();
  REQUIRE(Publisher(orders).publish("order.created", {{"note", std::string(3600, 'x')}}));
  REQUIRE(eventually([&] { return consumer.stats().front().dead_lettered == 1; }));

  const std::string common = kTool + " --nats " + server.url() + " --env test --app payments ";
  auto first = testing::run_command(common + "replay --all --to-subject --yes 2>&1");
  INFO(first.output);
  REQUIRE(first.status == 0);
  REQUIRE(eventually([&] { return consumer.stats().front().dead_lettered == 2; }));  // failed again

  healthy = true;
  auto second = testing::run_command(common + "replay --all --yes 2>&1");
  INFO(second.output);
  CHECK(second.status == 0);  // was 1: "... is another message (Nats-Msg-Id differs): not replayed"
  CHECK(second.output.find("1 replayed, 0 failed") != std::string::npos);
  CHECK(eventually([&] { return handled.load() == 1; }, 10s));
  consumer.stop(5s);
}

TEST_CASE("review: a replay whose acknowledgement was lost is not reported as 'not replayed' while stored") {
  // The server stalls (GC pause, network) longer than the publish ack timeout, then goes on: the
  // publishes it had received are stored. The tool must not keep those letters as "not replayed"
  // without saying they may have been replayed (or, better, find out).
  BulkReplay r("test-payments-stall");
  auto& raw = r.raw;
  auto& tool = r.tool;
  const auto& log = r.log;
  const auto& dlq = r.dlq;
  const auto& replay_stream = r.replay_stream;
  ::kill(r.server.pid(), SIGSTOP);
  std::this_thread::sleep_for(13s);  // past the tool's 10 s ack timeout
  ::kill(r.server.pid(), SIGCONT);
  REQUIRE(tool.wait_exit(120s));
  INFO(testing::detail::file_tail(log));
  std::this_thread::sleep_for(1s);
  const size_t both = replayed_and_kept(raw, dlq, replay_stream);
  nlohmann::json outcome;
  for (const auto& j : json_lines(testing::detail::file_from(log, 0)))
    if (j.contains("replayed")) outcome = j;
  MESSAGE("after a 13 s stall: " << both << " letters both in the replay stream and in the DLQ; tool said " << outcome.dump());
  CHECK(both == 0);
}

TEST_CASE("review: SIGHUP (the operator's SSH session drops) during a replay: nothing both replayed and kept") {
  BulkReplay r("test-payments-hup");
  auto& raw = r.raw;
  auto& tool = r.tool;
  const auto& log = r.log;
  const auto& dlq = r.dlq;
  const auto& replay_stream = r.replay_stream;
  tool.signal(SIGHUP);
  REQUIRE(tool.wait_exit(30s));
  INFO(tool.last_exit());
  INFO(testing::detail::file_tail(log));
  const size_t both = replayed_and_kept(raw, dlq, replay_stream);
  CHECK(both == 0);  // was up to a window (256): killed between the replays and their deletes, silently
}
