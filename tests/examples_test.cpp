// The README's examples are real programs: build them, run them against a real server.
#include <doctest/doctest.h>

#include "support/nats_helpers.hpp"
#include "support/servers.hpp"

using namespace natspubsub;

TEST_CASE("publish_example stores one event") {
  testing::NatsServer server;
  auto r = testing::run_command("NATS_URL=" + server.url() + " " NATSPUBSUB_BINARY_DIR "/examples/publish_example 2>&1",
                                std::chrono::seconds(60));
  INFO(r.output);
  CHECK(r.status == 0);
  CHECK(r.output.find("stored in development-orders-events at sequence 1") != std::string::npos);
  testing::RawNats raw(server.url());
  CHECK(raw.stream_messages("development-orders-events") == 1);
}

TEST_CASE("publish_example in the natspubsub topology mode stores into NatsPubsub's stream") {
  testing::NatsServer server;
  auto r = testing::run_command("NATS_URL=" + server.url() +
                                    " NATSPUBSUB_TOPOLOGY=natspubsub " NATSPUBSUB_BINARY_DIR "/examples/publish_example 2>&1",
                                std::chrono::seconds(60));
  INFO(r.output);
  CHECK(r.status == 0);
  CHECK(r.output.find("stored in development-events-stream at sequence 1") != std::string::npos);
  testing::RawNats raw(server.url());
  CHECK(raw.stream_messages("development-events-stream") == 1);
}

TEST_CASE("outbox_sqlite_example: order and event together, second delivery is a duplicate") {
  testing::TempDir dir;
  auto db = (dir.path() / "orders.db").string();
  auto r = testing::run_command(NATSPUBSUB_BINARY_DIR "/examples/outbox_sqlite_example " + db + " 2>&1",
                                std::chrono::seconds(60));
  INFO(r.output);
  CHECK(r.status == 0);
  CHECK(r.output.find("delivery 1: processed") != std::string::npos);
  CHECK(r.output.find("delivery 2: duplicate") != std::string::npos);
  auto rows = testing::run_command("sqlite3 " + db + " 'SELECT COUNT(*) FROM orders; SELECT COUNT(*) FROM natspubsub_outbox; SELECT COUNT(*) FROM payments;'");
  CHECK(rows.output == "1\n1\n1\n");
}

TEST_CASE("outbox_postgres_example: the same against PostgreSQL") {
  testing::PostgresServer pg;
  auto url = pg.create_database("orders");
  auto r = testing::run_command(NATSPUBSUB_BINARY_DIR "/examples/outbox_postgres_example " + url + " 2>&1",
                                std::chrono::seconds(60));
  INFO(r.output);
  CHECK(r.status == 0);
  CHECK(r.output.find("delivery 1: processed") != std::string::npos);
  CHECK(r.output.find("delivery 2: duplicate") != std::string::npos);
  CHECK(pg.psql("SELECT COUNT(*) FROM natspubsub_outbox", "orders") == "1");
  CHECK(pg.psql("SELECT COUNT(*) FROM payments", "orders") == "1");
}

TEST_CASE("request_reply_example: an answer and a typed remote error") {
  testing::NatsServer server;
  auto r = testing::run_command("NATS_URL=" + server.url() + " " NATSPUBSUB_BINARY_DIR "/examples/request_reply_example 2>&1",
                                std::chrono::seconds(60));
  INFO(r.output);
  CHECK(r.status == 0);
  CHECK(r.output.find("12 available") != std::string::npos);
  CHECK(r.output.find("remote error 404") != std::string::npos);
}

TEST_CASE("circuit_breaker_example: every order charged once, none dead-lettered") {
  testing::NatsServer server;
  auto r = testing::run_command("NATS_URL=" + server.url() + " " NATSPUBSUB_BINARY_DIR "/examples/circuit_breaker_example 2>&1",
                                std::chrono::seconds(90));
  INFO(r.output);
  CHECK(r.status == 0);
  CHECK(r.output.find("10 charged") != std::string::npos);
  CHECK(r.output.find(" 0 dead-lettered") != std::string::npos);
}
