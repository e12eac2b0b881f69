#include <cstdlib>
#include <fstream>

#include <doctest/doctest.h>

#include <natspubsub/config.hpp>
#include <natspubsub/error.hpp>

#include "support/servers.hpp"

using natspubsub::Config;
using natspubsub::ConfigError;

namespace {

// Expects validate() to fail on `field`; returns the message for further checks.
std::string expect_invalid(const Config& c, const std::string& field) {
  try {
    c.validate();
  } catch (const ConfigError& e) {
    CHECK(e.field() == field);
    CHECK(std::string(e.what()).find(field) != std::string::npos);
    return e.what();
  }
  FAIL("validate() accepted a config with a bad " << field);
  return {};
}

struct EnvVar {
  std::string name;
  EnvVar(std::string n, const std::string& value) : name(std::move(n)) { setenv(name.c_str(), value.c_str(), 1); }
  ~EnvVar() { unsetenv(name.c_str()); }
};

}  // namespace

TEST_CASE("presets differ where they should and are valid") {
  auto dev = Config::development("orders");
  auto prod = Config::production("orders");
  auto test = Config::testing("orders");
  dev.validate();
  prod.validate();
  test.validate();
  CHECK(dev.env == "development");
  CHECK(prod.env == "production");
  CHECK(test.env == "test");
  CHECK(prod.stream.replicas == 3);
  CHECK(dev.stream.replicas == 1);
  CHECK(test.stream.memory_storage);
  CHECK(prod.connection.max_reconnect_attempts == -1);
  CHECK(Config::preset("production", "x").stream.replicas == 3);
  CHECK_THROWS_AS((void)Config::preset("staging", "x"), ConfigError);
}

TEST_CASE("names derived from env and app") {
  auto c = Config::testing("orders");
  CHECK(c.subject("order.created") == "test.orders.order.created");
  CHECK(c.events_stream_name() == "test-orders-events");
  CHECK(c.dlq_stream_name() == "test-orders-dlq");
  CHECK(c.client_name() == "test-orders");
}

TEST_CASE("validate names the bad field and the rule") {
  auto good = Config::testing("orders");
  good.validate();

  auto c = good;
  c.app = "";
  expect_invalid(c, "app");
  c = good;
  c.app = "or.ders";
  expect_invalid(c, "app");
  c = good;
  c.env = "prod uction";
  expect_invalid(c, "env");
  c = good;
  c.servers = {};
  expect_invalid(c, "servers");
  c = good;
  c.servers = {"nats://127.0.0.1:4222", "http://127.0.0.1:4222"};
  expect_invalid(c, "servers[1]");
  c = good;
  c.servers = {"nats://127.0.0.1:99999"};
  expect_invalid(c, "servers[0]");
  c = good;
  c.servers = {"nats://:4222"};
  expect_invalid(c, "servers[0]");
  c = good;
  c.credentials.user = "svc";
  expect_invalid(c, "credentials.password");
  c = good;
  c.credentials.user = "svc";
  c.credentials.password = "pw";
  c.credentials.token = "tok";
  expect_invalid(c, "credentials");
  c = good;
  c.credentials.creds_file = "/nonexistent/file.creds";
  expect_invalid(c, "credentials.creds_file");
  c = good;
  c.tls.cert_file = "/etc/hostname";
  expect_invalid(c, "tls.key_file");
  c = good;
  c.stream.replicas = 7;
  expect_invalid(c, "stream.replicas");
  c = good;
  c.consumer.max_attempts = 0;
  expect_invalid(c, "consumer.max_attempts");
  c = good;
  c.consumer.concurrency = 0;
  expect_invalid(c, "consumer.concurrency");
  c = good;
  c.consumer.backoff = {natspubsub::Millis{10}, natspubsub::Millis{0}};
  expect_invalid(c, "consumer.backoff_ms[1]");
  c = good;
  c.consumer.ack_wait = natspubsub::Millis{0};
  expect_invalid(c, "consumer.ack_wait_ms");
  c = good;
  c.stream.max_age = natspubsub::Millis{1000};
  expect_invalid(c, "stream.duplicate_window_ms");
}

TEST_CASE("secrets never appear in validation errors or the redacted form") {
  auto c = Config::testing("orders");
  c.servers = {"nats://svc:hunter2-secret@127.0.0.1:99999"};
  auto message = expect_invalid(c, "servers[0]");
  CHECK(message.find("hunter2-secret") == std::string::npos);
  CHECK(message.find("***@127.0.0.1") != std::string::npos);

  c = Config::testing("orders");
  c.credentials.user = "svc";
  c.credentials.password = "hunter2-secret";
  c.credentials.token = "tok-secret";
  message = expect_invalid(c, "credentials");
  CHECK(message.find("hunter2-secret") == std::string::npos);
  CHECK(message.find("tok-secret") == std::string::npos);

  c.servers = {"nats://svc:hunter2-secret@host:4222"};
  auto shown = c.redacted_json().dump();
  CHECK(shown.find("hunter2-secret") == std::string::npos);
  CHECK(shown.find("tok-secret") == std::string::npos);
  CHECK(c.to_json().dump().find("hunter2-secret") != std::string::npos);  // the full form keeps it

  CHECK(natspubsub::redact_url("nats://a:b@h:1") == "nats://***@h:1");
  CHECK(natspubsub::redact_url("nats://token@h:1") == "nats://***@h:1");
  CHECK(natspubsub::redact_url("nats://h:1") == "nats://h:1");
}

TEST_CASE("JSON round trip, presets and unknown keys") {
  auto c = Config::production("payments");
  c.servers = {"nats://a:4222", "nats://b:4222"};
  c.consumer.backoff = {natspubsub::Millis{10}, natspubsub::Millis{20}};
  auto back = Config::from_json(c.to_json());
  CHECK(back.to_json() == c.to_json());

  auto j = nlohmann::json::parse(R"({"preset":"production","app":"pay","consumer":{"max_attempts":9}})");
  auto p = Config::from_json(j);
  CHECK(p.env == "production");
  CHECK(p.stream.replicas == 3);
  CHECK(p.consumer.max_attempts == 9);
  CHECK(p.app == "pay");

  try {
    (void)Config::from_json(nlohmann::json::parse(R"({"app":"x","consumer":{"max_atempts":3}})"));
    FAIL("unknown key accepted");
  } catch (const ConfigError& e) {
    CHECK(e.field() == "consumer.max_atempts");
  }
  try {
    (void)Config::from_json(nlohmann::json::parse(R"({"app":"x","stream":{"replicas":"three"}})"));
    FAIL("wrong type accepted");
  } catch (const ConfigError& e) {
    CHECK(e.field() == "stream.replicas");
  }
  CHECK_THROWS_AS((void)Config::from_json(nlohmann::json::parse("[1,2]")), ConfigError);
}

TEST_CASE("JSON file") {
  natspubsub::testing::TempDir dir;
  auto path = dir.path() / "natspubsub.json";
  {
    std::ofstream out(path);
    out << R"({"servers":"nats://10.1.1.1:4222","env":"staging","app":"inventory"})";
  }
  auto c = Config::from_json_file(path);
  CHECK(c.servers == std::vector<std::string>{"nats://10.1.1.1:4222"});
  CHECK(c.env == "staging");
  CHECK(c.app == "inventory");
  {
    std::ofstream out(path);
    out << "{not json";
  }
  CHECK_THROWS_AS((void)Config::from_json_file(path), ConfigError);
  CHECK_THROWS_AS((void)Config::from_json_file(dir.path() / "missing.json"), ConfigError);
  // A directory opens as a stream and fails on the first read: still a ConfigError.
  try {
    (void)Config::from_json_file(dir.path());
    FAIL("a directory was read as a config file");
  } catch (const ConfigError& e) {
    CHECK(std::string(e.what()).find("is a directory") != std::string::npos);
  }
}

TEST_CASE("environment variables") {
  EnvVar url("NATS_URL", "nats://10.0.0.1:4222, nats://10.0.0.2:4222");
  EnvVar app("NATSPUBSUB_APP", "shipping");
  EnvVar env("NATSPUBSUB_ENV", "prod");
  EnvVar attempts("NATSPUBSUB_MAX_ATTEMPTS", "7");
  auto c = Config::from_env();
  CHECK(c.servers == std::vector<std::string>{"nats://10.0.0.1:4222", "nats://10.0.0.2:4222"});
  CHECK(c.app == "shipping");
  CHECK(c.env == "prod");
  CHECK(c.consumer.max_attempts == 7);
  {
    // NATS_CREDS as the nats CLI reads it; NATSPUBSUB_CREDS_FILE wins when both are set.
    EnvVar creds("NATS_CREDS", "/etc/nats/user.creds");
    CHECK(Config::from_env().credentials.creds_file == "/etc/nats/user.creds");
    EnvVar ours("NATSPUBSUB_CREDS_FILE", "/etc/natspubsub/relay.creds");
    CHECK(Config::from_env().credentials.creds_file == "/etc/natspubsub/relay.creds");
  }
  {
    EnvVar servers("NATSPUBSUB_SERVERS", "nats://10.9.9.9:4222");
    CHECK(Config::from_env().servers == std::vector<std::string>{"nats://10.9.9.9:4222"});
  }
  {
    EnvVar bad("NATSPUBSUB_MAX_ATTEMPTS", "seven");
    try {
      (void)Config::from_env();
      FAIL("bad integer accepted");
    } catch (const ConfigError& e) {
      CHECK(e.field() == "NATSPUBSUB_MAX_ATTEMPTS");
    }
  }
}
