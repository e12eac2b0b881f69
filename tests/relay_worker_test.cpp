// natspubsub-relay as an operator runs it: a real process, real nats-server, SQLite via sqlite3.
#include <arpa/inet.h>
#include <fcntl.h>
#include <ifaddrs.h>
#include <net/if.h>
#include <netinet/in.h>
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <random>
#include <chrono>
#include <filesystem>
#include <fstream>
#include <functional>
#include <map>
#include <regex>
#include <sstream>
#include <thread>

#include <doctest/doctest.h>
#include <nats/nats.h>

#include <natspubsub/connection.hpp>
#include <natspubsub/envelope.hpp>
#include <natspubsub/outbox.hpp>
#include <natspubsub/store/migrations.hpp>
#include <natspubsub/store/sqlite.hpp>

#include "support/nats_helpers.hpp"
#include "support/process.hpp"
#include "support/servers.hpp"

using namespace natspubsub;
using namespace std::chrono_literals;

namespace {

const std::string kRelay = NATSPUBSUB_BINARY_DIR "/workers/natspubsub-relay";

std::string sh_quote(const std::string& s) { return "'" + s + "'"; }

int count(const std::string& db, const std::string& where) {
  auto r = testing::run_command("sqlite3 -cmd '.timeout 10000' " + sh_quote(db) + " \"SELECT COUNT(*) FROM natspubsub_outbox WHERE " + where + "\"");
  return std::stoi(r.output.empty() ? "-1" : r.output);
}

// Starts the relay with `args`; stderr goes to `log`.
pid_t spawn(const std::vector<std::string>& args, const std::string& log) {
  pid_t pid = fork();
  if (pid == 0) {
    std::vector<char*> argv{const_cast<char*>(kRelay.c_str())};
    for (const auto& a : args) argv.push_back(const_cast<char*>(a.c_str()));
    argv.push_back(nullptr);
    int fd = open(log.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0644);
    dup2(fd, 2);
    dup2(fd, 1);
    execv(kRelay.c_str(), argv.data());
    _exit(127);
  }
  return pid;
}

// Waits for the process to exit (bounded); returns its exit code, or -1 if it had to be killed.
int wait_exit(pid_t pid, std::chrono::milliseconds limit) {
  auto deadline = std::chrono::steady_clock::now() + limit;
  int status = 0;
  while (std::chrono::steady_clock::now() < deadline) {
    if (waitpid(pid, &status, WNOHANG) == pid) return WIFEXITED(status) ? WEXITSTATUS(status) : -2;
    std::this_thread::sleep_for(10ms);
  }
  kill(pid, SIGKILL);
  waitpid(pid, &status, 0);
  return -1;
}

// HTTP status of `method` on `url`; "000" when nothing answers.
std::string http_code(const std::string& url, bool head = false) {
  return testing::run_command("curl -s -m 5 -o /dev/null -w '%{http_code}' " + std::string(head ? "-I " : "") + "'" +
                              url + "'")
      .output;
}

bool eventually(const std::function<bool()>& pred, std::chrono::milliseconds limit) {
  auto deadline = std::chrono::steady_clock::now() + limit;
  while (std::chrono::steady_clock::now() < deadline) {
    if (pred()) return true;
    std::this_thread::sleep_for(50ms);
  }
  return pred();
}

// An IPv4 address of this machine that is not loopback ("" when it has none).
std::string non_loopback_ipv4() {
  ifaddrs* list = nullptr;
  if (getifaddrs(&list) != 0) return {};
  std::string found;
  for (auto* a = list; a != nullptr && found.empty(); a = a->ifa_next) {
    if (a->ifa_addr == nullptr || a->ifa_addr->sa_family != AF_INET || (a->ifa_flags & IFF_LOOPBACK) != 0 ||
        (a->ifa_flags & IFF_UP) == 0) {
      continue;
    }
    char text[INET_ADDRSTRLEN] = {};
    inet_ntop(AF_INET, &reinterpret_cast<sockaddr_in*>(a->ifa_addr)->sin_addr, text, sizeof(text));
    found = text;
  }
  freeifaddrs(list);
  return found;
}

int lines(const std::string& text) { return static_cast<int>(std::count(text.begin(), text.end(), '\n')); }

}  // namespace

TEST_CASE("--once on an empty database migrates and exits 0; rows inserted by hand are relayed") {
  testing::NatsServer server;
  testing::TempDir dir;
  auto db = (dir.path() / "outbox.db").string();
  auto base = kRelay + " --database sqlite://" + db + " --nats " + server.url() + " --env test --app orders --once 2>&1";

  auto first = testing::run_command(base);
  INFO(first.output);
  CHECK(first.status == 0);
  CHECK(count(db, "1=1") == 0);  // the table exists (migrated) and is empty

  // Another program (here the sqlite3 shell) inserts events with only the required columns.
  auto insert = testing::run_command(
      "sqlite3 -cmd '.timeout 10000' " + sh_quote(db) +
      " \"INSERT INTO natspubsub_outbox (event_id, subject, payload) VALUES "
      "('11111111-1111-4111-8111-111111111111', 'test.orders.order.created', '{\\\"a\\\":1}'), "
      "('22222222-2222-4222-8222-222222222222', 'test.orders.order.shipped', '{\\\"a\\\":2}');"
      " INSERT INTO natspubsub_outbox (event_id, subject, payload, headers, partition_key) VALUES "
      "('33333333-3333-4333-8333-333333333333', 'test.orders.order.created', '{}', '{\\\"x-source\\\":\\\"sql\\\"}', 'k1');\"");
  REQUIRE(insert.status == 0);
  auto second = testing::run_command(base);
  INFO(second.output);
  CHECK(second.status == 0);
  CHECK(count(db, "status = 'sent'") == 3);

  testing::RawNats raw(server.url());
  auto stored = raw.read_stream("test-orders-events");
  REQUIRE(stored.size() == 3);
  CHECK(stored[0].msg_id == "11111111-1111-4111-8111-111111111111");
  CHECK(stored[1].subject == "test.orders.order.shipped");
  bool header_kept = false;
  for (const auto& [k, v] : stored[2].headers) header_kept = header_kept || (k == "x-source" && v == "sql");
  CHECK(header_kept);
}

TEST_CASE("--once relays what was there at start and exits while a producer keeps inserting faster than it relays") {
  testing::NatsServer server;
  testing::TempDir dir;
  auto path = (dir.path() / "outbox.db").string();
  {
    store::SqliteDatabase db(path);
    store::migrate(db);
    auto tx = db.begin();
    for (int i = 0; i < 2000; ++i)
      enqueue(tx, OutboxMessage{"before-" + std::to_string(i), "test.orders.order.created", "{}", nlohmann::json::object(), std::nullopt});
    tx.commit();
  }
  // The producer: 1,000 rows every 100 ms (10,000 a second), until the relay exits or 60 s pass.
  std::atomic<bool> done{false};
  std::atomic<int> produced{0};
  std::jthread producer([&] {
    store::SqliteDatabase db(path);
    const auto until = std::chrono::steady_clock::now() + 60s;
    while (!done && std::chrono::steady_clock::now() < until) {
      auto tx = db.begin();
      for (int i = 0; i < 1000; ++i)
        enqueue(tx, OutboxMessage{"after-" + std::to_string(produced++), "test.orders.order.created", "{}", nlohmann::json::object(),
                                  std::nullopt});
      tx.commit();
      std::this_thread::sleep_for(100ms);
    }
  });
  std::this_thread::sleep_for(300ms);  // the producer is running before the relay starts
  // Small batches keep this relay below the producer's rate, so "until nothing is claimable" never comes.
  auto run = testing::run_command(kRelay + " --database sqlite://" + path + " --nats " + server.url() +
                                      " --env test --app orders --batch-size 20 --once 2>&1",
                                  std::chrono::seconds(60));
  done = true;
  producer.join();
  INFO(run.output.substr(0, 3000));
  CHECK(run.status == 0);
  CHECK(count(path, "event_id LIKE 'before-%' AND status = 'sent'") == 2000);
  CHECK(run.output.find("left in the outbox:") != std::string::npos);
  MESSAGE("the producer wrote " << produced.load() << " rows while --once ran");
}

TEST_CASE("--once while NATS answers nothing: waits --nats-wait, exits 5, rows pending without an attempt; the next run sends them once") {
  testing::NatsServer server;
  testing::TempDir dir;
  auto path = (dir.path() / "outbox.db").string();
  {
    store::SqliteDatabase db(path);
    store::migrate(db);
    auto tx = db.begin();
    for (int i = 0; i < 20000; ++i)
      enqueue(tx, OutboxMessage{"e-" + std::to_string(i), "test.orders.order.created", "{}", nlohmann::json::object(),
                                "k" + std::to_string(i % 10)});
    tx.commit();
  }
  const auto base = kRelay + " --database sqlite://" + path + " --nats " + server.url() +
                    " --env test --app orders --ack-timeout 500 --nats-wait 3 --once";
  testing::TempDir logs("relay-log");
  const auto log = (logs.path() / "relay.log").string();
  pid_t relay = spawn({"--database", "sqlite://" + path, "--nats", server.url(), "--env", "test", "--app", "orders",
                       "--ack-timeout", "500", "--nats-wait", "3", "--once"},
                      log);
  testing::RawNats raw(server.url());
  REQUIRE(eventually(
      [&] {
        try {
          return raw.stream_messages("test-orders-events") >= 200;
        } catch (const std::exception&) {
          return false;  // the relay has not made the stream yet
        }
      },
      30s));
  ::kill(server.pid(), SIGSTOP);  // the server keeps the socket but answers nothing
  const auto frozen = std::chrono::steady_clock::now();
  const int code = wait_exit(relay, 40s);
  const auto waited = std::chrono::steady_clock::now() - frozen;
  ::kill(server.pid(), SIGCONT);
  const auto output = testing::detail::file_tail(log);
  INFO(output);
  CHECK(code == 5);
  CHECK(waited >= 3s);
  CHECK(output.find("NATS was unavailable for 3 s") != std::string::npos);
  CHECK(output.find("left in the outbox:") != std::string::npos);
  CHECK(count(path, "status = 'publishing'") == 0);      // nothing left claimed
  CHECK(count(path, "status <> 'sent' AND attempts > 0") == 0);  // the outage counted no attempt
  CHECK(count(path, "status = 'pending'") > 0);

  auto again = testing::run_command(base + " 2>&1", std::chrono::seconds(60));
  INFO(again.output.substr(0, 2000));
  CHECK(again.status == 0);
  CHECK(count(path, "status = 'sent'") == 20000);
  std::map<std::string, int> copies;
  for (const auto& m : raw.read_stream("test-orders-events")) copies[m.msg_id]++;
  CHECK(copies.size() == 20000);
  CHECK(std::all_of(copies.begin(), copies.end(), [](const auto& c) { return c.second == 1; }));
}

TEST_CASE("--topology natspubsub: the relay joins NatsPubsub's stream made by another app") {
  testing::NatsServer server;
  testing::TempDir dir;
  auto db = (dir.path() / "outbox.db").string();
  testing::RawNats raw(server.url());
  raw.add_stream("test-events-stream", {"test.events.>", "test.shipping.>"});  // NatsPubsub app "shipping"
  auto base = kRelay + " --database sqlite://" + db + " --nats " + server.url() + " --env test --app orders --once";

  auto bad = testing::run_command(base + " --topology natspubsub-js 2>&1");
  CHECK(bad.status == 3);
  CHECK(bad.output.find("--topology") != std::string::npos);

  REQUIRE(testing::run_command(base + " --topology natspubsub 2>&1").status == 0);  // migrates
  REQUIRE(testing::run_command("sqlite3 -cmd '.timeout 10000' " + sh_quote(db) +
                               " \"INSERT INTO natspubsub_outbox (event_id, subject, payload) VALUES "
                               "('44444444-4444-4444-8444-444444444444', 'test.orders.order.created', '{}');\"")
              .status == 0);
  auto r = testing::run_command("NATSPUBSUB_TOPOLOGY=natspubsub " + base + " 2>&1");  // the variable works too
  INFO(r.output);
  CHECK(r.status == 0);
  auto stored = raw.read_stream("test-events-stream");
  REQUIRE(stored.size() == 1);
  CHECK(stored[0].msg_id == "44444444-4444-4444-8444-444444444444");
  CHECK_THROWS((void)raw.stream_messages("test-orders-events"));  // no stream of its own
}

TEST_CASE("bad database URL, unreachable NATS, bad flags: one clear line and a documented exit code") {
  testing::NatsServer server;
  testing::TempDir dir;
  auto db = "sqlite://" + (dir.path() / "o.db").string();

  auto bad_db = testing::run_command(kRelay + " --database mysql://x --nats " + server.url() + " --app orders --once 2>&1");
  CHECK(bad_db.status == 4);
  CHECK(bad_db.output.find("database") != std::string::npos);

  auto pg = testing::run_command(kRelay + " --database postgresql://relay:hunter2pw@127.0.0.1:1/x --nats " +
                                 server.url() + " --app orders --once 2>&1");
  CHECK(pg.status == 4);
  CHECK(pg.output.find("hunter2pw") == std::string::npos);

  auto port = testing::free_port();
  auto no_nats = testing::run_command(kRelay + " --database " + db + " --nats nats://127.0.0.1:" + std::to_string(port) +
                                      " --app orders --once 2>&1");
  CHECK(no_nats.status == 5);
  CHECK(no_nats.output.find("cannot connect to NATS") != std::string::npos);
  // One line: a newcomer sees the reason, not a stack of messages.
  CHECK(std::count(no_nats.output.begin(), no_nats.output.end(), '\n') <= 3);

  auto no_app = testing::run_command(kRelay + " --database " + db + " --nats " + server.url() + " --once 2>&1");
  CHECK(no_app.status == 3);
  CHECK(no_app.output.find("app") != std::string::npos);

  auto bad_flag = testing::run_command(kRelay + " --database " + db + " --batch-size 0 --app orders 2>&1");
  CHECK(bad_flag.status == 2);

  auto version = testing::run_command(kRelay + " --version");
  CHECK(version.status == 0);
  CHECK(version.output.find("natspubsub-relay 0.") != std::string::npos);
  auto help = testing::run_command(kRelay + " --help");
  CHECK(help.status == 0);
  CHECK(help.output.find("--metrics-addr") != std::string::npos);
}

TEST_CASE("SIGTERM mid-drain: exits 0, nothing left claimed, nothing lost; /metrics and /healthz answer") {
  testing::NatsServer server;
  testing::TempDir dir;
  auto path = (dir.path() / "outbox.db").string();
  constexpr int kEvents = 30000;
  {
    store::SqliteDatabase db(path);
    store::migrate(db);
    auto tx = db.begin();
    for (int i = 0; i < kEvents; ++i) {
      auto e = Envelope::make("order.created", "orders", {{"i", i}});
      enqueue(tx, OutboxMessage::from_envelope("test.orders.order.created", e));
    }
    tx.commit();
  }
  auto metrics_port = testing::free_port();
  auto log = (dir.path() / "relay.log").string();
  pid_t pid = spawn({"--database", "sqlite://" + path, "--nats", server.url(), "--env", "test", "--app", "orders",
                     "--batch-size", "200", "--metrics-addr", "127.0.0.1:" + std::to_string(metrics_port)},
                    log);
  testing::RawNats raw(server.url());
  auto deadline = std::chrono::steady_clock::now() + 30s;
  uint64_t seen = 0;
  while (std::chrono::steady_clock::now() < deadline) {
    try {
      seen = raw.stream_messages("test-orders-events");
    } catch (...) {
    }
    if (seen >= 2000) break;
    std::this_thread::sleep_for(2ms);
  }
  REQUIRE(seen >= 2000);

  auto metrics = testing::run_command("curl -s http://127.0.0.1:" + std::to_string(metrics_port) + "/metrics");
  CHECK(metrics.status == 0);
  CHECK(metrics.output.find("natspubsub_outbox_pending") != std::string::npos);
  CHECK(metrics.output.find("natspubsub_outbox_oldest_pending_age_seconds") != std::string::npos);
  CHECK(metrics.output.find("natspubsub_relay_publish_latency_seconds_bucket") != std::string::npos);
  auto health = testing::run_command("curl -s -w '\\n%{http_code}' http://127.0.0.1:" + std::to_string(metrics_port) + "/healthz");
  INFO(health.output);
  CHECK(health.output.find("\"ok\":true") != std::string::npos);
  CHECK(health.output.find("database") != std::string::npos);
  CHECK(health.output.find("200") != std::string::npos);

  // NATS service discovery, asked with a plain request as `nats micro ls` would.
  natsMsg* reply = nullptr;
  REQUIRE(natsConnection_RequestString(&reply, raw.nc(), "$SRV.INFO.natspubsub-relay", "", 2000) == NATS_OK);
  auto info = nlohmann::json::parse(std::string(natsMsg_GetData(reply), static_cast<size_t>(natsMsg_GetDataLength(reply))));
  natsMsg_Destroy(reply);
  CHECK(info["type"] == "io.nats.micro.v1.info_response");
  CHECK(info["name"] == "natspubsub-relay");
  CHECK(info["metadata"]["app"] == "orders");
  REQUIRE(natsConnection_RequestString(&reply, raw.nc(), "$SRV.STATS.natspubsub-relay", "", 2000) == NATS_OK);
  auto stats = nlohmann::json::parse(std::string(natsMsg_GetData(reply), static_cast<size_t>(natsMsg_GetDataLength(reply))));
  natsMsg_Destroy(reply);
  CHECK(stats["type"] == "io.nats.micro.v1.stats_response");
  REQUIRE(stats["endpoints"].size() == 1);
  CHECK(stats["endpoints"][0]["num_requests"].get<uint64_t>() > 0);

  kill(pid, SIGTERM);
  int rc = wait_exit(pid, 15s);
  auto relay_log = testing::run_command("tail -n 5 " + log).output;
  INFO(relay_log);
  CHECK(rc == 0);
  int sent_at_stop = count(path, "status = 'sent'");
  MESSAGE("stopped after " << sent_at_stop << " of " << kEvents << " rows");
  CHECK(sent_at_stop < kEvents);                       // it really was mid-drain
  // The round in flight was finished, the rest of its batch and the batch claimed ahead given
  // back, and the acknowledged rows marked (the stream holds exactly the rows marked sent).
  CHECK(count(path, "status = 'publishing'") == 0);
  CHECK(raw.stream_messages("test-orders-events") == static_cast<uint64_t>(sent_at_stop));

  auto rest = testing::run_command(kRelay + " --database sqlite://" + path + " --nats " + server.url() +
                                   " --env test --app orders --once 2>&1");
  CHECK(rest.status == 0);
  CHECK(count(path, "status = 'sent'") == kEvents);
  CHECK(raw.stream_messages("test-orders-events") == kEvents);
}

TEST_CASE("rows NATS cannot carry are failed at once; their key waits; nothing else is touched, no connection lost") {
  testing::NatsServer server;
  testing::TempDir dir;
  auto db = (dir.path() / "outbox.db").string();
  auto base = kRelay + " --database sqlite://" + db + " --nats " + server.url() + " --env test --app orders --once 2>&1";
  REQUIRE(testing::run_command(base).status == 0);  // migrated

  // 1,000 unkeyed rows, then a key's run with a blank in the middle row's subject, a row whose
  // header has a line break, then 1,000 more unkeyed rows: all inserted by hand.
  const std::string unkeyed =
      "WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < 1000) "
      "INSERT INTO natspubsub_outbox (event_id, subject, payload) SELECT printf('%s-%04d', i), "
      "'test.orders.order.created', '{}' FROM n;";
  auto sql = [&](const std::string& prefix) {
    std::string s = unkeyed;
    s.replace(s.find("'%s-"), 4, "'" + prefix + "-");
    return s;
  };
  auto insert = testing::run_command(
      "sqlite3 -cmd '.timeout 10000' " + sh_quote(db) + " \"" + sql("first") +
      " INSERT INTO natspubsub_outbox (event_id, subject, payload, partition_key) VALUES "
      "('k-before', 'test.orders.order.created', '{}', 'k1'), "
      "('k-bad', 'test.orders.order created', '{}', 'k1'), "
      "('k-after', 'test.orders.order.created', '{}', 'k1');"
      " INSERT INTO natspubsub_outbox (event_id, subject, payload, headers) VALUES "
      "('bad-header', 'test.orders.order.created', '{}', json_object('x-note', 'a' || char(10) || 'b'));" +
      sql("second") + "\" 2>&1");
  INFO(insert.output);
  REQUIRE(insert.status == 0);
  REQUIRE(count(db, "1=1") == 2004);

  const auto started = std::chrono::steady_clock::now();
  auto run = testing::run_command(base);
  const auto took = std::chrono::steady_clock::now() - started;
  INFO(run.output.substr(0, 3000));
  CHECK(run.status == 0);
  CHECK(took < 8s);  // no batch waited out the 10 s ack timeout
  CHECK(run.output.find("connection lost") == std::string::npos);
  CHECK(run.output.find("reconnect") == std::string::npos);

  CHECK(count(db, "status = 'sent'") == 2001);  // 2,000 unkeyed and the key's row before the bad one
  CHECK(count(db, "event_id = 'k-before' AND status = 'sent'") == 1);
  CHECK(count(db, "event_id = 'k-bad' AND status = 'failed' AND attempts = 1 AND last_error LIKE '%blank%'") == 1);
  CHECK(count(db, "event_id = 'bad-header' AND status = 'failed' AND last_error LIKE '%line break%'") == 1);
  CHECK(count(db, "event_id = 'k-after' AND status = 'pending' AND attempts = 0") == 1);  // waits behind k-bad
  testing::RawNats raw(server.url());
  CHECK(raw.stream_messages("test-orders-events") == 2001);

  // Another pass keeps k-after waiting: the failed row still blocks its key.
  CHECK(testing::run_command(base).status == 0);
  CHECK(count(db, "event_id = 'k-after' AND status = 'pending'") == 1);
}

TEST_CASE("a message the server refuses in the middle of a key's run: no later row of that key is published") {
  testing::NatsServer server;
  testing::TempDir dir;
  auto db = (dir.path() / "outbox.db").string();
  auto base = kRelay + " --database sqlite://" + db + " --nats " + server.url() +
              " --env test --app orders --ack-timeout 2000 --once 2>&1";
  REQUIRE(testing::run_command(base).status == 0);  // migrated, events stream made
  testing::RawNats raw(server.url());
  raw.add_stream("refuser", {"test.refused.>"}, 1, /*max_msg_size=*/64);  // refuses the 200-byte row

  // 40 keys of 5 rows each, interleaved as producers write them (row r of every key, then row
  // r + 1). k7's third row goes to a stream that refuses it, k9's second row to a subject no
  // stream takes (no responders). Everything else is valid.
  std::string values;
  const std::string big(200, 'x');
  for (int r = 0; r < 5; ++r) {
    for (int k = 0; k < 40; ++k) {
      std::string subject = "test.orders.order.created";
      std::string payload = "{}";
      if (k == 7 && r == 2) subject = "test.refused.order", payload = big;
      if (k == 9 && r == 1) subject = "test.nostream.order";
      if (!values.empty()) values += ", ";
      values += "('k" + std::to_string(k) + "-" + std::to_string(r) + "', '" + subject + "', '" + payload + "', 'k" +
                std::to_string(k) + "')";
    }
  }
  auto insert = testing::run_command("sqlite3 -cmd '.timeout 10000' " + sh_quote(db) +
                                     " \"INSERT INTO natspubsub_outbox (event_id, subject, payload, partition_key) "
                                     "VALUES " + values + ";\" 2>&1");
  INFO(insert.output);
  REQUIRE(insert.status == 0);

  auto run = testing::run_command(base);
  INFO(run.output.substr(0, 3000));
  CHECK(run.status == 0);

  // The stream holds every row of the 38 other keys, k7's first two and k9's first, each key in id order.
  std::map<std::string, std::vector<int>> stored;
  for (const auto& m : raw.read_stream("test-orders-events")) {
    const auto dash = m.msg_id.find('-');
    REQUIRE(dash != std::string::npos);
    stored[m.msg_id.substr(0, dash)].push_back(std::stoi(m.msg_id.substr(dash + 1)));
  }
  CHECK(raw.stream_messages("refuser") == 0);
  for (int k = 0; k < 40; ++k) {
    const auto key = "k" + std::to_string(k);
    std::vector<int> expected;
    for (int r = 0; r < (k == 7 ? 2 : k == 9 ? 1 : 5); ++r) expected.push_back(r);
    CHECK_MESSAGE(stored[key] == expected, key);
  }
  // The refused rows carry an attempt and their error; the rows after them were never tried.
  CHECK(count(db, "event_id = 'k7-2' AND status IN ('failed', 'pending') AND attempts = 1 AND last_error <> ''") == 1);
  CHECK(count(db, "event_id = 'k9-1' AND status IN ('failed', 'pending') AND attempts = 1 AND last_error <> ''") == 1);
  CHECK(count(db, "event_id IN ('k7-3', 'k7-4', 'k9-2', 'k9-3', 'k9-4') AND status = 'pending' AND attempts = 0") == 5);
  CHECK(count(db, "status = 'sent'") == 190 + 2 + 1);
}

TEST_CASE("--metrics-addr :PORT: promtool accepts /metrics; /livez stays 200 and /readyz is 503 while NATS is down") {
  testing::NatsServer server;
  testing::TempDir dir;
  auto path = (dir.path() / "outbox.db").string();
  auto port = std::to_string(testing::free_port());
  auto log = (dir.path() / "relay.log").string();
  pid_t pid = spawn({"--database", "sqlite://" + path, "--nats", server.url(), "--env", "test", "--app", "orders",
                     "--metrics-addr", ":" + port, "--progress-interval", "1", "--poll-interval", "50"},
                    log);
  const std::string base = "http://127.0.0.1:" + port;
  REQUIRE_MESSAGE(eventually([&] { return http_code(base + "/livez") == "200"; }, 15s),
                  testing::run_command("cat " + log).output);
  CHECK(eventually([&] { return http_code(base + "/readyz") == "200"; }, 10s));
  CHECK(http_code(base + "/healthz") == "200");
  CHECK(http_code(base + "/metrics", true) == "200");  // HEAD

  auto metrics = testing::run_command("curl -s -m 5 " + base + "/metrics").output;
  auto file = (dir.path() / "metrics.txt").string();
  std::ofstream(file) << metrics;
  auto promtool = testing::run_command("promtool check metrics < " + file + " 2>&1", 30s);
  INFO(metrics);
  INFO(promtool.output);
  CHECK(promtool.status == 0);
  for (const char* name : {"natspubsub_outbox_pending ", "natspubsub_relay_published_total ", "natspubsub_relay_released_total ",
                           "natspubsub_relay_cleaned_total ", "natspubsub_build_info{", "process_resident_memory_bytes ",
                           "process_cpu_seconds_total ", "process_start_time_seconds ", "natspubsub_nats_connected 1",
                           "natspubsub_database_up 1"}) {
    CHECK_MESSAGE(metrics.find(std::string("\n") + name) != std::string::npos, name);
  }

  // ":PORT" is every interface, as Prometheus exporters listen.
  auto address = non_loopback_ipv4();
  if (address.empty()) {
    MESSAGE("this machine has no non-loopback IPv4 address: reachability beyond loopback not checked");
  } else {
    CHECK_MESSAGE(http_code("http://" + address + ":" + port + "/livez") == "200", address);
  }

  // NATS down: not ready (send no traffic), but alive (do not restart the relay).
  server.kill();
  CHECK(eventually([&] { return http_code(base + "/readyz") == "503"; }, 15s));
  CHECK(http_code(base + "/livez") == "200");
  auto readyz = testing::run_command("curl -s -m 5 " + base + "/readyz").output;
  INFO(readyz);
  CHECK(nlohmann::json::parse(readyz)["checks"]["nats"]["ok"] == false);
  CHECK(testing::run_command("curl -s -m 5 " + base + "/metrics").output.find("\nnatspubsub_nats_connected 0\n") !=
        std::string::npos);

  server.start();
  CHECK(eventually([&] { return http_code(base + "/readyz") == "200"; }, 20s));
  kill(pid, SIGTERM);
  CHECK(wait_exit(pid, 15s) == 0);
  auto relay_log = testing::run_command("cat " + log).output;
  INFO(relay_log);
  // A progress line every --progress-interval seconds; text timestamps carry the UTC offset.
  CHECK(relay_log.find("progress: ") != std::string::npos);
  CHECK(std::regex_search(relay_log, std::regex(R"(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}[+-]\d\d:?\d\d )")));
}

TEST_CASE("--log-format json: every line is one JSON object; relay id, app, env and the counts are fields") {
  testing::NatsServer server;
  testing::TempDir dir;
  auto db = (dir.path() / "outbox.db").string();
  const std::vector<std::string> common{"--database", "sqlite://" + db, "--nats", server.url(), "--env", "test",
                                        "--app", "orders", "--relay-id", "relay-json-1", "--log-format", "json"};
  auto insert = [&](int first, int n) {
    std::string sql;
    for (int i = first; i < first + n; ++i) {
      sql += "INSERT INTO natspubsub_outbox (event_id, subject, payload) VALUES ('json-" + std::to_string(i) +
             "', 'test.orders.order.created', '{}');";
    }
    REQUIRE(testing::run_command("sqlite3 -cmd '.timeout 10000' " + sh_quote(db) + " \"" + sql + "\"").status == 0);
  };
  // Every line parses, has the four fixed members, and names the application; returns them all.
  auto parse_lines = [](const std::string& text) {
    std::vector<nlohmann::json> out;
    std::istringstream in(text);
    for (std::string line; std::getline(in, line);) {
      INFO(line);
      auto j = nlohmann::json::parse(line, nullptr, /*allow_exceptions=*/false);
      REQUIRE(j.is_object());
      for (const char* key : {"time", "level", "logger", "msg"}) CHECK_MESSAGE(j.contains(key), key);
      CHECK(j.value("app", "") == "orders");
      CHECK(j.value("env", "") == "test");
      out.push_back(std::move(j));
    }
    return out;
  };

  // A running relay: its progress lines carry the figures they print.
  auto log = (dir.path() / "relay.log").string();
  pid_t pid = spawn([&] {
    auto args = common;
    args.insert(args.end(), {"--progress-interval", "1", "--poll-interval", "50"});
    return args;
  }(), log);
  // Started (so migrated): the library's line, which carries the relay's fields too.
  REQUIRE_MESSAGE(eventually([&] { return testing::run_command("cat " + log).output.find("started") != std::string::npos; }, 15s),
                  testing::run_command("cat " + log).output);
  insert(1, 3);
  CHECK(eventually([&] { return count(db, "status = 'sent'") == 3; }, 15s));
  auto progress_with_all = [&] {
    return testing::run_command("cat " + log).output.find(R"("published_total":3)") != std::string::npos;
  };
  CHECK(eventually(progress_with_all, 10s));
  kill(pid, SIGTERM);
  CHECK(wait_exit(pid, 15s) == 0);
  auto running = testing::run_command("cat " + log).output;
  INFO(running);
  int progress_lines = 0;
  bool saw_all = false;
  for (const auto& j : parse_lines(running)) {
    if (j["msg"].get<std::string>().starts_with("outbox relay relay-json-1 started")) {
      CHECK(j.value("relay_id", "") == "relay-json-1");  // the library's lines carry it too
    }
    if (!j["msg"].get<std::string>().starts_with("progress: ")) continue;
    ++progress_lines;
    CHECK(j.value("relay_id", "") == "relay-json-1");
    CHECK(j.value("logger", "") == "natspubsub-relay");
    CHECK(j.value("interval_s", -1) == 1);
    for (const char* key : {"published", "published_total", "pending", "failed", "oldest_pending_s"}) {
      CHECK_MESSAGE(j.contains(key), key);
      CHECK_MESSAGE(j[key].is_number(), key);
    }
    CHECK(j.value("failed", -1) == 0);
    if (j.value("published_total", -1) == 3) {
      saw_all = true;
      CHECK(j.value("pending", -1) == 0);
      CHECK(j["msg"].get<std::string>().find("(3 since start), 0 pending") != std::string::npos);
    }
  }
  CHECK(progress_lines >= 1);
  CHECK(saw_all);

  // --once: the summary line's counts.
  insert(4, 2);
  auto once_args = common;
  once_args.push_back("--once");
  auto once_log = (dir.path() / "once.log").string();
  CHECK(wait_exit(spawn(once_args, once_log), 30s) == 0);
  auto once = testing::run_command("cat " + once_log).output;
  INFO(once);
  bool saw_summary = false;
  for (const auto& j : parse_lines(once)) {
    if (!j["msg"].get<std::string>().starts_with("relayed ")) continue;
    saw_summary = true;
    CHECK(j.value("relay_id", "") == "relay-json-1");
    CHECK(j.value("rows", -1) == 2);
    CHECK(j.value("published", -1) == 2);
    CHECK(j.value("duplicates", -1) == 0);
    CHECK(j.value("rescheduled", -1) == 0);
    CHECK(j.value("failed", -1) == 0);
    CHECK(j.value("released", -1) == 0);
    CHECK(j.value("batches", -1) >= 1);
  }
  CHECK(saw_summary);
  CHECK(count(db, "status = 'sent'") == 5);
}

TEST_CASE("start-up checks: each refusal is one line with a documented exit code") {
  testing::NatsServer server;
  testing::TempDir dir;
  const std::string nats = " --nats " + server.url() + " --env test --app orders";
  const std::string clean_env = "env -u NATSPUBSUB_DATABASE_URL -u DATABASE_URL -u NATSPUBSUB_METRICS_ADDR ";

  // --metrics-addr is checked before anything is connected: NATS here is a closed port.
  auto closed = " --nats nats://127.0.0.1:" + std::to_string(testing::free_port()) + " --app orders";
  for (const char* bad : {"9464", ":0", ":70000", "example.com:9464"}) {
    auto r = testing::run_command(kRelay + " --database sqlite://" + (dir.path() / "m.db").string() + closed +
                                  " --metrics-addr " + bad + " --once 2>&1");
    INFO(bad, r.output);
    CHECK(r.status == 2);
    CHECK(r.output.find("--metrics-addr") != std::string::npos);
    CHECK(lines(r.output) == 1);
  }

  // --no-migrate never creates a SQLite file: a mistyped path is refused.
  auto missing = (dir.path() / "typo.db").string();
  auto no_file = testing::run_command(kRelay + " --database sqlite://" + missing + nats + " --no-migrate --once 2>&1");
  INFO(no_file.output);
  CHECK(no_file.status == 4);
  CHECK(no_file.output.find("does not exist") != std::string::npos);
  CHECK(lines(no_file.output) == 1);
  CHECK_FALSE(std::filesystem::exists(missing));

  // --no-migrate on a database without the tables: the missing migration by name, no SQL.
  auto empty = (dir.path() / "empty.db").string();
  REQUIRE(testing::run_command("sqlite3 -cmd '.timeout 10000' " + sh_quote(empty) + " 'PRAGMA user_version = 7;'").status == 0);
  auto no_tables = testing::run_command(kRelay + " --database sqlite://" + empty + nats + " --no-migrate 2>&1", 30s);
  INFO(no_tables.output);
  CHECK(no_tables.status == 4);
  CHECK(no_tables.output.find("migration 0001_") != std::string::npos);
  CHECK(no_tables.output.find("SELECT") == std::string::npos);
  CHECK(lines(no_tables.output) == 1);

  // --config naming a directory, or a file that is not JSON: one line, exit 3.
  auto as_dir = testing::run_command(kRelay + " --database sqlite://" + empty + nats + " --config " + dir.path().string() +
                                     " --once 2>&1");
  INFO(as_dir.output);
  CHECK(as_dir.status == 3);
  CHECK(as_dir.output.find("is a directory") != std::string::npos);
  CHECK(lines(as_dir.output) == 1);
  auto not_json = (dir.path() / "config.json").string();
  std::ofstream(not_json) << "servers = nats://x\n";
  auto bad_json = testing::run_command(kRelay + " --database sqlite://" + empty + nats + " --config " + not_json + " --once 2>&1");
  CHECK(bad_json.status == 3);
  CHECK(lines(bad_json.output) == 1);

  // DATABASE_URL when NATSPUBSUB_DATABASE_URL and --database are absent; neither: exit 2.
  auto fallback = (dir.path() / "fallback.db").string();
  auto via_env = testing::run_command(clean_env + "DATABASE_URL=sqlite://" + fallback + " " + kRelay + nats + " --once 2>&1");
  INFO(via_env.output);
  CHECK(via_env.status == 0);
  CHECK(count(fallback, "1=1") == 0);  // created and migrated
  auto none = testing::run_command(clean_env + kRelay + nats + " --once 2>&1");
  CHECK(none.status == 2);
  CHECK(none.output.find("DATABASE_URL") != std::string::npos);
}

TEST_CASE("a second relay on a SQLite file another relay runs on: refused, exit 3, one line naming the lock") {
  testing::NatsServer server;
  testing::TempDir dir;
  auto path = (dir.path() / "outbox.db").string();
  auto log = (dir.path() / "first.log").string();
  pid_t first = spawn({"--database", "sqlite://" + path, "--nats", server.url(), "--env", "test", "--app", "orders"}, log);
  REQUIRE(eventually([&] {
    std::ifstream in(log);
    std::string text((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
    return text.find("started") != std::string::npos;
  }, 30s));
  const std::string args = " --database sqlite://" + path + " --nats " + server.url() + " --env test --app orders --once";
  for (const char* claims : {"", " --lease-claims"}) {
    auto second = testing::run_command(kRelay + args + claims + " 2>&1", 30s);
    INFO(claims, second.output);
    CHECK(second.status == 3);
    CHECK(second.output.find(path + "-relay.lock") != std::string::npos);
    CHECK(second.output.find("one relay per SQLite database") != std::string::npos);
    // One error line (after the usual "connected to NATS" line).
    CHECK(second.output.find(" error ") == second.output.rfind(" error "));
  }
  kill(first, SIGTERM);
  CHECK(wait_exit(first, 30s) == 0);
  // Its lock ended with it.
  auto after = testing::run_command(kRelay + args + " 2>&1", 30s);
  INFO(after.output);
  CHECK(after.status == 0);
}

// True once the process blocks SIGTERM and SIGINT (/proc/PID/status SigBlk): the relay's first
// constructor has run. Before that only the dynamic loader runs, as in any program.
bool blocks_stop_signals(pid_t pid) {
  std::ifstream status("/proc/" + std::to_string(pid) + "/status");
  std::string line;
  while (std::getline(status, line)) {
    if (line.rfind("SigBlk:", 0) != 0) continue;
    const auto mask = std::stoull(line.substr(7), nullptr, 16);
    const unsigned long long wanted = (1ULL << (SIGTERM - 1)) | (1ULL << (SIGINT - 1));
    return (mask & wanted) == wanted;
  }
  return false;
}

TEST_CASE("SIGTERM at 40 random moments from the relay's first instruction: every run exits 0, none hangs") {
  testing::NatsServer server;
  testing::TempDir dir;
  auto db = (dir.path() / "outbox.db").string();
  REQUIRE(testing::run_command(kRelay + " --database sqlite://" + db + " --nats " + server.url() +
                               " --env test --app orders --once 2>&1").status == 0);
  std::mt19937 rng(std::random_device{}());
  std::uniform_int_distribution<int> delay_ms(0, 300);  // start-up (flags, database, NATS) and the first cycles
  int clean = 0;
  std::string codes;
  for (int run = 0; run < 40; ++run) {
    const auto log = (dir.path() / ("sigterm-" + std::to_string(run) + ".log")).string();
    pid_t pid = spawn({"--database", "sqlite://" + db, "--nats", server.url(), "--env", "test", "--app", "orders",
                       "--poll-interval", "20"},
                      log);
    const auto loaded_by = std::chrono::steady_clock::now() + 10s;
    while (!blocks_stop_signals(pid) && std::chrono::steady_clock::now() < loaded_by)
      std::this_thread::sleep_for(std::chrono::microseconds(200));
    const int wait = delay_ms(rng);
    std::this_thread::sleep_for(std::chrono::milliseconds(wait));
    kill(pid, SIGTERM);
    const int code = wait_exit(pid, 10s);  // -1: it had to be killed (hung); -2: ended by a signal
    codes += std::to_string(wait) + "ms:" + std::to_string(code) + " ";
    clean += code == 0 ? 1 : 0;
  }
  INFO(codes);
  CHECK(clean == 40);
}

TEST_CASE("a lease at or above the stream's duplicate window is refused with the reason, exit 3") {
  testing::NatsServer server;
  testing::TempDir dir;
  auto db = "sqlite://" + (dir.path() / "o.db").string();
  // The test stream's duplicate window is the library default, 2 minutes.
  auto r = testing::run_command(kRelay + " --database " + db + " --nats " + server.url() +
                                " --env test --app orders --lease 120000 --once 2>&1");
  INFO(r.output);
  CHECK(r.status == 3);
  CHECK(r.output.find("duplicate window") != std::string::npos);
  CHECK(testing::run_command(kRelay + " --database " + db + " --nats " + server.url() +
                             " --env test --app orders --lease 110000 --once 2>&1").status == 0);
}
