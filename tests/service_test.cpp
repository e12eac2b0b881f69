// ctest-labels: integration
// The NATS service API ($SRV.PING / INFO / STATS) checked with plain NATS requests, as standard
// tooling sends them, and Health (liveness, readiness) against a real server.
#include <atomic>
#include <chrono>
#include <regex>
#include <set>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

#include <doctest/doctest.h>
#include <nats/nats.h>
#include <nlohmann/json.hpp>

#include <natspubsub/connection.hpp>
#include <natspubsub/consumer.hpp>
#include <natspubsub/envelope.hpp>
#include <natspubsub/error.hpp>
#include <natspubsub/publisher.hpp>
#include <natspubsub/request.hpp>
#include <natspubsub/service.hpp>
#include <natspubsub/topology.hpp>

#include "support/nats_helpers.hpp"
#include "support/servers.hpp"

using namespace natspubsub;
using namespace std::chrono_literals;
using nlohmann::json;
using Clock = std::chrono::steady_clock;

namespace {

// One plain request; the parsed JSON answer.
json ask(natsConnection* nc, const std::string& subject) {
  natsMsg* reply = nullptr;
  const natsStatus s = natsConnection_RequestString(&reply, nc, subject.c_str(), "", 2000);
  REQUIRE_MESSAGE(s == NATS_OK, subject << ": " << natsStatus_GetText(s));
  std::string body(natsMsg_GetData(reply), static_cast<size_t>(natsMsg_GetDataLength(reply)));
  natsMsg_Destroy(reply);
  auto j = json::parse(body, nullptr, false);
  REQUIRE_MESSAGE(!j.is_discarded(), subject << " answered no JSON: " << body);
  return j;
}

// Every answer to one request that arrives within `wait`, as discovery tools collect them.
std::vector<json> ask_all(natsConnection* nc, const std::string& subject, std::chrono::milliseconds wait) {
  natsInbox* inbox = nullptr;
  REQUIRE(natsInbox_Create(&inbox) == NATS_OK);
  natsSubscription* sub = nullptr;
  REQUIRE(natsConnection_SubscribeSync(&sub, nc, inbox) == NATS_OK);
  REQUIRE(natsConnection_PublishRequestString(nc, subject.c_str(), inbox, "") == NATS_OK);
  std::vector<json> out;
  const auto until = Clock::now() + wait;
  while (Clock::now() < until) {
    natsMsg* msg = nullptr;
    if (natsSubscription_NextMsg(&msg, sub, 50) != NATS_OK) continue;
    out.push_back(json::parse(std::string(natsMsg_GetData(msg), static_cast<size_t>(natsMsg_GetDataLength(msg)))));
    natsMsg_Destroy(msg);
  }
  natsSubscription_Destroy(sub);
  natsInbox_Destroy(inbox);
  return out;
}

void check_identity(const json& j, const std::string& type, const Service& service, const std::string& version) {
  CHECK(j.at("type") == type);
  CHECK(j.at("name") == service.name());
  CHECK(j.at("id") == service.id());
  CHECK(j.at("version") == version);
  CHECK(j.at("metadata").is_object());
}

bool is_uint(const json& j) { return j.is_number_unsigned() || (j.is_number_integer() && j.get<int64_t>() >= 0); }

}  // namespace

TEST_CASE("$SRV.PING, $SRV.INFO, $SRV.STATS (with name and id suffixes) answered with the standard types") {
  testing::NatsServer server;
  Connection nats(testing::test_config(server.url(), "inventory"));
  Responder stock(nats, "stock.check", [](const Request& r) -> json {
    if (r.data().at("sku") == "bad") throw std::runtime_error("no such warehouse");
    std::this_thread::sleep_for(2ms);
    return {{"available", 1}};
  }, {.name = "stock-check", .metadata = {{"owner", "team-inventory"}}});
  Service service(nats, {.name = "inventory", .version = "1.4.0-rc.1+build.7", .description = "stock levels",
                         .metadata = {{"region", "eu-west"}}});
  service.add(stock);
  CHECK(service.id().size() == 22);
  CHECK(std::regex_match(service.id(), std::regex("[A-Za-z0-9]+")));

  for (int i = 0; i < 4; ++i) (void)request(nats, "stock.check", {{"sku", "A"}});
  CHECK_THROWS_AS((void)request(nats, "stock.check", {{"sku", "bad"}}), RemoteError);

  testing::RawNats raw(server.url());
  const std::string name = service.name();
  const std::string id = service.id();
  const std::vector<std::string> suffixes{"", "." + name, "." + name + "." + id};
  for (const auto& suffix : suffixes) {
    CAPTURE(suffix);
    auto ping = ask(raw.nc(), "$SRV.PING" + suffix);
    check_identity(ping, "io.nats.micro.v1.ping_response", service, "1.4.0-rc.1+build.7");
    CHECK(ping.size() == 5);
    CHECK(ping["metadata"]["region"] == "eu-west");

    auto info = ask(raw.nc(), "$SRV.INFO" + suffix);
    check_identity(info, "io.nats.micro.v1.info_response", service, "1.4.0-rc.1+build.7");
    CHECK(info.at("description") == "stock levels");
    REQUIRE(info.at("endpoints").is_array());
    REQUIRE(info["endpoints"].size() == 1);
    const auto& ep = info["endpoints"][0];
    CHECK(ep.at("name") == "stock-check");
    CHECK(ep.at("subject") == "test.inventory.stock.check");
    CHECK(ep.at("queue_group") == "test-inventory");
    CHECK(ep.at("metadata") == json{{"owner", "team-inventory"}});
    CHECK(info.size() == 7);

    auto stats = ask(raw.nc(), "$SRV.STATS" + suffix);
    check_identity(stats, "io.nats.micro.v1.stats_response", service, "1.4.0-rc.1+build.7");
    const auto started = parse_timestamp(stats.at("started").get<std::string>(), "started");
    CHECK(now_ms() - started < std::chrono::minutes(1));
    REQUIRE(stats.at("endpoints").size() == 1);
    const auto& es = stats["endpoints"][0];
    CHECK(es.at("name") == "stock-check");
    CHECK(es.at("subject") == "test.inventory.stock.check");
    CHECK(es.at("queue_group") == "test-inventory");
    CHECK(es.at("num_requests") == 5);
    CHECK(es.at("num_errors") == 1);
    CHECK(es.at("last_error") == "no such warehouse");
    REQUIRE(is_uint(es.at("processing_time")));
    REQUIRE(is_uint(es.at("average_processing_time")));
    CHECK(es["processing_time"].get<int64_t>() >= 8'000'000);  // 4 x 2 ms, in nanoseconds
    CHECK(es["average_processing_time"].get<int64_t>() == es["processing_time"].get<int64_t>() / 5);
    CHECK(es.at("data").at("requests") == 5);
    CHECK(stats.size() == 7);
  }

  // The same body as the API returns in code.
  CHECK(service.ping() == ask(raw.nc(), "$SRV.PING." + name));

  // Other verbs and other names get no answer from this service.
  natsMsg* none = nullptr;
  CHECK(natsConnection_RequestString(&none, raw.nc(), "$SRV.PING.payments", "", 300) != NATS_OK);
  CHECK(natsConnection_RequestString(&none, raw.nc(), ("$SRV.PING." + name + ".otherid").c_str(), "", 300) != NATS_OK);
  CHECK(natsConnection_RequestString(&none, raw.nc(), "$SRV.SCHEMA", "", 300) != NATS_OK);

  service.stop();
  service.stop();  // twice is fine
  CHECK(natsConnection_RequestString(&none, raw.nc(), "$SRV.PING", "", 500) == NATS_NO_RESPONDERS);
}

TEST_CASE("several services on one server: $SRV.PING reaches all, $SRV.PING.<name> only that kind") {
  testing::NatsServer server;
  Connection a(testing::test_config(server.url(), "inventory"));
  Connection b(testing::test_config(server.url(), "inventory"));
  Connection c(testing::test_config(server.url(), "payments"));
  Service inv1(a, {.name = "inventory", .version = "1.0.0"});
  Service inv2(b, {.name = "inventory", .version = "1.0.0"});
  Service pay(c, {.name = "payments", .version = "2.3.4", .id = "payments-1"});
  CHECK(inv1.id() != inv2.id());
  CHECK(pay.id() == "payments-1");

  testing::RawNats raw(server.url());
  auto all = ask_all(raw.nc(), "$SRV.PING", 500ms);
  std::set<std::string> ids;
  for (const auto& j : all) ids.insert(j.at("id").get<std::string>());
  CHECK(ids == std::set<std::string>{inv1.id(), inv2.id(), "payments-1"});

  auto inventory = ask_all(raw.nc(), "$SRV.INFO.inventory", 500ms);
  CHECK(inventory.size() == 2);
  for (const auto& j : inventory) CHECK(j.at("name") == "inventory");
  auto one = ask_all(raw.nc(), "$SRV.STATS.inventory." + inv2.id(), 500ms);
  REQUIRE(one.size() == 1);
  CHECK(one[0].at("id") == inv2.id());
  CHECK(one[0].at("endpoints") == json::array());
}

TEST_CASE("STATS carries the consumer's subscription statistics") {
  testing::NatsServer server;
  Connection nats(testing::test_config(server.url(), "orders"));
  Topology(nats).ensure_events_stream();
  Publisher publisher(nats);
  for (int i = 0; i < 6; ++i) (void)publisher.publish("order.created", {{"n", i}});
  std::atomic<int> handled{0};
  auto breaker = std::make_shared<CircuitBreaker>(CircuitBreakerOptions{.name = "payments-api"});
  Consumer consumer(nats);
  consumer.subscribe("order.created", [&](const Message& m) {
    if (m.envelope.message.at("n") == 0 && m.attempt() == 1) throw std::runtime_error("first try fails");
    handled++;
  }, {.circuit_breaker = breaker, .rate_limit = RateLimiterOptions{.rate = 1000}});
  consumer.start();
  for (int i = 0; i < 300 && handled < 6; ++i) std::this_thread::sleep_for(10ms);
  REQUIRE(handled == 6);

  Service service(nats, {.name = "orders", .version = "0.1.0"});
  service.add(consumer);
  testing::RawNats raw(server.url());
  auto info = ask(raw.nc(), "$SRV.INFO.orders");
  REQUIRE(info["endpoints"].size() == 1);
  CHECK(info["endpoints"][0]["name"] == "test-orders-test_orders_order_created");
  CHECK(info["endpoints"][0]["subject"] == "test.orders.order.created");
  CHECK(info["endpoints"][0]["metadata"]["kind"] == "jetstream-consumer");

  auto stats = ask(raw.nc(), "$SRV.STATS.orders." + service.id());
  REQUIRE(stats["endpoints"].size() == 1);
  const auto& ep = stats["endpoints"][0];
  CHECK(ep["num_requests"] == 7);  // six messages, one delivered twice
  CHECK(ep["num_errors"] == 1);
  CHECK(ep["processing_time"].get<int64_t>() > 0);
  const auto& data = ep.at("data");
  CHECK(data["acked"] == 6);
  CHECK(data["retried"] == 1);
  CHECK(data["dead_lettered"] == 0);
  CHECK(data["stream"] == "test-orders-events");
  CHECK(data["latency_us"]["count"] == 7);
  CHECK(data["circuit"]["name"] == "payments-api");
  CHECK(data["circuit"]["state"] == "closed");
  CHECK(data["rate_limit"]["rate"] == 1000.0);
  service.stop();
  consumer.stop(Millis{5000});
}

TEST_CASE("service options are checked: name characters, SemVer version, id") {
  testing::NatsServer server;
  Connection nats(testing::test_config(server.url(), "orders"));
  auto field_of = [&](ServiceOptions o) {
    try {
      Service s(nats, std::move(o));
    } catch (const ConfigError& e) {
      return e.field();
    }
    return std::string("accepted");
  };
  CHECK(field_of({.name = "", .version = "1.0.0"}) == "service.name");
  CHECK(field_of({.name = "in ventory", .version = "1.0.0"}) == "service.name");
  CHECK(field_of({.name = "inv.entory", .version = "1.0.0"}) == "service.name");
  CHECK(field_of({.name = "inventory", .version = "1.0"}) == "service.version");
  CHECK(field_of({.name = "inventory", .version = "01.0.0"}) == "service.version");
  CHECK(field_of({.name = "inventory", .version = "v1.0.0"}) == "service.version");
  CHECK(field_of({.name = "inventory", .version = "1.0.0", .id = "a.b"}) == "service.id");
  CHECK(field_of({.name = "inventory_2-x", .version = "10.20.30-alpha.1"}) == "accepted");
}

TEST_CASE("health: liveness and readiness from NATS, JetStream and a database check") {
  testing::NatsServer server;
  auto config = testing::test_config(server.url(), "orders");
  config.connection.reconnect_wait = Millis{100};
  config.connection.jetstream_timeout = Millis{500};
  Connection nats(config);
  Health health(nats);
  std::atomic<bool> database_up{true};
  health.add_check("database", [&] {
    if (!database_up) throw std::runtime_error("connection refused (127.0.0.1:5432)");
  });

  auto live = health.liveness();
  CHECK(live.ok);
  auto ready = health.readiness();
  CHECK(ready.ok);
  REQUIRE(ready.checks.size() == 3);
  CHECK(ready.checks[0].name == "nats");
  CHECK(ready.checks[1].name == "jetstream");
  CHECK(ready.checks[2].name == "database");
  auto j = ready.to_json();
  CHECK(j["status"] == "ok");
  CHECK(j["checks"]["jetstream"]["ok"] == true);
  CHECK(j["checks"]["database"]["detail"] == "ok");

  database_up = false;
  ready = health.readiness();
  CHECK_FALSE(ready.ok);
  CHECK(ready.to_json()["status"] == "unavailable");
  CHECK(ready.to_json()["checks"]["database"]["detail"] == "connection refused (127.0.0.1:5432)");
  CHECK(ready.to_json()["checks"]["nats"]["ok"] == true);
  CHECK(health.liveness().ok);  // a database outage is no reason to restart the process
  database_up = true;

  // NATS down: not ready, still alive (reconnecting on its own).
  server.kill();
  for (int i = 0; i < 100 && nats.connected(); ++i) std::this_thread::sleep_for(10ms);
  ready = health.readiness();
  CHECK_FALSE(ready.ok);
  CHECK(ready.to_json()["checks"]["nats"]["ok"] == false);
  CHECK(ready.to_json()["checks"]["jetstream"]["ok"] == false);
  CHECK(health.liveness().ok);

  server.start();
  bool back = false;
  for (int i = 0; i < 500 && !back; ++i) {
    std::this_thread::sleep_for(10ms);
    back = nats.connected();
  }
  REQUIRE(back);
  // JetStream may need a moment after a restart to answer.
  for (int i = 0; i < 50 && !ready.ok; ++i) {
    ready = health.readiness();
    if (!ready.ok) std::this_thread::sleep_for(100ms);
  }
  CHECK(ready.ok);

  nats.close();
  CHECK_FALSE(health.liveness().ok);  // closed for good: restart me
  CHECK_FALSE(health.readiness().ok);
  CHECK_THROWS_AS(health.add_check("", [] {}), ConfigError);
}
