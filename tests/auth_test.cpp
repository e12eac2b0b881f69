// ctest-labels: security
// Authentication against real servers configured for each method: user/password, token, nkey
// and a creds file (user JWT + seed, operator mode). The right secret connects; a wrong one is an
// AuthError whose message says what failed without containing the secret; and no secret reaches a
// log line at any level (checked with a capturing spdlog sink), also from the relay worker.
//
// The nkey test uses pairs generated for the run (tests/support/nkeys: openssl Ed25519 + the nkey
// encoding). The creds test needs an operator, an account and a user JWT signed by them, which
// only nsc makes (not installed here): it uses the public test fixtures of the NATS Go client
// (nats.go, nats_test.go "Trust Server Tests"): published test keys, not secrets, without expiry.
// The fixture user pair also checks the nkey encoder against an independent one.
#include <nats/nats.h>

#include <chrono>
#include <fstream>
#include <string>

#include <doctest/doctest.h>

#include <natspubsub/config.hpp>
#include <natspubsub/connection.hpp>
#include <natspubsub/error.hpp>
#include <natspubsub/publisher.hpp>
#include <natspubsub/topology.hpp>

#include "support/log_capture.hpp"
#include "support/nats_helpers.hpp"
#include "support/nkeys.hpp"
#include "support/servers.hpp"

using namespace natspubsub;

namespace {

// nats.go test fixture: a user nkey pair...
constexpr const char* kUserSeed = "SUAMK2FG4MI6UE3ACF3FK3OIQBCEIEZV7NSWFFEW63UXMRLFM2XLAXK4GY";
constexpr const char* kUserPublic = "UAT6BWCSCWLUKJT6K6MBJJOEOTXZ5AJDOYKNEVRFC7VNO6OA43N4TRNO";
// ...another user seed (nats.go TestNkeyAuth), used as "the wrong seed"...
constexpr const char* kOtherSeed = "SUAKYRHVIOREXV7EUZTBHUHL7NUMHPMAS7QMDU3GTIUWEI5LDNOXD43IZY";
// ...the operator that signed the account, the account, and the account's JWT (signed by the operator)...
constexpr const char* kOperatorPublic = "OD2W2I4MVRA5TGZLZ2AG6ZHGVL3OTKFWQJFIX4TNBER23E6P46S345YY";
constexpr const char* kAccountPublic = "AAPQJQUPKVXGW5CZH5G2HFJULYSKDELAZRVWJA26VDZO7WSBUNIYRFNQ";
constexpr const char* kAccountJwt =
    "eyJ0eXAiOiJqd3QiLCJhbGciOiJlZDI1NTE5In0."
    "eyJqdGkiOiJLWjZIUVRXRlY3WkRZSFo3NklRNUhPM0pINDVRNUdJS0JNMzJTSENQVUJNNk5PNkU3TUhRIiwiaWF0IjoxNTQ0MDcxODg5LCJpc3Mi"
    "OiJPRDJXMkk0TVZSQTVUR1pMWjJBRzZaSEdWTDNPVEtGV1FKRklYNFROQkVSMjNFNlA0NlMzNDVZWSIsInN1YiI6IkFBUFFKUVVQS1ZYR1c1Q1pI"
    "NUcySEZKVUxZU0tERUxBWlJWV0pBMjZWRFpPN1dTQlVOSVlSRk5RIiwidHlwZSI6ImFjY291bnQiLCJuYXRzIjp7ImxpbWl0cyI6eyJzdWJzIjot"
    "MSwiY29ubiI6LTEsImltcG9ydHMiOi0xLCJleHBvcnRzIjotMSwiZGF0YSI6LTEsInBheWxvYWQiOi0xLCJ3aWxkY2FyZHMiOnRydWV9fX0."
    "8o35JPQgvhgFT84Bi2Z-zAeSiLrzzEZn34sgr1DIBEDTwa-EEiMhvTeos9cvXxoZVCCadqZxAWVwS6paAMj8Bg";
// ...and the user's JWT (subject kUserPublic, issued by the account).
constexpr const char* kUserJwt =
    "eyJ0eXAiOiJqd3QiLCJhbGciOiJlZDI1NTE5In0."
    "eyJqdGkiOiJBSFQzRzNXRElDS1FWQ1FUWFJUTldPRlVVUFRWNE00RFZQV0JGSFpJQUROWEZIWEpQR0FBIiwiaWF0IjoxNTQ0MDcxODg5LCJpc3Mi"
    "OiJBQVBRSlFVUEtWWEdXNUNaSDVHMkhGSlVMWVNLREVMQVpSVldKQTI2VkRaTzdXU0JVTklZUkZOUSIsInN1YiI6IlVBVDZCV0NTQ1dMVUtKVDZL"
    "Nk1CSkpPRU9UWFo1QUpET1lLTkVWUkZDN1ZOTzZPQTQzTjRUUk5PIiwidHlwZSI6InVzZXIiLCJuYXRzIjp7InB1YiI6e30sInN1YiI6e319fQ."
    "_8A1XM88Q2kp7XVJZ42bQuO9E3QPsNAGKtVjAkDycj8A5PtRPby9UpqBUZzBwiJQQO3TUcD5GGqSvsMm6X8hCQ";

std::string write_file(const testing::TempDir& dir, const std::string& name, const std::string& content) {
  auto path = (dir.path() / name).string();
  std::ofstream(path) << content;
  return path;
}

std::string creds(const std::string& jwt, const std::string& seed) {
  return "-----BEGIN NATS USER JWT-----\n" + jwt + "\n------END NATS USER JWT------\n\n" +
         "-----BEGIN USER NKEY SEED-----\n" + seed + "\n------END USER NKEY SEED------\n";
}

// Connecting with `config` must fail with an AuthError that names the problem and contains none
// of `secrets`.
void expect_auth_error(const Config& config, const std::vector<std::string>& secrets) {
  try {
    Connection c(config);
    FAIL("connected with wrong credentials");
  } catch (const AuthError& e) {
    std::string what = e.what();
    MESSAGE("error: " << what);
    CHECK(what.find("credentials") != std::string::npos);
    for (const auto& s : secrets) CHECK_MESSAGE(what.find(s) == std::string::npos, "the error contains a secret");
  }
}

void check_no_secret(const std::string& logs, const std::vector<std::string>& secrets) {
  CHECK(!logs.empty());  // something was logged, so the check below is not vacuous
  for (const auto& s : secrets) CHECK_MESSAGE(logs.find(s) == std::string::npos, "a log line contains a secret");
}

}  // namespace

TEST_CASE("user/password: right works, wrong is a clear AuthError; neither reaches a log line") {
  testing::LogCapture logs;
  testing::NatsServer::Options o;
  o.user = "orders";
  o.password = "pw-Right-7f3a9c";
  testing::NatsServer server(o);
  auto config = testing::test_config(server.url(), "orders");
  config.credentials.user = "orders";
  config.credentials.password = "pw-Wrong-b81e22";
  expect_auth_error(config, {"pw-Wrong-b81e22", "pw-Right-7f3a9c"});

  config.credentials.password = "pw-Right-7f3a9c";
  Connection c(config);
  Topology(c).ensure_events_stream();
  CHECK(Publisher(c).publish("order.created", {{"id", 1}}).sequence == 1);
  CHECK(config.redacted_json().dump().find("pw-Right-7f3a9c") == std::string::npos);
  check_no_secret(logs.text(), {"pw-Wrong-b81e22", "pw-Right-7f3a9c"});
}

TEST_CASE("token: right works, wrong is a clear AuthError; neither reaches a log line") {
  testing::LogCapture logs;
  testing::NatsServer::Options o;
  o.token = "tok-Right-0c55e1";
  testing::NatsServer server(o);
  auto config = testing::test_config(server.url(), "orders");
  config.credentials.token = "tok-Wrong-9d0a47";
  expect_auth_error(config, {"tok-Wrong-9d0a47", "tok-Right-0c55e1"});
  config.credentials.token = "tok-Right-0c55e1";
  Connection c(config);
  CHECK(c.health().ready());
  check_no_secret(logs.text(), {"tok-Wrong-9d0a47", "tok-Right-0c55e1"});
}

TEST_CASE("the test's nkey encoder agrees with the published nats.go fixture pair") {
  testing::TempDir dir;
  CHECK(testing::user_public_key_of(kUserSeed, dir) == kUserPublic);
  auto fresh = testing::generate_user_nkey(dir);
  CHECK(fresh.seed.size() == 58);
  CHECK(fresh.seed.rfind("SU", 0) == 0);
  CHECK(fresh.public_key.size() == 56);
  CHECK(fresh.public_key.rfind("U", 0) == 0);
  CHECK(testing::user_public_key_of(fresh.seed, dir) == fresh.public_key);
  CHECK(testing::generate_user_nkey(dir).seed != fresh.seed);
}

TEST_CASE("nkey: the right seed works, another seed is a clear AuthError; no seed reaches a log line") {
  testing::LogCapture logs;
  testing::TempDir dir;
  // Pairs made for this run (openssl Ed25519, nkey encoding), not published ones.
  const auto user = testing::generate_user_nkey(dir);
  const auto other = testing::generate_user_nkey(dir);
  testing::NatsServer::Options o;
  o.extra_config = "authorization {\n  users = [ { nkey: \"" + user.public_key + "\" } ]\n}\n";
  testing::NatsServer server(o);
  auto config = testing::test_config(server.url(), "orders");
  config.credentials.nkey_public_key = user.public_key;
  config.credentials.nkey_seed_file = write_file(dir, "wrong.nk", other.seed);
  expect_auth_error(config, {other.seed, user.seed});

  config.credentials.nkey_seed_file = write_file(dir, "user.nk", user.seed);
  Connection c(config);
  Topology(c).ensure_events_stream();
  CHECK(Publisher(c).publish("order.created", {{"id", 1}}).sequence == 1);

  // A seed file that holds no seed is a clear error too, and does not echo the file's content.
  config.credentials.nkey_seed_file = write_file(dir, "garbage.nk", "not-a-seed-Zq81");
  try {
    Connection bad(config);
    FAIL("connected with a garbage seed file");
  } catch (const Error& e) {
    MESSAGE("garbage seed file: " << std::string(e.what()));
    CHECK(std::string(e.what()).find("not-a-seed-Zq81") == std::string::npos);
  }
  check_no_secret(logs.text(), {other.seed, user.seed, "not-a-seed-Zq81"});
}

TEST_CASE("creds file (operator mode, user JWT + seed): right works, a wrong seed is a clear AuthError") {
  testing::LogCapture logs;
  testing::NatsServer::Options o;
  o.jetstream = false;  // the fixture account JWT grants no JetStream; core NATS proves the auth
  o.extra_config = std::string("trusted_keys: [\"") + kOperatorPublic + "\"]\nresolver: MEMORY\nresolver_preload: {\n  " +
                   kAccountPublic + ": \"" + kAccountJwt + "\"\n}\n";
  testing::NatsServer server(o);
  testing::TempDir dir;
  auto config = testing::test_config(server.url(), "orders");
  config.credentials.creds_file = write_file(dir, "wrong.creds", creds(kUserJwt, kOtherSeed));
  expect_auth_error(config, {kOtherSeed, kUserSeed});

  config.credentials.creds_file = write_file(dir, "user.creds", creds(kUserJwt, kUserSeed));
  Connection c(config);
  CHECK(c.connected());
  CHECK(natsConnection_Publish(c.native(), "core.subject", "x", 1) == NATS_OK);
  CHECK(natsConnection_FlushTimeout(c.native(), 2000) == NATS_OK);
  check_no_secret(logs.text(), {kOtherSeed, kUserSeed});
}

TEST_CASE("the relay worker with a wrong password: exit 5, a clear message, no secret on stderr") {
  testing::NatsServer::Options o;
  o.user = "relay";
  o.password = "pw-Relay-44e0aa";
  testing::NatsServer server(o);
  testing::TempDir dir;
  auto result = testing::run_command(std::string("NATSPUBSUB_USER=relay NATSPUBSUB_PASSWORD=pw-Wrong-17c9d0 ") +
                                         NATSPUBSUB_BINARY_DIR "/workers/natspubsub-relay --database sqlite://" +
                                         (dir.path() / "r.db").string() + " --nats " + server.url() +
                                         " --env test --app orders --once",
                                     std::chrono::seconds(30));
  MESSAGE("relay stderr: " << result.error);
  CHECK(result.status == 5);
  CHECK(result.error.find("credentials") != std::string::npos);
  CHECK(result.error.find("pw-Wrong-17c9d0") == std::string::npos);
  CHECK(result.output.find("pw-Wrong-17c9d0") == std::string::npos);
  // In the URL form the password is redacted too.
  auto in_url = testing::run_command(std::string(NATSPUBSUB_BINARY_DIR) + "/workers/natspubsub-relay --database sqlite://" +
                                         (dir.path() / "r.db").string() + " --nats nats://relay:pw-Wrong-17c9d0@127.0.0.1:" +
                                         std::to_string(server.port()) + " --env test --app orders --once",
                                     std::chrono::seconds(30));
  CHECK(in_url.status == 5);
  CHECK(in_url.error.find("pw-Wrong-17c9d0") == std::string::npos);
  CHECK(in_url.output.find("pw-Wrong-17c9d0") == std::string::npos);
}
