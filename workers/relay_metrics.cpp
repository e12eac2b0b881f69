#include "relay_metrics.hpp"

namespace natspubsub::workers {

using prometheus::ClientMetric;
using prometheus::MetricFamily;
using prometheus::MetricType;

std::vector<MetricFamily> RelayMetrics::Collect() const {
  std::vector<MetricFamily> out;
  auto add = [&out](const char* name, const char* help, MetricType type, double v) {
    ClientMetric m;
    if (type == MetricType::Counter) {
      m.counter.value = v;
    } else {
      m.gauge.value = v;
    }
    out.push_back(MetricFamily{name, help, type, {std::move(m)}});
  };
  auto counter = [&add](const char* name, const char* help, uint64_t v) {
    // A double holds every integer up to 2^53 exactly; the serializer prints it in full.
    add(name, help, MetricType::Counter, static_cast<double>(v));
  };

  bool db_up = true;
  OutboxStats o;
  try {
    o = sources_.outbox();
  } catch (const std::exception&) {
    db_up = false;
  }
  if (db_up) {
    add("natspubsub_outbox_pending", "Outbox rows waiting to be published (including those in backoff)",
        MetricType::Gauge, static_cast<double>(o.pending));
    add("natspubsub_outbox_publishing", "Outbox rows claimed by a relay", MetricType::Gauge,
        static_cast<double>(o.publishing));
    add("natspubsub_outbox_sent", "Outbox rows marked sent and not yet cleaned up", MetricType::Gauge,
        static_cast<double>(o.sent));
    add("natspubsub_outbox_failed", "Outbox rows that reached the maximum attempts", MetricType::Gauge,
        static_cast<double>(o.failed));
    add("natspubsub_outbox_oldest_pending_age_seconds", "Age of the oldest unsent outbox row (0 when none)",
        MetricType::Gauge, o.oldest_unsent_age ? static_cast<double>(o.oldest_unsent_age->count()) / 1000.0 : 0.0);
  }

  auto s = sources_.relay();
  counter("natspubsub_relay_published_total", "Rows acknowledged by JetStream (duplicates included)", s.published);
  counter("natspubsub_relay_duplicates_total", "Rows JetStream already had (deduplicated)", s.duplicates);
  counter("natspubsub_relay_retried_total", "Failed publishes rescheduled with backoff", s.retried);
  counter("natspubsub_relay_failed_total", "Rows that reached the maximum attempts", s.failed);
  counter("natspubsub_relay_released_total", "Claimed rows given back unpublished (connection lost, shutdown)",
          s.released);
  counter("natspubsub_relay_cleaned_total", "Sent rows deleted by cleanup", s.cleaned);
  counter("natspubsub_relay_errors_total", "Relay cycles that failed and were retried", s.errors);
  counter("natspubsub_relay_batches_total", "Batches claimed", s.batches);

  ClientMetric h;
  uint64_t cumulative = 0;
  for (size_t i = 0; i < PublishLatencyHistogram::kBounds.size(); ++i) {
    cumulative += s.publish_latency.counts[i];
    h.histogram.bucket.push_back({cumulative, PublishLatencyHistogram::kBounds[i]});
  }
  h.histogram.sample_count = s.publish_latency.count;
  h.histogram.sample_sum = s.publish_latency.sum_seconds;
  out.push_back(MetricFamily{"natspubsub_relay_publish_latency_seconds",
                             "Claim to acknowledgement time of published rows", MetricType::Histogram, {std::move(h)}});

  add("natspubsub_nats_connected", "1 when connected to NATS", MetricType::Gauge, sources_.nats_connected() ? 1 : 0);
  add("natspubsub_database_up", "1 when the database answered this scrape's query", MetricType::Gauge, db_up ? 1 : 0);
  return out;
}

}  // namespace natspubsub::workers
