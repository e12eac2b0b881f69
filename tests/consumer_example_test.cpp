// ctest-labels: integration
// examples/consumer_example.cpp is the README's consumer: build it, run it against a real server.
#include <doctest/doctest.h>
#include <nlohmann/json.hpp>

#include "support/nats_helpers.hpp"
#include "support/servers.hpp"

using namespace natspubsub;

TEST_CASE("consumer_example: charges two orders (one after retries) and dead-letters the invalid one") {
  testing::NatsServer server;
  auto r = testing::run_command(
      "NATS_URL=" + server.url() + " " NATSPUBSUB_BINARY_DIR "/examples/consumer_example --demo 2>&1",
      std::chrono::seconds(60));
  INFO(r.output);
  CHECK(r.status == 0);
  CHECK(r.output.find("charged order 1001 on attempt 1") != std::string::npos);
  CHECK(r.output.find("charged order 1002 on attempt 3") != std::string::npos);
  CHECK(r.output.find("charged order 1003") == std::string::npos);
  CHECK(r.output.find("2 acked, 2 retried, 1 dead-lettered") != std::string::npos);
  testing::RawNats raw(server.url());
  auto dlq = raw.read_stream("development-billing-dlq");
  REQUIRE(dlq.size() == 1);
  CHECK(dlq[0].subject == "dlq.development.billing.development.orders.order.created");
  std::string reason;
  for (const auto& [key, value] : dlq[0].headers)
    if (key == "x-dlq-reason") reason = value;
  CHECK(reason == "permanent_error");
}

TEST_CASE("consumer_example in the natspubsub topology mode: NatsPubsub's stream and durable name") {
  testing::NatsServer server;
  auto r = testing::run_command("NATS_URL=" + server.url() + " NATSPUBSUB_TOPOLOGY=natspubsub " NATSPUBSUB_BINARY_DIR
                                "/examples/consumer_example --demo 2>&1",
                                std::chrono::seconds(60));
  INFO(r.output);
  CHECK(r.status == 0);
  CHECK(r.output.find("2 acked, 2 retried, 1 dead-lettered") != std::string::npos);
  CHECK(r.output.find("billing_development_orders_order_created") != std::string::npos);
  testing::RawNats raw(server.url());
  CHECK(raw.stream_messages("development-events-stream") == 3);
  CHECK(raw.read_stream("development-billing-dlq").size() == 1);
}
