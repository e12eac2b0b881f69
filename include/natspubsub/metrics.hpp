#pragma once
// Prometheus metrics for a service built on the library, through prometheus-cpp.
//
//   prometheus::Exposer exposer{"0.0.0.0:9464"};            // the application's own exposer
//   auto registry = std::make_shared<prometheus::Registry>(); // and its own metrics
//   auto consumer_metrics = natspubsub::consumer_metrics(consumer);
//   auto process = natspubsub::process_metrics();
//   exposer.RegisterCollectable(registry);
//   exposer.RegisterCollectable(consumer_metrics);  // every subscription, read at each scrape
//   exposer.RegisterCollectable(process);           // natspubsub_build_info, process_*
//
// Each collectable reads its source when scraped, so counters are the exact integers the
// library counted (no second copy updated by a thread). prometheus-cpp's Registry only holds
// families whose counters it increments itself, which is why these are Collectables beside it
// rather than families inside it. Link prometheus-cpp::core (and ::pull for the Exposer).
#include <memory>

namespace prometheus {
class Collectable;
}

namespace natspubsub {

class Consumer;

/// Every subscription's SubscriptionStats as metrics labelled {durable, subject, stream}:
/// counters natspubsub_consumer_{received,acked,retried,dead_lettered,discarded,malformed,
/// handler_errors,ack_failures,dlq_failures,deferred,nacked_on_stop}_total, gauges
/// natspubsub_consumer_in_flight and natspubsub_consumer_running, the histogram
/// natspubsub_consumer_handler_latency_seconds, and for a subscription with a circuit breaker
/// natspubsub_consumer_circuit_state{state="closed|open|half_open"} (1 for the current state).
/// The consumer must outlive the returned object; exposers hold only a weak_ptr, so dropping
/// the returned pointer unregisters it. Covered by tests/metrics_test.cpp.
[[nodiscard]] std::shared_ptr<prometheus::Collectable> consumer_metrics(const Consumer& consumer);

/// natspubsub_build_info{version} 1, and process_cpu_seconds_total, process_resident_memory_bytes,
/// process_virtual_memory_bytes, process_start_time_seconds, process_open_fds, process_max_fds
/// read from /proc/self (Linux) at each scrape. prometheus-cpp 1.0 has no process collector.
[[nodiscard]] std::shared_ptr<prometheus::Collectable> process_metrics();

}  // namespace natspubsub
