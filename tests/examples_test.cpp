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
