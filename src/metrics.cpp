#include <natspubsub/metrics.hpp>

#include <sys/resource.h>
#include <unistd.h>

#include <filesystem>
#include <fstream>
#include <limits>
#include <sstream>
#include <string>
#include <vector>

#include <prometheus/collectable.h>
#include <prometheus/metric_family.h>

#include <natspubsub/consumer.hpp>
#include <natspubsub/version.hpp>

namespace natspubsub {
namespace {

using prometheus::ClientMetric;
using prometheus::MetricFamily;
using prometheus::MetricType;

MetricFamily family(std::string name, std::string help, MetricType type) {
  return MetricFamily{std::move(name), std::move(help), type, {}};
}

ClientMetric sample(std::vector<ClientMetric::Label> labels, double value, MetricType type) {
  ClientMetric m;
  m.label = std::move(labels);
  if (type == MetricType::Counter) {
    m.counter.value = value;
  } else {
    m.gauge.value = value;
  }
  return m;
}

class ConsumerCollectable final : public prometheus::Collectable {
 public:
  explicit ConsumerCollectable(const Consumer& consumer) : consumer_(&consumer) {}

  std::vector<MetricFamily> Collect() const override {
    auto all = consumer_->stats();
    struct CounterDef {
      const char* name;
      const char* help;
      uint64_t SubscriptionStats::*field;
    };
    static const CounterDef kCounters[] = {
        {"natspubsub_consumer_received_total", "Messages fetched", &SubscriptionStats::received},
        {"natspubsub_consumer_acked_total", "Messages whose handler succeeded and whose ack the server confirmed",
         &SubscriptionStats::acked},
        {"natspubsub_consumer_retried_total", "Messages NAKed with a backoff delay", &SubscriptionStats::retried},
        {"natspubsub_consumer_dead_lettered_total", "Messages stored in the DLQ (all reasons)",
         &SubscriptionStats::dead_lettered},
        {"natspubsub_consumer_discarded_total", "Failed messages acked anyway by an error-policy discard rule",
         &SubscriptionStats::discarded},
        {"natspubsub_consumer_malformed_total", "Bodies that were not an envelope (also in dead_lettered)",
         &SubscriptionStats::malformed},
        {"natspubsub_consumer_handler_errors_total", "Handler or middleware failures", &SubscriptionStats::handler_errors},
        {"natspubsub_consumer_ack_failures_total", "Acks the server did not confirm", &SubscriptionStats::ack_failures},
        {"natspubsub_consumer_dlq_failures_total", "DLQ publishes that failed (the message was NAKed instead)",
         &SubscriptionStats::dlq_failures},
        {"natspubsub_consumer_deferred_total", "Messages NAKed because the circuit was not closed",
         &SubscriptionStats::deferred},
        {"natspubsub_consumer_nacked_on_stop_total", "Fetched messages handed back unstarted at stop",
         &SubscriptionStats::nacked_on_stop},
    };
    std::vector<MetricFamily> out;
    for (const auto& def : kCounters) {
      auto f = family(def.name, def.help, MetricType::Counter);
      for (const auto& s : all) f.metric.push_back(sample(labels(s), static_cast<double>(s.*(def.field)), MetricType::Counter));
      out.push_back(std::move(f));
    }
    auto in_flight = family("natspubsub_consumer_in_flight", "Messages fetched and not settled yet", MetricType::Gauge);
    auto running = family("natspubsub_consumer_running", "Handlers running now", MetricType::Gauge);
    auto latency = family("natspubsub_consumer_handler_latency_seconds", "Handler time, middleware included",
                          MetricType::Histogram);
    auto circuit = family("natspubsub_consumer_circuit_state",
                          "1 for the current state of the subscription's circuit breaker, 0 for the others",
                          MetricType::Gauge);
    for (const auto& s : all) {
      in_flight.metric.push_back(sample(labels(s), static_cast<double>(s.in_flight), MetricType::Gauge));
      running.metric.push_back(sample(labels(s), static_cast<double>(s.running), MetricType::Gauge));
      ClientMetric h;
      h.label = labels(s);
      uint64_t cumulative = 0;
      for (const auto& b : s.latency.buckets) {
        cumulative += b.count;
        // The overflow bucket (Micros::max()) is the serializer's own +Inf line.
        if (b.upper_bound == Micros::max()) continue;
        h.histogram.bucket.push_back({cumulative, static_cast<double>(b.upper_bound.count()) / 1e6});
      }
      h.histogram.sample_count = s.latency.count;
      h.histogram.sample_sum = static_cast<double>(s.latency.sum.count()) / 1e6;
      latency.metric.push_back(std::move(h));
      if (s.circuit) {
        for (auto state : {CircuitState::closed, CircuitState::open, CircuitState::half_open}) {
          auto l = labels(s);
          l.push_back({"state", to_string(state)});
          circuit.metric.push_back(sample(std::move(l), s.circuit->state == state ? 1 : 0, MetricType::Gauge));
        }
      }
    }
    out.push_back(std::move(in_flight));
    out.push_back(std::move(running));
    out.push_back(std::move(latency));
    if (!circuit.metric.empty()) out.push_back(std::move(circuit));
    return out;
  }

 private:
  static std::vector<ClientMetric::Label> labels(const SubscriptionStats& s) {
    return {{"durable", s.durable}, {"stream", s.stream}, {"subject", s.subject}};
  }
  const Consumer* consumer_;
};

// Fields of /proc/self/stat after the command name, which may itself hold spaces and ')'.
std::vector<std::string> proc_self_stat() {
  std::ifstream in("/proc/self/stat");
  std::string line;
  std::getline(in, line);
  auto close = line.rfind(')');
  std::vector<std::string> fields;
  if (close == std::string::npos) return fields;
  std::istringstream rest(line.substr(close + 1));
  for (std::string f; rest >> f;) fields.push_back(f);
  return fields;  // fields[0] is field 3 (state) of proc(5)
}

double boot_time_seconds() {
  std::ifstream in("/proc/stat");
  for (std::string key; in >> key;) {
    if (key == "btime") {
      double v = 0;
      in >> v;
      return v;
    }
    in.ignore(std::numeric_limits<std::streamsize>::max(), '\n');
  }
  return 0;
}

class ProcessCollectable final : public prometheus::Collectable {
 public:
  std::vector<MetricFamily> Collect() const override {
    std::vector<MetricFamily> out;
    auto add = [&out](const char* name, const char* help, MetricType type, double v,
                      std::vector<ClientMetric::Label> labels = {}) {
      auto f = family(name, help, type);
      f.metric.push_back(sample(std::move(labels), v, type));
      out.push_back(std::move(f));
    };
    add("natspubsub_build_info", "Always 1; the natspubsub version in a label", MetricType::Gauge, 1,
        {{"version", std::string(version())}});
    auto stat = proc_self_stat();
    const double ticks = static_cast<double>(sysconf(_SC_CLK_TCK));
    const double page = static_cast<double>(sysconf(_SC_PAGESIZE));
    // proc(5) numbering: utime 14, stime 15, starttime 22, vsize 23, rss 24; fields[0] is 3.
    if (stat.size() > 21 && ticks > 0) {
      add("process_cpu_seconds_total", "User and system CPU time spent in seconds", MetricType::Counter,
          (std::stod(stat[11]) + std::stod(stat[12])) / ticks);
      add("process_start_time_seconds", "Start time of the process since unix epoch in seconds", MetricType::Gauge,
          boot_time_seconds() + std::stod(stat[19]) / ticks);
      add("process_virtual_memory_bytes", "Virtual memory size in bytes", MetricType::Gauge, std::stod(stat[20]));
      add("process_resident_memory_bytes", "Resident memory size in bytes", MetricType::Gauge,
          std::stod(stat[21]) * page);
    }
    std::error_code ec;
    double fds = 0;
    for (auto it = std::filesystem::directory_iterator("/proc/self/fd", ec);
         !ec && it != std::filesystem::directory_iterator(); it.increment(ec)) {
      ++fds;
    }
    if (!ec) add("process_open_fds", "Number of open file descriptors", MetricType::Gauge, fds);
    rlimit limit{};
    if (getrlimit(RLIMIT_NOFILE, &limit) == 0 && limit.rlim_cur != RLIM_INFINITY) {
      add("process_max_fds", "Maximum number of open file descriptors", MetricType::Gauge,
          static_cast<double>(limit.rlim_cur));
    }
    return out;
  }
};

}  // namespace

std::shared_ptr<prometheus::Collectable> consumer_metrics(const Consumer& consumer) {
  return std::make_shared<ConsumerCollectable>(consumer);
}

std::shared_ptr<prometheus::Collectable> process_metrics() { return std::make_shared<ProcessCollectable>(); }

}  // namespace natspubsub
