#include <atomic>
#include <chrono>
#include <thread>

#include <doctest/doctest.h>

#include <natspubsub/connection.hpp>
#include <natspubsub/error.hpp>

#include "support/nats_helpers.hpp"
#include "support/eventually.hpp"
#include "support/servers.hpp"

using namespace natspubsub;
using namespace std::chrono_literals;
using natspubsub::testing::eventually;

TEST_CASE("connects, reports health, and closes") {
  testing::NatsServer server;
  Connection c(testing::test_config(server.url(), "orders"));
  CHECK(c.connected());
  auto h = c.health();
  CHECK(h.ready());
  CHECK(h.jetstream);
  CHECK(h.server.find("127.0.0.1") != std::string::npos);
  c.close();
  CHECK(c.state() == ConnectionState::closed);
  CHECK_FALSE(c.health().live());
  c.close();  // twice is fine
}

TEST_CASE("unreachable server is a ConnectionError naming the server") {
  auto port = testing::free_port();
  auto config = testing::test_config("nats://127.0.0.1:" + std::to_string(port), "orders");
  config.connection.connect_timeout = 500ms;
  try {
    Connection c(config);
    FAIL("connected to nothing");
  } catch (const AuthError&) {
    FAIL("reported as an auth failure");
  } catch (const ConnectionError& e) {
    CHECK(std::string(e.what()).find(std::to_string(port)) != std::string::npos);
  }
}

TEST_CASE("wrong password is an AuthError without the password") {
  testing::NatsServer::Options o;
  o.user = "orders";
  o.password = "right-password-123";
  testing::NatsServer server(o);

  auto config = testing::test_config(server.url(), "orders");
  config.credentials.user = "orders";
  config.credentials.password = "wrong-password-456";
  try {
    Connection c(config);
    FAIL("connected with a wrong password");
  } catch (const AuthError& e) {
    std::string what = e.what();
    CHECK(what.find("wrong-password-456") == std::string::npos);
    CHECK(what.find("right-password-123") == std::string::npos);
    CHECK(what.find("credentials") != std::string::npos);
  }

  // A password inside the URL is not echoed either.
  auto url_config = testing::test_config("nats://orders:wrong-password-456@127.0.0.1:" + std::to_string(server.port()), "orders");
  try {
    Connection c(url_config);
    FAIL("connected with a wrong password in the URL");
  } catch (const ConnectionError& e) {
    CHECK(std::string(e.what()).find("wrong-password-456") == std::string::npos);
  }

  config.credentials.password = "right-password-123";
  Connection ok(config);
  CHECK(ok.health().ready());
}

TEST_CASE("token authentication") {
  testing::NatsServer::Options o;
  o.token = "s3cret-token";
  testing::NatsServer server(o);
  auto config = testing::test_config(server.url(), "orders");
  config.credentials.token = "not-the-token";
  CHECK_THROWS_AS(Connection{config}, AuthError);
  config.credentials.token = "s3cret-token";
  Connection c(config);
  CHECK(c.connected());
}

TEST_CASE("reconnects after the server restarts and reports each transition") {
  testing::NatsServer server;
  std::atomic<int> disconnected{0}, reconnected{0}, closed{0};
  ConnectionEvents events;
  events.on_disconnected = [&] { disconnected++; };
  events.on_reconnected = [&] { reconnected++; };
  events.on_closed = [&] { closed++; };
  events.on_connected = [] { throw std::runtime_error("a throwing callback must not break anything"); };
  auto config = testing::test_config(server.url(), "orders");
  Connection c(config, events);
  CHECK(c.connected());

  server.kill();
  CHECK(eventually([&] { return disconnected.load() == 1; }));
  CHECK(c.state() == ConnectionState::reconnecting);
  CHECK_FALSE(c.health().ready());

  server.start();
  CHECK(eventually([&] { return reconnected.load() == 1; }));
  CHECK(c.connected());
  CHECK(eventually([&] { return c.health().ready(); }));
  CHECK(c.health().reconnects == 1);

  c.close();
  CHECK(closed.load() == 1);
}

TEST_CASE("a move keeps the connection working") {
  testing::NatsServer server;
  Connection a(testing::test_config(server.url(), "orders"));
  Connection b(std::move(a));
  CHECK(b.connected());
  CHECK(b.health().ready());
}
