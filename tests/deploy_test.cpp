// ctest-labels: integration;deploy
// deploy/: the Prometheus alert rules pass `promtool check rules`; every metric the rules and the
// Grafana dashboard query is one the relay or natspubsub::consumer_metrics() really exports
// (collected here from the real collectables, a Consumer on a real nats-server included); the
// systemd unit passes `systemd-analyze verify` and its environment file only sets variables the
// relay reads.
#include <fstream>
#include <regex>
#include <set>
#include <sstream>

#include <doctest/doctest.h>
#include <nlohmann/json.hpp>
#include <prometheus/text_serializer.h>

#include <natspubsub/circuit_breaker.hpp>
#include <natspubsub/connection.hpp>
#include <natspubsub/consumer.hpp>
#include <natspubsub/metrics.hpp>

#include "relay_metrics.hpp"
#include "support/nats_helpers.hpp"
#include "support/servers.hpp"

using namespace natspubsub;

namespace {

const std::string kDeploy = NATSPUBSUB_SOURCE_DIR "/deploy";
const std::string kRelay = NATSPUBSUB_BINARY_DIR "/workers/natspubsub-relay";

std::string read(const std::string& path) {
  std::ifstream in(path);
  std::stringstream s;
  s << in.rdbuf();
  return s.str();
}

// Metric names in a PromQL expression (ours and process_*; `up` is Prometheus' own).
std::set<std::string> queried(const std::string& expr) {
  static const std::regex name(R"(\b((?:natspubsub|process)_[a-zA-Z0-9_]+))");
  std::set<std::string> out;
  for (std::sregex_iterator it(expr.begin(), expr.end(), name), end; it != end; ++it) out.insert((*it)[1]);
  return out;
}

// Sample names in a text exposition.
std::set<std::string> exported(const std::string& text) {
  std::set<std::string> out;
  std::istringstream in(text);
  for (std::string line; std::getline(in, line);) {
    if (line.empty() || line[0] == '#') continue;
    out.insert(line.substr(0, line.find_first_of("{ ")));
  }
  return out;
}

void collect_exprs(const nlohmann::json& j, std::vector<std::string>& out) {
  if (j.is_object()) {
    for (const auto& [k, v] : j.items()) {
      if (k == "expr" && v.is_string()) out.push_back(v.get<std::string>());
      collect_exprs(v, out);
    }
  } else if (j.is_array()) {
    for (const auto& v : j) collect_exprs(v, out);
  }
}

}  // namespace

TEST_CASE("alert rules pass promtool check rules") {
  auto r = testing::run_command("promtool check rules " + kDeploy + "/prometheus/natspubsub-alerts.yml 2>&1");
  INFO(r.output);
  CHECK(r.status == 0);
  CHECK(r.output.find("SUCCESS: 8 rules found") != std::string::npos);
}

TEST_CASE("the dashboard and the alert rules query only metrics the relay and consumers export") {
  testing::NatsServer nats;
  Connection connection(testing::test_config(nats.url(), "orders"));
  Consumer consumer(connection);
  consumer.subscribe("order.created", [](const Message&) {},
                     {.circuit_breaker = std::make_shared<CircuitBreaker>(CircuitBreakerOptions{})});
  consumer.start();
  workers::RelayMetrics relay({.relay = [] { return RelayStats{}; },
                               .outbox = [] { return OutboxStats{}; },
                               .nats_connected = [] { return true; }});
  prometheus::TextSerializer text;
  auto names = exported(text.Serialize(relay.Collect()) + text.Serialize(process_metrics()->Collect()) +
                        text.Serialize(consumer_metrics(consumer)->Collect()));
  consumer.stop();
  REQUIRE(names.count("natspubsub_consumer_circuit_state") == 1);

  auto dashboard = nlohmann::json::parse(read(kDeploy + "/grafana/natspubsub-dashboard.json"));
  CHECK(dashboard["uid"] == "natspubsub");
  std::vector<std::string> exprs;
  collect_exprs(dashboard, exprs);
  CHECK(exprs.size() >= 20);
  std::set<std::string> used;
  for (const auto& e : exprs) used.merge(queried(e));
  auto rules = read(kDeploy + "/prometheus/natspubsub-alerts.yml");
  std::set<std::string> in_rules = queried(rules);
  for (const auto& n : in_rules) used.insert(n);
  CHECK(used.size() >= 20);
  for (const auto& n : used) CHECK_MESSAGE(names.count(n) == 1, n << " is queried but not exported");
  // The alerts the operator was promised are there.
  for (const char* alert : {"NatspubsubOutboxOldestPendingAge", "NatspubsubOutboxFailedRows", "NatspubsubDlqGrowing",
                            "NatspubsubRelayDown", "NatspubsubConsumerDown", "NatspubsubCircuitOpen"}) {
    CHECK_MESSAGE(rules.find(std::string("alert: ") + alert + "\n") != std::string::npos, alert);
  }
}

TEST_CASE("the systemd unit passes systemd-analyze verify; its environment file sets only variables the relay reads") {
  auto help = testing::run_command(kRelay + " --help");
  REQUIRE(help.status == 0);
  std::istringstream env(read(kDeploy + "/systemd/natspubsub-relay.env"));
  int set = 0;
  for (std::string line; std::getline(env, line);) {
    if (line.empty() || line[0] == '#') continue;
    auto key = line.substr(0, line.find('='));
    CHECK_MESSAGE(help.output.find(key) != std::string::npos, key << " is not read by natspubsub-relay");
    ++set;
  }
  CHECK(set >= 5);

  if (testing::run_command("command -v systemd-analyze").status != 0) {
    MESSAGE("systemd-analyze is not installed: the unit file is not verified");
    return;
  }
  // Verified as installed, with ExecStart pointing at the binary built here.
  testing::TempDir dir;
  auto unit = (dir.path() / "natspubsub-relay.service").string();
  auto text = read(kDeploy + "/systemd/natspubsub-relay.service");
  text = std::regex_replace(text, std::regex("/usr/bin/natspubsub-relay"), kRelay);
  std::ofstream(unit) << text;
  auto r = testing::run_command("systemd-analyze verify --man=no " + unit + " 2>&1", std::chrono::seconds(60));
  INFO(r.output);
  CHECK(r.status == 0);
}
