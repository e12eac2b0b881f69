// ctest-labels: integration
// Metrics through prometheus-cpp: the relay's collectable, natspubsub_build_info and process_*,
// every subscription of a Consumer (natspubsub/metrics.hpp), and the relay's HTTP endpoint
// (GET and HEAD on /metrics, /livez, /readyz, /healthz). Texts are checked by
// `promtool check metrics` (Debian package prometheus). A real nats-server for the consumer.
#include <atomic>
#include <chrono>
#include <fstream>
#include <thread>

#include <civetweb.h>
#include <doctest/doctest.h>
#include <prometheus/exposer.h>
#include <prometheus/registry.h>
#include <prometheus/text_serializer.h>

#include <natspubsub/circuit_breaker.hpp>
#include <natspubsub/connection.hpp>
#include <natspubsub/consumer.hpp>
#include <natspubsub/metrics.hpp>
#include <natspubsub/publisher.hpp>
#include <natspubsub/topology.hpp>
#include <natspubsub/version.hpp>

#include "metrics_server.hpp"
#include "relay_metrics.hpp"
#include "support/nats_helpers.hpp"
#include "support/servers.hpp"

using namespace natspubsub;
using namespace std::chrono_literals;

namespace {

std::string serialize(const prometheus::Collectable& c) { return prometheus::TextSerializer().Serialize(c.Collect()); }

bool has_line(const std::string& text, const std::string& line) {
  return ("\n" + text).find("\n" + line + "\n") != std::string::npos;
}

// `promtool check metrics` on `text`: exit 0 and its output (lint findings fail it).
testing::CommandResult promtool(const std::string& text) {
  testing::TempDir dir;
  auto file = (dir.path() / "metrics.txt").string();
  std::ofstream(file) << text;
  return testing::run_command("promtool check metrics < '" + file + "' 2>&1", 30s);
}

// HTTP status of `method` (GET or HEAD) on `url`, "000" when nothing answers.
std::string http_code(const std::string& url, const std::string& method = "GET") {
  auto r = testing::run_command("curl -s -m 5 -o /dev/null -w '%{http_code}' " + std::string(method == "HEAD" ? "-I " : "") +
                                "'" + url + "'");
  return r.output;
}

}  // namespace

TEST_CASE("promtool is installed (scripts/bootstrap installs Debian's prometheus)") {
  REQUIRE(testing::run_command("command -v promtool").status == 0);
}

TEST_CASE("relay metrics: counters above 10^6 are exact integers; released and cleaned are exported; promtool accepts") {
  RelayStats s;
  s.published = 1'234'567;
  s.duplicates = 1'000'000'000'007;  // beyond 10^12, still below 2^53
  s.retried = 5;
  s.failed = 6;
  s.released = 7;
  s.cleaned = 2'000'001;
  s.errors = 1;
  s.batches = 12'346;
  s.publish_latency.record(0.002);
  s.publish_latency.record(0.2);
  s.publish_latency.record(9.0);
  workers::RelayMetrics metrics({.relay = [&] { return s; },
                                 .outbox =
                                     [] {
                                       OutboxStats o;
                                       o.pending = 2'500'000;
                                       o.failed = 3;
                                       o.oldest_unsent_age = std::chrono::milliseconds(1500);
                                       return o;
                                     },
                                 .nats_connected = [] { return true; }});
  auto text = serialize(metrics) + serialize(*process_metrics());
  INFO(text);
  CHECK(has_line(text, "natspubsub_relay_published_total 1234567"));
  CHECK(has_line(text, "natspubsub_relay_duplicates_total 1000000000007"));
  CHECK(has_line(text, "natspubsub_relay_released_total 7"));
  CHECK(has_line(text, "natspubsub_relay_cleaned_total 2000001"));
  CHECK(has_line(text, "natspubsub_relay_batches_total 12346"));
  CHECK(has_line(text, "natspubsub_outbox_pending 2500000"));
  CHECK(has_line(text, "natspubsub_outbox_failed 3"));
  CHECK(has_line(text, "natspubsub_outbox_oldest_pending_age_seconds 1.5"));
  CHECK(has_line(text, "natspubsub_relay_publish_latency_seconds_bucket{le=\"0.005\"} 1"));
  CHECK(has_line(text, "natspubsub_relay_publish_latency_seconds_bucket{le=\"5\"} 2"));
  CHECK(has_line(text, "natspubsub_relay_publish_latency_seconds_bucket{le=\"+Inf\"} 3"));
  CHECK(has_line(text, "natspubsub_relay_publish_latency_seconds_count 3"));
  CHECK(has_line(text, "natspubsub_nats_connected 1"));
  CHECK(has_line(text, "natspubsub_database_up 1"));
  CHECK(has_line(text, "natspubsub_build_info{version=\"" + std::string(version()) + "\"} 1"));
  for (const char* name : {"process_cpu_seconds_total ", "process_resident_memory_bytes ", "process_start_time_seconds ",
                           "process_virtual_memory_bytes ", "process_open_fds ", "process_max_fds "}) {
    CHECK_MESSAGE(text.find(std::string("\n") + name) != std::string::npos, name);
  }
  auto check = promtool(text);
  INFO(check.output);
  CHECK(check.status == 0);

  // A database that does not answer: no outbox figures (not zeros that look healthy), database_up 0.
  workers::RelayMetrics down({.relay = [&] { return s; },
                              .outbox = []() -> OutboxStats { throw std::runtime_error("no such table"); },
                              .nats_connected = [] { return false; }});
  auto down_text = serialize(down);
  CHECK(has_line(down_text, "natspubsub_database_up 0"));
  CHECK(has_line(down_text, "natspubsub_nats_connected 0"));
  CHECK(down_text.find("natspubsub_outbox_pending") == std::string::npos);
}

TEST_CASE("--metrics-addr: :PORT means every interface; addresses are validated") {
  auto all = workers::parse_listen_address(":9464");
  CHECK((all == "9464" || all == "+9464"));
  CHECK(workers::parse_listen_address("127.0.0.1:9464") == "127.0.0.1:9464");
  CHECK(workers::parse_listen_address("0.0.0.0:1") == "0.0.0.0:1");
  CHECK(workers::parse_listen_address("localhost:9464") == "127.0.0.1:9464");
  if (mg_check_feature(8) != 0) {
    CHECK(workers::parse_listen_address("[::1]:9464") == "[::1]:9464");
    CHECK(workers::parse_listen_address("[::]:65535") == "[::]:65535");
  } else {
    // Debian 12's CivetWeb is built without IPv6: refused at once (exit 2), not at bind time.
    CHECK(all == "9464");
    CHECK_THROWS_WITH_AS((void)workers::parse_listen_address("[::1]:9464"),
                         doctest::Contains("no IPv6 support"), std::invalid_argument);
  }
  for (const char* bad : {"9464", ":0", ":65536", ":", ":94x", "example.com:9464", "[::1:9464", "1.2.3:9", "[zz]:9"}) {
    CHECK_THROWS_AS_MESSAGE((void)workers::parse_listen_address(bad), std::invalid_argument, bad);
  }
}

TEST_CASE("the relay's HTTP endpoint: GET and HEAD, /livez always 200, /readyz and /healthz follow readiness") {
  auto port = testing::free_port();
  std::atomic<bool> ready{true};
  workers::MetricsServer server("127.0.0.1:" + std::to_string(port), [&] {
    HealthReport r;
    r.ok = ready.load();
    HealthCheck c;
    c.name = "nats";
    c.ok = r.ok;
    c.detail = r.ok ? "connected" : "disconnected";
    r.checks.push_back(c);
    return r;
  });
  RelayStats s;
  s.published = 3'000'000;
  server.add_collectable(std::make_shared<workers::RelayMetrics>(workers::RelayMetrics::Sources{
      .relay = [&] { return s; }, .outbox = [] { return OutboxStats{}; }, .nats_connected = [] { return true; }}));
  REQUIRE(server.ports() == std::vector<int>{port});
  const auto base = "http://127.0.0.1:" + std::to_string(port);

  auto metrics = testing::run_command("curl -s -m 5 -D - '" + base + "/metrics'");
  INFO(metrics.output);
  CHECK(metrics.output.find("200 OK") != std::string::npos);
  CHECK(metrics.output.find("Content-Type: text/plain; version=0.0.4") != std::string::npos);
  CHECK(metrics.output.find("\nnatspubsub_relay_published_total 3000000\n") != std::string::npos);
  for (const char* path : {"/metrics", "/livez", "/readyz", "/healthz"}) {
    CHECK_MESSAGE(http_code(base + path) == "200", path);
    CHECK_MESSAGE(http_code(base + path, "HEAD") == "200", path);
  }
  CHECK(http_code(base + "/nothing") == "404");
  CHECK(http_code(base + "/metrics/x") == "404");

  ready = false;
  CHECK(http_code(base + "/livez") == "200");
  CHECK(http_code(base + "/readyz") == "503");
  CHECK(http_code(base + "/readyz", "HEAD") == "503");
  CHECK(http_code(base + "/healthz") == "503");
  auto body = testing::run_command("curl -s -m 5 '" + base + "/readyz'");
  CHECK(nlohmann::json::parse(body.output)["checks"]["nats"]["ok"] == false);

  // A port already taken: one clear error, not a crash.
  CHECK_THROWS_AS(workers::MetricsServer("127.0.0.1:" + std::to_string(port), [] { return HealthReport{}; }),
                  std::runtime_error);
}

TEST_CASE("consumer_metrics: one call exposes every subscription, exact and labelled, on the application's exposer") {
  testing::NatsServer nats;
  auto config = testing::test_config(nats.url(), "orders");
  Connection connection(config);
  Topology(connection).ensure_events_stream();
  Publisher publisher(connection);

  auto breaker = std::make_shared<CircuitBreaker>(CircuitBreakerOptions{.name = "warehouse"});
  std::atomic<int> shipped_calls{0};
  Consumer consumer(connection);
  consumer.subscribe("order.created", [](const Message&) {}, {.circuit_breaker = breaker});
  consumer.subscribe("order.shipped", [&](const Message&) {
    if (shipped_calls++ == 0) throw std::runtime_error("first try fails");
  }, {.backoff = Backoff::list({Millis{50}})});
  consumer.start();
  for (int i = 0; i < 3; ++i) (void)publisher.publish("order.created", {{"i", i}});
  (void)publisher.publish("order.shipped", {{"i", 9}});

  auto deadline = std::chrono::steady_clock::now() + 10s;
  while (std::chrono::steady_clock::now() < deadline &&
         (consumer.stats("test-orders-test_orders_order_created").acked < 3 ||
          consumer.stats("test-orders-test_orders_order_shipped").acked < 1)) {
    std::this_thread::sleep_for(10ms);
  }

  // What an application does: its own exposer and registry, our collectable beside them.
  auto port = testing::free_port();
  prometheus::Exposer exposer("127.0.0.1:" + std::to_string(port));
  auto registry = std::make_shared<prometheus::Registry>();
  exposer.RegisterCollectable(registry);
  auto metrics = consumer_metrics(consumer);
  exposer.RegisterCollectable(metrics);
  auto text = testing::run_command("curl -s -m 5 http://127.0.0.1:" + std::to_string(port) + "/metrics").output;
  INFO(text);
  const std::string created =
      R"({durable="test-orders-test_orders_order_created",stream="test-orders-events",subject="test.orders.order.created"})";
  const std::string shipped =
      R"({durable="test-orders-test_orders_order_shipped",stream="test-orders-events",subject="test.orders.order.shipped"})";
  CHECK(has_line(text, "natspubsub_consumer_received_total" + created + " 3"));
  CHECK(has_line(text, "natspubsub_consumer_acked_total" + created + " 3"));
  CHECK(has_line(text, "natspubsub_consumer_acked_total" + shipped + " 1"));
  CHECK(has_line(text, "natspubsub_consumer_retried_total" + shipped + " 1"));
  CHECK(has_line(text, "natspubsub_consumer_handler_errors_total" + shipped + " 1"));
  CHECK(has_line(text, "natspubsub_consumer_dead_lettered_total" + created + " 0"));
  CHECK(has_line(text, "natspubsub_consumer_in_flight" + created + " 0"));
  CHECK(has_line(text, "natspubsub_consumer_handler_latency_seconds_count" + created + " 3"));
  CHECK(text.find("natspubsub_consumer_handler_latency_seconds_bucket{durable=\"test-orders-test_orders_order_created\","
                  "stream=\"test-orders-events\",subject=\"test.orders.order.created\",le=\"0.0001\"}") != std::string::npos);
  // The circuit: one series per state, 1 for the current one; none for a subscription without a breaker.
  CHECK(has_line(text, "natspubsub_consumer_circuit_state" + created.substr(0, created.size() - 1) + R"(,state="closed"} 1)"));
  CHECK(has_line(text, "natspubsub_consumer_circuit_state" + created.substr(0, created.size() - 1) + R"(,state="open"} 0)"));
  CHECK(text.find("natspubsub_consumer_circuit_state{durable=\"test-orders-test_orders_order_shipped\"") == std::string::npos);
  auto check = promtool(text);
  INFO(check.output);
  CHECK(check.status == 0);

  // An exposer holds a weak_ptr: dropping ours unregisters the consumer's metrics.
  metrics.reset();
  auto after = testing::run_command("curl -s -m 5 http://127.0.0.1:" + std::to_string(port) + "/metrics").output;
  CHECK(after.find("natspubsub_consumer_acked_total") == std::string::npos);
  consumer.stop();
}
