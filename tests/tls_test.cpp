// ctest-labels: security
// TLS against a real nats-server, with certificates made at test time by the openssl command:
// the right CA connects (and JetStream works over it), a wrong CA or a wrong hostname fails with a
// clear ConnectionError, a plain client against a TLS-only server fails clearly, and a server that
// requires client certificates accepts ours and refuses a client without one.
#include <string>

#include <doctest/doctest.h>

#include <natspubsub/config.hpp>
#include <natspubsub/connection.hpp>
#include <natspubsub/error.hpp>
#include <natspubsub/publisher.hpp>
#include <natspubsub/topology.hpp>

#include "support/nats_helpers.hpp"
#include "support/servers.hpp"

using namespace natspubsub;

namespace {

// A CA, a server certificate for localhost / 127.0.0.1 signed by it, a client certificate signed
// by it, and an unrelated CA. Keys are EC P-256: quick to make.
struct Certificates {
  testing::TempDir dir{"natspubsub-tls"};
  std::string path(const std::string& name) const { return (dir.path() / name).string(); }

  Certificates() {
    const auto d = dir.path().string();
    std::string script =
        "set -e; cd '" + d + "'\n"
        "key() { openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out \"$1\" 2>/dev/null; }\n"
        "key ca.key; openssl req -x509 -new -key ca.key -days 2 -subj '/CN=natspubsub test CA' -out ca.pem\n"
        "key other-ca.key; openssl req -x509 -new -key other-ca.key -days 2 -subj '/CN=someone else' -out other-ca.pem\n"
        "key server.key; openssl req -new -key server.key -subj '/CN=localhost' -out server.csr\n"
        "printf 'subjectAltName=DNS:localhost,IP:127.0.0.1\\nextendedKeyUsage=serverAuth\\n' > server.ext\n"
        "openssl x509 -req -in server.csr -CA ca.pem -CAkey ca.key -CAcreateserial -days 2 -extfile server.ext "
        "-out server.pem 2>/dev/null\n"
        "key client.key; openssl req -new -key client.key -subj '/CN=orders' -out client.csr\n"
        "printf 'extendedKeyUsage=clientAuth\\n' > client.ext\n"
        "openssl x509 -req -in client.csr -CA ca.pem -CAkey ca.key -CAcreateserial -days 2 -extfile client.ext "
        "-out client.pem 2>/dev/null\n";
    auto r = testing::run_command(script, std::chrono::seconds(60));
    REQUIRE_MESSAGE(r.status == 0, "openssl failed: " << r.error);
  }

  std::string server_tls_block(bool verify_clients) const {
    std::string block = "tls {\n  cert_file: \"" + path("server.pem") + "\"\n  key_file: \"" + path("server.key") +
                        "\"\n  timeout: 2\n";
    if (verify_clients) block += "  ca_file: \"" + path("ca.pem") + "\"\n  verify: true\n";
    return block + "}\n";
  }
};

Config tls_config(const testing::NatsServer& server, const std::string& ca) {
  auto c = testing::test_config("tls://127.0.0.1:" + std::to_string(server.port()), "orders");
  c.tls.ca_file = ca;
  c.connection.connect_timeout = std::chrono::milliseconds(2000);
  return c;
}

std::string connect_error(const Config& config) {
  try {
    Connection c(config);
    return "";
  } catch (const AuthError& e) {
    return std::string("AuthError (wrong type): ") + e.what();
  } catch (const ConnectionError& e) {
    return e.what();
  }
}

}  // namespace

TEST_CASE("TLS: the right CA connects and JetStream works; a wrong CA or hostname is a clear error") {
  Certificates certs;
  testing::NatsServer::Options o;
  o.extra_config = certs.server_tls_block(false);
  testing::NatsServer server(o);

  SUBCASE("right CA") {
    auto config = tls_config(server, certs.path("ca.pem"));
    Connection c(config);
    CHECK(c.connected());
    Topology(c).ensure_events_stream();
    CHECK(Publisher(c).publish("order.created", {{"id", 1}}).sequence == 1);
  }
  SUBCASE("right CA, expected hostname localhost") {
    auto config = tls_config(server, certs.path("ca.pem"));
    config.tls.expected_hostname = "localhost";
    Connection c(config);
    CHECK(c.connected());
  }
  SUBCASE("wrong CA") {
    auto error = connect_error(tls_config(server, certs.path("other-ca.pem")));
    MESSAGE("wrong CA: " << error);
    REQUIRE_FALSE(error.empty());
    CHECK(error.find("AuthError") == std::string::npos);
    CHECK(error.find("TLS") != std::string::npos);
  }
  SUBCASE("wrong hostname") {
    auto config = tls_config(server, certs.path("ca.pem"));
    config.tls.expected_hostname = "payments.example.com";
    auto error = connect_error(config);
    MESSAGE("wrong hostname: " << error);
    REQUIRE_FALSE(error.empty());
    CHECK(error.find("TLS") != std::string::npos);
  }
  SUBCASE("plain client against a TLS-only server") {
    auto config = testing::test_config(server.url(), "orders");
    auto error = connect_error(config);
    MESSAGE("plain client: " << error);
    REQUIRE_FALSE(error.empty());
    CHECK(error.find(std::to_string(server.port())) != std::string::npos);
  }
  SUBCASE("a CA file that does not exist is named") {
    auto config = tls_config(server, certs.path("missing-ca.pem"));
    try {
      Connection c(config);
      FAIL("connected without a CA file");
    } catch (const Error& e) {
      MESSAGE("missing CA file: " << std::string(e.what()));
      CHECK(std::string(e.what()).find("missing-ca.pem") != std::string::npos);
    }
  }
}

TEST_CASE("TLS with client certificates: ours is accepted, no certificate is refused") {
  Certificates certs;
  testing::NatsServer::Options o;
  o.extra_config = certs.server_tls_block(true);
  testing::NatsServer server(o);

  auto config = tls_config(server, certs.path("ca.pem"));
  auto error = connect_error(config);
  MESSAGE("without a client certificate: " << error);
  CHECK_FALSE(error.empty());
  CHECK(error.find("client certificates") != std::string::npos);  // names the likely cause

  config.tls.cert_file = certs.path("client.pem");
  config.tls.key_file = certs.path("client.key");
  Connection c(config);
  Topology(c).ensure_events_stream();
  CHECK(Publisher(c).publish("order.created", {{"id", 2}}).sequence == 1);
}
