// natspubsub-relay: moves committed outbox rows into JetStream. See README "Operations".
#include <csignal>
#include <cstdio>
#include <iostream>
#include <sstream>
#include <thread>

#include <spdlog/spdlog.h>

#include <natspubsub/connection.hpp>
#include <natspubsub/error.hpp>
#include <natspubsub/outbox.hpp>
#include <natspubsub/outbox_relay.hpp>
#include <natspubsub/service.hpp>
#include <natspubsub/store/database.hpp>
#include <natspubsub/store/migrations.hpp>
#include <natspubsub/topology.hpp>
#include <natspubsub/version.hpp>

#include "common.hpp"
#include "http_server.hpp"

using namespace natspubsub;
using namespace natspubsub::workers;

namespace {

std::stop_source stop_source;

void on_signal(int) {
  // Only async-signal-safe work here: request_stop sets an atomic flag.
  stop_source.request_stop();
}

std::string prometheus(const RelayStats& s, const OutboxStats& o, const ConnectionHealth& h, bool db_ok) {
  std::ostringstream out;
  auto gauge = [&](const char* name, const char* help, double v) {
    out << "# HELP " << name << " " << help << "\n# TYPE " << name << " gauge\n" << name << " " << v << "\n";
  };
  auto counter = [&](const char* name, const char* help, double v) {
    out << "# HELP " << name << " " << help << "\n# TYPE " << name << " counter\n" << name << " " << v << "\n";
  };
  gauge("natspubsub_outbox_pending", "Outbox rows waiting to be published (including those in backoff)",
        static_cast<double>(o.pending));
  gauge("natspubsub_outbox_publishing", "Outbox rows claimed by a relay", static_cast<double>(o.publishing));
  gauge("natspubsub_outbox_sent", "Outbox rows marked sent and not yet cleaned up", static_cast<double>(o.sent));
  gauge("natspubsub_outbox_failed", "Outbox rows that reached the maximum attempts", static_cast<double>(o.failed));
  gauge("natspubsub_outbox_oldest_pending_age_seconds", "Age of the oldest unsent outbox row",
        o.oldest_unsent_age ? static_cast<double>(o.oldest_unsent_age->count()) / 1000.0 : 0.0);
  counter("natspubsub_relay_published_total", "Rows acknowledged by JetStream", static_cast<double>(s.published));
  counter("natspubsub_relay_duplicates_total", "Rows JetStream already had (deduplicated)", static_cast<double>(s.duplicates));
  counter("natspubsub_relay_retried_total", "Failed publishes rescheduled with backoff", static_cast<double>(s.retried));
  counter("natspubsub_relay_failed_total", "Rows that reached the maximum attempts", static_cast<double>(s.failed));
  counter("natspubsub_relay_errors_total", "Relay cycles that failed and were retried", static_cast<double>(s.errors));
  counter("natspubsub_relay_batches_total", "Batches claimed", static_cast<double>(s.batches));
  out << "# HELP natspubsub_relay_publish_latency_seconds Claim to acknowledgement time of published rows\n"
      << "# TYPE natspubsub_relay_publish_latency_seconds histogram\n";
  uint64_t cumulative = 0;
  for (size_t i = 0; i < PublishLatencyHistogram::kBounds.size(); ++i) {
    cumulative += s.publish_latency.counts[i];
    out << "natspubsub_relay_publish_latency_seconds_bucket{le=\"" << PublishLatencyHistogram::kBounds[i] << "\"} "
        << cumulative << "\n";
  }
  cumulative += s.publish_latency.counts.back();
  out << "natspubsub_relay_publish_latency_seconds_bucket{le=\"+Inf\"} " << cumulative << "\n"
      << "natspubsub_relay_publish_latency_seconds_sum " << s.publish_latency.sum_seconds << "\n"
      << "natspubsub_relay_publish_latency_seconds_count " << s.publish_latency.count << "\n";
  gauge("natspubsub_nats_connected", "1 when connected to NATS", h.state == ConnectionState::connected ? 1 : 0);
  gauge("natspubsub_database_up", "1 when the database answered the last check", db_ok ? 1 : 0);
  return out.str();
}

}  // namespace

int main(int argc, char** argv) {
  CLI::App cli{"natspubsub-relay: publishes committed outbox rows to NATS JetStream", "natspubsub-relay"};
  NatsFlags nats_flags;
  nats_flags.add_to(cli);
  std::string database_url;
  RelayOptions options;
  int64_t poll_ms = options.poll_interval.count();
  int64_t lease_ms = options.lease.count();
  bool once = false;
  bool no_migrate = false;
  bool delete_sent = false;
  std::string log_format = "text";
  std::string metrics_addr;
  cli.add_option("--database", database_url, "sqlite:///path.db, sqlite://relative.db or postgresql://user:pass@host:port/db")
      ->envname("NATSPUBSUB_DATABASE_URL")
      ->required();
  cli.add_option("--batch-size", options.batch_size, "rows claimed and published per cycle")
      ->envname("NATSPUBSUB_RELAY_BATCH_SIZE")
      ->check(CLI::Range(1, 100000))
      ->capture_default_str();
  cli.add_option("--poll-interval", poll_ms, "milliseconds to wait when nothing is pending")
      ->envname("NATSPUBSUB_RELAY_POLL_INTERVAL_MS")
      ->check(CLI::Range(1, 3600000))
      ->capture_default_str();
  cli.add_option("--max-attempts", options.max_attempts, "failed publishes before a row is marked failed")
      ->envname("NATSPUBSUB_RELAY_MAX_ATTEMPTS")
      ->check(CLI::Range(1, 1000000))
      ->capture_default_str();
  cli.add_option("--lease", lease_ms, "milliseconds a claimed row stays ours before another relay may take it")
      ->envname("NATSPUBSUB_RELAY_LEASE_MS")
      ->capture_default_str();
  int64_t ack_timeout_ms = options.ack_timeout.count();
  cli.add_option("--ack-timeout", ack_timeout_ms, "milliseconds to wait for a PubAck (must be below --lease)")
      ->envname("NATSPUBSUB_RELAY_ACK_TIMEOUT_MS")
      ->check(CLI::Range(1, 3600000))
      ->capture_default_str();
  cli.add_option("--relay-id", options.relay_id, "name of this relay in the outbox's locked_by column")
      ->envname("NATSPUBSUB_RELAY_ID");
  cli.add_flag("--delete-sent", delete_sent, "delete rows once published instead of marking them sent")
      ->envname("NATSPUBSUB_RELAY_DELETE_SENT");
  cli.add_flag("--once", once, "publish what is pending now, then exit 0");
  cli.add_flag("--no-migrate", no_migrate, "do not apply pending migrations at start")->envname("NATSPUBSUB_NO_MIGRATE");
  cli.add_option("--log-format", log_format, "text or json")
      ->envname("NATSPUBSUB_LOG_FORMAT")
      ->check(CLI::IsMember({"text", "json"}))
      ->capture_default_str();
  cli.add_option("--metrics-addr", metrics_addr, "HOST:PORT serving /metrics (Prometheus) and /healthz")
      ->envname("NATSPUBSUB_METRICS_ADDR");
  cli.set_version_flag("--version", std::string("natspubsub-relay ") + std::string(natspubsub::version()));
  try {
    cli.parse(argc, argv);
  } catch (const CLI::ParseError& e) {
    int rc = cli.exit(e);
    return rc == 0 ? kExitOk : kExitUsage;
  }
  setup_logging(log_format, "natspubsub-relay");
  options.poll_interval = Millis{poll_ms};
  options.lease = Millis{lease_ms};
  options.ack_timeout = Millis{ack_timeout_ms};
  options.delete_sent = delete_sent;

  Config config;
  try {
    config = nats_flags.build();
  } catch (const ConfigError& e) {
    spdlog::error("{}", e.what());
    return kExitConfig;
  } catch (const Error& e) {
    spdlog::error("{}", e.what());
    return kExitConfig;
  }

  std::unique_ptr<store::Database> db;
  try {
    db = store::open_database(database_url);
    if (!no_migrate) {
      auto applied = store::migrate(*db);
      if (!applied.empty()) spdlog::info("applied {} migration(s) to {}", applied.size(), db->description());
    }
  } catch (const std::exception& e) {
    spdlog::error("database: {}", e.what());
    return kExitDatabase;
  }

  std::optional<Connection> nats;
  try {
    nats.emplace(config);
    Topology(*nats).ensure_events_stream();
  } catch (const ConfigError& e) {
    spdlog::error("{}", e.what());
    return kExitConfig;
  } catch (const std::exception& e) {
    spdlog::error("NATS: {}", e.what());
    return kExitNats;
  }

  std::signal(SIGTERM, on_signal);
  std::signal(SIGINT, on_signal);

  std::unique_ptr<OutboxRelay> relay_ptr;
  try {
    relay_ptr = std::make_unique<OutboxRelay>(*nats, *db, options);
  } catch (const std::exception& e) {
    spdlog::error("{}", e.what());
    return kExitConfig;
  }
  auto& relay = *relay_ptr;
  try {
    // One extra database handle for the health check and the metrics endpoint: the relay's own
    // belongs to its thread.
    auto side_db = store::open_database(database_url);
    auto side_store = std::shared_ptr<OutboxStore>(make_outbox_store(*side_db));
    auto side_mutex = std::make_shared<std::mutex>();
    Health health(*nats);
    health.add_check("database", [side_store, side_mutex] {
      std::lock_guard lock(*side_mutex);
      (void)side_store->stats();
    });

    // NATS service discovery: `$SRV.PING|INFO|STATS` list this relay and its figures.
    Service service(*nats, {.name = "natspubsub-relay", .version = std::string(natspubsub::version()),
                            .description = "outbox relay of " + config.app,
                            .metadata = {{"app", config.app}, {"env", config.env}, {"database", db->description()}}});
    service.add_endpoints([&relay, &config] {
      auto s = relay.stats();
      ServiceEndpoint e;
      e.name = "outbox";
      e.subject = config.env + "." + config.app + ".>";
      e.num_requests = s.published;
      e.num_errors = s.errors + s.failed;
      e.processing_time = std::chrono::nanoseconds(static_cast<int64_t>(s.publish_latency.sum_seconds * 1e9));
      e.data = {{"published", s.published}, {"duplicates", s.duplicates}, {"retried", s.retried},
                {"failed", s.failed}, {"released", s.released}, {"batches", s.batches}};
      return std::vector<ServiceEndpoint>{e};
    });

    std::unique_ptr<HttpServer> metrics;
    if (!metrics_addr.empty()) {
      metrics = std::make_unique<HttpServer>(metrics_addr, [&, side_store, side_mutex](const std::string& path) {
        if (path == "/healthz") {
          auto report = health.readiness();  // NATS connected, JetStream answering, database answering
          return HttpResponse{report.ok ? 200 : 503, "application/json", report.to_json().dump() + "\n"};
        }
        if (path != "/metrics") return HttpResponse{404, "text/plain", "not found\n"};
        bool db_ok = true;
        OutboxStats ostats;
        try {
          std::lock_guard lock(*side_mutex);
          ostats = side_store->stats();
        } catch (const std::exception&) {
          db_ok = false;
        }
        return HttpResponse{200, "text/plain; version=0.0.4", prometheus(relay.stats(), ostats, nats->health(), db_ok)};
      });
      spdlog::info("metrics on http://{}:{}/metrics", metrics_addr.substr(0, metrics_addr.rfind(':')), metrics->port());
    }

    if (once) {
      auto n = relay.drain(stop_source.get_token());
      auto s = relay.stats();
      spdlog::info("relayed {} row(s): {} published ({} duplicates), {} rescheduled, {} failed", n, s.published,
                   s.duplicates, s.retried, s.failed);
    } else {
      relay.run(stop_source.get_token());
    }
    nats->flush();
  } catch (const std::exception& e) {
    spdlog::error("{}", e.what());
    return kExitFailure;
  }
  return kExitOk;
}
