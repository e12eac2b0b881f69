// Publish a first event. Run a nats-server with JetStream (`nats-server -js`) and:
//   NATS_URL=nats://127.0.0.1:4222 ./build/examples/publish_example
#include <natspubsub/connection.hpp>
#include <natspubsub/error.hpp>
#include <natspubsub/publisher.hpp>
#include <natspubsub/topology.hpp>

#include <cstdio>

int main() try {
  // Defaults for local work, then NATS_URL / NATSPUBSUB_* from the environment.
  auto config = natspubsub::Config::from_env(natspubsub::Config::development("orders"));

  natspubsub::Connection nats(config);           // connects or throws
  // Stream "development-orders-events"; with NATSPUBSUB_TOPOLOGY=natspubsub NatsPubsub's
  // "development-events-stream", shared with services on the JavaScript/Ruby libraries.
  natspubsub::Topology(nats).ensure_events_stream();

  natspubsub::Publisher publisher(nats);
  auto ack = publisher.publish("order.created", {{"order_id", 1001}, {"amount_cents", 2599}});

  std::printf("event %s stored in %s at sequence %llu\n", ack.event_id.c_str(), ack.stream.c_str(),
              static_cast<unsigned long long>(ack.sequence));
  return 0;
} catch (const natspubsub::Error& e) {
  std::fprintf(stderr, "publish failed: %s\n", e.what());
  return 1;
}
