// ctest-labels: demo
// The project's main job, as a newcomer runs it: scripts/demo, with fewer orders.
#include <doctest/doctest.h>

#include "support/servers.hpp"

using namespace natspubsub;

namespace {

void check_summary(const testing::CommandResult& r, int orders) {
  INFO(r.output);
  CHECK(r.status == 0);
  CHECK(r.output.find("orders created:                 " + std::to_string(orders)) != std::string::npos);
  CHECK(r.output.find("events relayed (outbox -> NATS): " + std::to_string(2 * orders - 1)) != std::string::npos);
  CHECK(r.output.find("payments recorded:              " + std::to_string(orders - 1)) != std::string::npos);
  CHECK(r.output.find("duplicates suppressed:          25 by JetStream") != std::string::npos);
  CHECK(r.output.find("dead letters:                   1") != std::string::npos);
  CHECK(r.output.find("permanent_error") != std::string::npos);
  CHECK(r.output.find("has a negative amount") != std::string::npos);
  CHECK(r.output.find("demo: all checks passed") != std::string::npos);
}

}  // namespace

TEST_CASE("scripts/demo with SQLite") {
  auto r = testing::run_command("NATS_URL= NATSPUBSUB_BUILD_DIR=" NATSPUBSUB_BINARY_DIR " " NATSPUBSUB_SOURCE_DIR
                                "/scripts/demo --orders 120 2>&1",
                                std::chrono::seconds(180));
  check_summary(r, 120);
}

TEST_CASE("scripts/demo with PostgreSQL") {
  testing::PostgresServer pg;
  auto url = pg.create_database("demo");
  auto r = testing::run_command("NATS_URL= NATSPUBSUB_BUILD_DIR=" NATSPUBSUB_BINARY_DIR " " NATSPUBSUB_SOURCE_DIR
                                "/scripts/demo --orders 80 --postgres " + url + " 2>&1",
                                std::chrono::seconds(180));
  check_summary(r, 80);
}
