// Request-reply between two services: inventory answers "is this in stock?", orders asks and
// waits for the answer. Run a nats-server and:
//   NATS_URL=nats://127.0.0.1:4222 ./build/examples/request_reply_example
// Both services live in this one program for the demo; in production each is its own process,
// and every replica of the inventory service runs the same Responder (one queue group shares the
// load).
#include <natspubsub/connection.hpp>
#include <natspubsub/error.hpp>
#include <natspubsub/request.hpp>

#include <cstdio>
#include <map>
#include <string>

int main() try {
  using natspubsub::Millis;
  auto inventory_config = natspubsub::Config::from_env(natspubsub::Config::development("inventory"));
  auto orders_config = inventory_config;
  orders_config.app = "orders";

  // ---- inventory service: answers on "{env}.inventory.stock.check" --------------------------
  natspubsub::Connection inventory_nats(inventory_config);
  const std::map<std::string, int> stock{{"A-1", 12}, {"B-2", 0}};
  natspubsub::Responder stock_check(inventory_nats, "stock.check", [&](const natspubsub::Request& r) {
    const auto sku = r.data().at("sku").get<std::string>();
    const auto it = stock.find(sku);
    if (it == stock.end()) throw natspubsub::RemoteError(404, "unknown sku " + sku);  // a typed answer
    return nlohmann::json{{"sku", sku}, {"available", it->second}};  // any other exception: a 500 answer
  }, {.concurrency = 4});

  // ---- order service: asks, with a timeout -------------------------------------------------
  natspubsub::Connection orders_nats(orders_config);
  natspubsub::CorrelationScope conversation("order-1001");  // requests made here carry this id
  const natspubsub::RequestOptions ask{.timeout = Millis{500},
                                       .idempotent = true,  // a stock check may be asked twice
                                       .retries = 2,
                                       .app = "inventory"};
  auto reply = natspubsub::request(orders_nats, "stock.check", {{"sku", "A-1"}}, ask);
  std::printf("A-1: %d available (correlation %s, answered in %d attempt(s))\n", reply.data.at("available").get<int>(),
              reply.correlation_id.c_str(), reply.attempts);

  try {
    (void)natspubsub::request(orders_nats, "stock.check", {{"sku", "Z-9"}}, ask);
  } catch (const natspubsub::RemoteError& e) {      // the responder answered with an error
    std::printf("Z-9: remote error %d: %s\n", e.code(), e.remote_message().c_str());
  } catch (const natspubsub::TimeoutError& e) {     // nobody answered in time
    std::printf("Z-9: %s\n", e.what());
  } catch (const natspubsub::NoRespondersError& e) {  // nobody listens: the inventory service is down
    std::printf("Z-9: %s\n", e.what());
  }

  stock_check.stop();  // requests already received are answered first
  return 0;
} catch (const natspubsub::Error& e) {
  std::fprintf(stderr, "request_reply_example failed: %s\n", e.what());
  return 1;
}
