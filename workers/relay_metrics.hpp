#pragma once
// The relay's Prometheus metrics, read from their sources at each scrape (see README
// "Operations: natspubsub-relay" for the names). Exact integers: a counter is the relay's own
// uint64_t, printed by prometheus-cpp's serializer, never rounded to 6 digits.
//
//   auto metrics = std::make_shared<RelayMetrics>(RelayMetrics::Sources{
//       .relay = [&] { return relay.stats(); },
//       .outbox = [&] { return store.stats(); },   // throws when the database does not answer
//       .nats_connected = [&] { return nats.health().state == ConnectionState::connected; }});
//   server.add_collectable(metrics);
#include <functional>
#include <vector>

#include <prometheus/collectable.h>
#include <prometheus/metric_family.h>

#include <natspubsub/outbox.hpp>
#include <natspubsub/outbox_relay.hpp>

namespace natspubsub::workers {

class RelayMetrics final : public prometheus::Collectable {
 public:
  struct Sources {
    std::function<RelayStats()> relay;
    std::function<OutboxStats()> outbox;  ///< may throw: natspubsub_database_up is then 0
    std::function<bool()> nats_connected;
  };
  explicit RelayMetrics(Sources sources) : sources_(std::move(sources)) {}
  std::vector<prometheus::MetricFamily> Collect() const override;

 private:
  Sources sources_;
};

}  // namespace natspubsub::workers
